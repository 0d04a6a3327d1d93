"""Where a delta acts: the user's patterns resolved, once, into :class:`Target` values.

A pattern is a module name, path or ``[r]`` regex (:mod:`opendelta.addressing`), or a
common-structure role (:mod:`opendelta.structure`) when ``common_structure`` is on; a span
``"start->end"`` has one such pattern per side. :func:`resolve` turns a pattern list into targets
(aliases resolve to canonical paths), :func:`resolve_config` applies a method's config to it (its
default positions, ``common_structure``, ``exclude_modules``), and :func:`targets_at` reads back
the paths a checkpoint saved. Nothing after this module parses a pattern or a span string.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

from torch import nn

from opendelta.addressing import (
    SPAN_SEP,
    backbone_modules,
    excluded_paths,
    find_modules,
    is_under,
    pair_spans,
    span_path,
    split_span,
    suggest,
)
from opendelta.config import DeltaConfig, check_name_list
from opendelta.errors import (
    LifecycleError,
    NoMatchError,
    OpenDeltaError,
    PatternError,
    StructureError,
    UnsupportedModuleError,
)
from opendelta.leniency import OriginalBehaviourWarning, is_strict
from opendelta.routing import Span, site_of
from opendelta.structure import resolve_roles
from opendelta.structure.original_names import STACKS, VOCABULARY, is_original_name, layer_index, original_roles
from opendelta.structure.renamed import current_name


@dataclasses.dataclass(frozen=True)
class Target:
    """One place a delta acts: a module, or a span from one module's input to a later module's output."""

    start: str  #: the module's path, or the span's start module's path
    end: str  #: the same path for a module; the span's end module's path (where its delta layer lives)
    #: what routing places a delta layer on: the module, or the :class:`~opendelta.routing.Span` of the two
    site: nn.Module | Span = dataclasses.field(compare=False, repr=False)

    @property
    def path(self) -> str:
        """The module's path, or ``"start->end"``: the key of the delta's layer and checkpoint tensors."""
        return span_path(self.start, self.end)

    @property
    def is_span(self) -> bool:
        return self.start != self.end

    @property
    def sides(self) -> tuple[str, ...]:
        """The paths of the modules involved: the module, or the span's start and end."""
        return (self.start, self.end) if self.is_span else (self.start,)

    @property
    def module(self) -> nn.Module:
        """The module the delta layer lives on: the module itself, or the span's end."""
        return self.site.end if isinstance(self.site, Span) else self.site

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """The modules involved, as :attr:`sides`."""
        return (self.site.start, self.site.end) if isinstance(self.site, Span) else (self.site,)

    def __str__(self) -> str:
        return self.path


def _target(modules: dict[str, nn.Module], start: str, end: str) -> Target:
    site = modules[start] if start == end else Span(modules[start], modules[end])
    return Target(start, end, site)


def resolve(
    model: nn.Module, patterns: Sequence[str], *, roles: bool = False, strict: bool = True,
    what: str = "modified_modules",
) -> list[Target]:
    """The targets `patterns` address in `model`, each once, in model order (a span by its start).

    With `roles` each pattern (and each side of a span) is a common-structure role, else a module
    name. With `strict` every pattern must address something (NoMatchError, StructureError or
    PatternError otherwise); without, what does not resolve is skipped (a method's default wish list).
    """
    check_name_list(patterns, what)
    index = {path: i for i, (path, _) in enumerate(backbone_modules(model))}

    def find(names: list[str], strict: bool) -> list[str]:
        original = [n for n in names if is_original_name(n, roles=roles) or _original_vocabulary(model, n, roles, what)]
        names = [n for n in names if n not in original]
        if not roles:
            names = [renamed for n in names for renamed in _renamed(model, n, what)]
        found = []
        if names:
            found = resolve_roles(model, names, strict=strict) if roles else find_modules(model, names, what=what, strict=strict)
        for name in original:  # the original OpenDelta's "attn@.q@" names (structure/original_names.py)
            meant = original_roles(name)
            paths = resolve_roles(model, meant, strict=strict and len(meant) == 1)
            index = layer_index(name)
            if index is not None:
                paths = in_layer(model, name, meant, paths, index, strict)
            found += paths
        return found

    plain: list[str] = []
    spans: list[tuple[str, tuple[str, str]]] = []
    for text in patterns:
        sides = split_span(text)
        if sides is None:
            plain.append(text)
        else:
            spans.append((text, sides))
    pairs = [(path, path) for path in find(plain, strict)] if plain else []
    for text, sides in spans:
        try:
            starts, ends = (find([side], strict) for side in sides)
        except OpenDeltaError:
            if strict:
                raise
            continue  # without strict, a span whose sides do not resolve is skipped
        pairs.extend(pair_spans(text, starts, ends, index, strict=strict))
    modules = dict(model.named_modules())
    ordered = sorted(dict.fromkeys(pairs), key=lambda pair: index.get(pair[0], -1))
    return [_target(modules, start, end) for start, end in ordered]


def without_excluded(model: nn.Module, targets: Sequence[Target], exclude: Sequence[str] | None) -> list[Target]:
    """`targets` without those a module matched by `exclude` is, or contains, a side of."""
    gone = excluded_paths(model, exclude)
    return [t for t in targets if not any(is_under(side, gone) for side in t.sides)]


def resolve_config(
    model: nn.Module, config: DeltaConfig, defaults: Sequence[str], *, owner: str, accepts_spans: bool = False
) -> list[Target]:
    """Where a method (named `owner`, with default positions `defaults`, given as roles) acts on
    `model` under `config`: ``modified_modules`` read as names or, with ``common_structure``, roles,
    or the defaults this family has; minus ``exclude_modules``. Touches nothing."""
    if isinstance(config.modified_modules, (list, tuple)) and not config.modified_modules:
        raise PatternError(
            f"modified_modules is an empty list, so {owner} would modify nothing; name the modules to "
            "modify, or pass modified_modules=None (or leave it out) for the method's default positions."
        )
    if config.modified_modules is None:  # defaults are the method's wish list: whichever this family has
        targets = _without_covered_spans(resolve(model, defaults, roles=True, strict=False))
    else:
        targets = resolve(model, config.modified_modules, roles=config.common_structure)
    span = next((t for t in targets if t.is_span), None)
    if span is not None and not accepts_spans:
        raise UnsupportedModuleError(
            f"{owner} acts on one module at a time, but modified_modules addresses the span {span.path!r}; "
            f"spans ('start{SPAN_SEP}end') are for methods that feed one module's input to another's output "
            "(ParallelAdapterModel). Address single modules instead."
        )
    targets = without_excluded(model, targets, config.exclude_modules)
    if not targets and config.exclude_modules:
        raise PatternError(f"exclude_modules {config.exclude_modules} removed every module {owner} would modify.")
    if not targets:  # only the defaults can resolve to nothing: user names that match nothing raise above
        raise PatternError(
            f"{type(model).__name__} has none of {owner}'s default positions "
            f"({', '.join(defaults)}); name the modules with modified_modules=[...]."
        )
    return targets


def _without_covered_spans(targets: list[Target]) -> list[Target]:
    """Default positions without the spans that lie inside another default module (LLaMA's
    up_proj->down_proj inside its mlp): a span stands in where no single module holds the block."""
    modules = {t.path for t in targets if not t.is_span}
    return [t for t in targets if not (t.is_span and all(is_under(side, modules) for side in t.sides))]


def targets_at(model: nn.Module, paths: Sequence[str]) -> tuple[list[Target], list[str]]:
    """The targets at `paths` as :attr:`Target.path` wrote them (a checkpoint's module list; ``""``
    is the model itself), and the paths whose modules `model` lacks."""
    modules = {"": model, **dict(backbone_modules(model))}
    found: list[Target] = []
    missing: list[str] = []
    for path in paths:
        start, end = split_span(path) or (path, path)
        if start in modules and end in modules:
            found.append(_target(modules, start, end))
        else:
            missing.append(path)
    return found, missing


def check_hostable(targets: Sequence[Target]) -> None:
    """Raise UnsupportedModuleError for a target a delta layer cannot live in."""
    for target in targets:
        if isinstance(target.module, nn.Sequential):  # its forward would run the delta layer as a stage
            raise UnsupportedModuleError(
                f"{target.end!r} is an nn.Sequential, which runs every child module in turn, so a delta layer "
                "cannot live inside it; address the module that contains it, or the modules inside it, instead."
            )


def free_name(targets: Sequence[Target], requested: str | None, stem: str) -> str:
    """A delta name no module of `targets` uses yet: `requested` (LifecycleError if taken), else
    `stem`, ``stem_1``, ..."""

    def taken(candidate: str) -> bool:
        for target in targets:
            module = target.module
            if candidate in module._modules or hasattr(module, candidate):
                return True
            if target.is_span and candidate in getattr(site_of(target.modules[0]), "span_starts", {}):
                return True
        return False

    if requested is not None:
        if taken(requested):
            raise LifecycleError(f"a delta or attribute named {requested!r} already exists on a target module; pick another name")
        return requested
    candidate, n = stem, 0
    while taken(candidate):
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def in_layer(model: nn.Module, name: str, roles: Sequence[str], paths: Sequence[str], index: str, strict: bool) -> list[str]:
    """The `paths` inside layer `index` of their stack (the layer whose own name is `index`, as the
    original's key kept it), for the original's indexed names (``block@.0.attn@.q@``)."""
    stacks = {role.partition(".")[0] for role in roles if role.partition(".")[0] in STACKS}
    layer_roles = [f"{stack}.layer" for stack in sorted(stacks)] or ["layer"]
    layers = [p for p in resolve_roles(model, layer_roles, strict=False) if p.rpartition(".")[2] == index]
    inside = [p for p in paths if any(p == layer or p.startswith(layer + ".") for layer in layers)]
    if not inside and strict:
        raise StructureError(f"{name!r} names layer {index}, which this {type(model).__name__} does not have "
                             f"(its layers: {len(resolve_roles(model, layer_roles, strict=False))}).")
    return inside


def _original_vocabulary(model: nn.Module, name: str, roles: bool, what: str) -> bool:
    """Whether the module name `name`, which matches no module, is read as the original OpenDelta's
    common-structure name (``attn``, ``ff``, ``layer_norm``...), as its example configs wrote them
    for every family; a warning says so (NoMatchError in strict mode)."""
    if roles or name not in VOCABULARY or find_modules(model, [name], strict=False):
        return False
    if is_strict():
        raise NoMatchError(name, suggest(name, [p for p, _ in backbone_modules(model)]), what)
    warnings.warn(
        f"{what} {name!r} names no module; read as the original OpenDelta's common-structure name "
        f"({', '.join(VOCABULARY[name])})", OriginalBehaviourWarning, stacklevel=4,
    )
    return True


def _renamed(model: nn.Module, name: str, what: str) -> list[str]:
    """`name`, or today's names of the modules it addressed where transformers 5 renamed them and
    `name` matches nothing (with a warning; NoMatchError in strict mode): see structure/renamed.py."""
    if find_modules(model, [name], strict=False):
        return [name]
    new = current_name(model, name)
    if new is None:
        return [name]
    if is_strict():
        raise NoMatchError(name, list(new), what)
    shown = " and ".join(repr(n) for n in new)
    warnings.warn(f"{what} {name!r} names no module; transformers 5 calls it {shown} in this family, which is used",
                  OriginalBehaviourWarning, stacklevel=4)
    return list(new)


def tied_targets(backbone_model: nn.Module, targets: list[Target]) -> list[Target]:
    """The linear layers (not among `targets`) whose weight is tied to one of `targets`' (an LM head tied to the
    input embeddings). Another embedding sharing the weight is not added: seq2seq models keep one that no forward calls."""
    weights = {id(t.module.weight) for t in targets if isinstance(getattr(t.module, "weight", None), nn.Parameter)}
    chosen = {t.path for t in targets}
    tied = [
        path
        for path, module in backbone_model.named_modules()
        if path not in chosen and isinstance(module, nn.Linear) and id(module.weight) in weights
    ]
    return targets_at(backbone_model, tied)[0]
