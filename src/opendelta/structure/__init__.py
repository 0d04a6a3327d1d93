"""Common structure: role names (``attn.q``, ``ffn.down``...) that mean the same place in every family.

A *role* names a kind of module in a transformer (the query projection, the feed-forward down
projection, the final norm). Family knowledge is data (:mod:`opendelta.structure.families`): for
each transformers ``model_type`` a table from role to module-name patterns. A role may carry a
stack qualifier (``decoder.attn.q``: only the decoder's query projections).

A model may hold several backbones (a classification head around one, a user's module around
two): each mapped sub-model resolves with its own table, and the paths come back in model order.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from opendelta.addressing import backbone_modules, find_modules, is_delta_module
from opendelta.config import check_name_list
from opendelta.errors import StructureError
from opendelta.structure.families import FAMILIES, WHOLE_STACK, RoleTable
from opendelta.structure.inference import infer_table

#: the stack roles; each may also prefix another role as a qualifier (``encoder.attn.q``)
STACKS: dict[str, str] = {
    "encoder": "the encoder stack of an encoder-decoder",
    "decoder": "the decoder stack of an encoder-decoder",
    "text": "the text tower of a dual encoder (CLIP)",
    "vision": "the vision tower of a dual encoder (CLIP)",
}

#: every role, in the order role_map prefers when one module plays several
ROLES: dict[str, str] = {
    **STACKS,
    "embed": "input embedding (token embeddings; patch embeddings for vision)",
    "layer": "one repeated transformer layer (block)",
    "attn": "the self-attention block of a layer",
    "attn.qkv": "fused query/key/value projection",
    "attn.q": "attention query projection (the fused qkv projection where there is no separate one)",
    "attn.k": "attention key projection (or the fused qkv projection)",
    "attn.v": "attention value projection (or the fused qkv projection)",
    "attn.o": "attention output projection",
    "xattn": "the cross-attention block of a decoder layer (encoder-decoders)",
    "xattn.q": "cross-attention query projection",
    "xattn.k": "cross-attention key projection",
    "xattn.v": "cross-attention value projection",
    "xattn.o": "cross-attention output projection",
    "ffn": "the feed-forward block of a layer (where one module holds it)",
    "ffn.up": "feed-forward up (first) projection",
    "ffn.gate": "feed-forward gate projection (gated MLPs)",
    "ffn.down": "feed-forward down (last) projection",
    "experts": "the fused experts of a mixture-of-experts layer (3-D expert weights in one module)",
    "norm.attn": "the layer norm of the attention sub-layer (pre- or post-norm)",
    "norm.xattn": "the layer norm of the cross-attention sub-layer",
    "norm.ffn": "the layer norm of the feed-forward sub-layer (pre- or post-norm)",
    "norm.final": "the norm after the last layer of a stack",
    "lm_head": "the output projection to the vocabulary",
}


@dataclass
class Backbone:
    """One sub-model and the role table it resolves with."""

    path: str  #: where it sits in the model ("" for the model itself)
    module: nn.Module
    model_type: str | None
    table: RoleTable
    source: str  #: "table" (a family mapping) or "inferred" (from the module tree)
    notes: list[str] = field(default_factory=list)

    def paths(self, patterns: Sequence[str]) -> list[str]:
        """Model paths (not backbone-relative) of the modules `patterns` match in this backbone."""
        found = find_modules(self.module, patterns, strict=False) if patterns else []
        return [_join(self.path, p) for p in found]

    def role_paths(self, role: str) -> list[str]:
        """Paths of the modules that play `role` here (unqualified role); empty if the family lacks it."""
        if role in STACKS and WHOLE_STACK.get(self.model_type or "") == role:
            return [self.path]
        return self.paths(self.table.get(role, ()))

    @property
    def label(self) -> str:
        where = f" at {self.path!r}" if self.path else ""
        return f"{self.model_type or 'unknown-type'} model ({type(self.module).__name__}{where})"


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def own_model_type(module: nn.Module) -> str | None:
    """The transformers ``model_type`` of `module`'s own config, if it has one."""
    kind = getattr(getattr(module, "config", None), "model_type", None)
    return kind if isinstance(kind, str) and kind else None


def model_type(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of `model` or of the first sub-module that has a config."""
    for module in model.modules():
        kind = own_model_type(module)
        if kind is not None:
            return kind
    return None


def find_backbones(model: nn.Module) -> list[Backbone]:
    """The sub-models of `model` with a role table, outermost first, in model order.

    A sub-module whose ``model_type`` has a family table is one backbone. A configured
    sub-module with no table and no mapped sub-model inside is one too, as is a model with no
    config at all: their roles are inferred (:mod:`opendelta.structure.inference`), and inference
    that finds no layer stack raises StructureError.
    """
    found: list[Backbone] = []

    def visit(path: str, module: nn.Module, inside_configured: bool) -> bool:
        kind = own_model_type(module)
        if kind in FAMILIES:
            found.append(Backbone(path, module, kind, FAMILIES[kind], "table"))
            return True
        hit = False
        for name, child in module.named_children():
            if not is_delta_module(child):
                hit |= visit(_join(path, name), child, inside_configured or kind is not None)
        if not hit and kind is not None and not inside_configured:
            found.append(unmapped_backbone(path, module, kind))
            return True
        return hit

    if not visit("", model, False):
        found.append(unmapped_backbone("", model, None))
    return found


def unmapped_backbone(path: str, module: nn.Module, kind: str | None) -> Backbone:
    """A backbone with no family table: its roles are inferred from the module tree."""
    table, notes = infer_table(module)
    return Backbone(path, module, kind, table, "inferred", notes)


def split_role(role: str) -> tuple[str | None, str]:
    """``"decoder.attn.q"`` -> ``("decoder", "attn.q")``; ``"attn.q"`` -> ``(None, "attn.q")``.

    Raises StructureError for a spelling that is not a role, naming the close ones.
    """
    if not isinstance(role, str):
        raise StructureError(f"a common-structure role must be a string, got {role!r}")
    if role in ROLES:
        return None, role
    stack, _, rest = role.partition(".")
    if stack in STACKS and rest in ROLES and rest not in STACKS:
        return stack, rest
    spellings = list(ROLES) + [f"{s}.{r}" for s in STACKS for r in ROLES if r not in STACKS]
    close = difflib.get_close_matches(role, spellings, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise StructureError(
        f"unknown common-structure role {role!r}.{hint} Roles: {', '.join(ROLES)}; "
        f"a stack ({', '.join(STACKS)}) may prefix a role, e.g. 'decoder.attn.q'."
    )


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(root == "" or path == root or path.startswith(root + ".") for root in roots)


def _resolve(backbones: Sequence[Backbone], role: str) -> tuple[list[str], str | None]:
    """Paths of `role` across the backbones, and why some backbone that should have it has not.

    An unqualified role must exist in every backbone; a qualified one (``decoder.attn.q``) in
    every backbone that has that stack, and at least one must have it.
    """
    stack, base = split_role(role)
    found: list[str] = []
    problem: str | None = None
    stacked = 0
    for backbone in backbones:
        roots = backbone.role_paths(stack) if stack is not None else None
        if stack is not None and not roots:
            continue
        stacked += 1
        paths = backbone.role_paths(base)
        if roots is not None:
            paths = [p for p in paths if _under(p, roots)]
        if paths:
            found.extend(paths)
        elif problem is None:
            where = f"the {stack} of this {backbone.label}" if stack else f"this {backbone.label}"
            problem = f"role {base!r} ({ROLES[base]}) does not exist in {where}"
            if backbone.source == "inferred":
                problem += " (no family table covers it, and structural inference found no such module)"
    if stack is not None and not stacked:
        labels = ", ".join(b.label for b in backbones)
        problem = f"{labels} has no {stack} stack ({STACKS[stack]}), so {role!r} addresses nothing; write {base!r}"
    return found, problem


def resolve_roles(model: nn.Module, roles: Sequence[str], *, strict: bool = True) -> list[str]:
    """Paths of the modules that play `roles` in `model`, in model order, each once.

    With `strict` (the default) every role must exist in every backbone of the model; without
    it, roles a family lacks are skipped (method defaults like ``("attn", "ffn")`` on a model
    with no ``ffn`` block). Either way, nothing found at all is a StructureError.
    """
    check_name_list(roles, "roles")
    for role in roles:
        split_role(role)
    backbones = find_backbones(model)
    found: set[str] = set()
    problems: list[str] = []
    for role in roles:
        paths, problem = _resolve(backbones, role)
        found.update(paths)
        if problem is not None:
            problems.append(problem)
    if problems and (strict or not found):
        available = sorted({r for b in backbones for r in ROLES if b.role_paths(r)}, key=list(ROLES).index)
        raise StructureError(
            f"{problems[0]}. Roles available here: {', '.join(available) or 'none'}. "
            "Use one of them, or name the modules instead (modified_modules=[...] with common_structure off)."
        )
    return [path for path, _ in backbone_modules(model) if path in found]


def role_paths(model: nn.Module) -> dict[str, list[str]]:
    """Every role present in `model` -> the paths that play it (unqualified roles, model order)."""
    result: dict[str, list[str]] = {}
    for backbone in find_backbones(model):
        for role in ROLES:
            paths = backbone.role_paths(role)
            if paths:
                result.setdefault(role, []).extend(paths)
    return result


def role_map(model: nn.Module) -> dict[str, str]:
    """``{path: role}`` for every module that plays a role (for display); a module that plays
    several (a fused qkv is also attn.q/k/v) gets the first in :data:`ROLES` order."""
    claimed: dict[str, str] = {}
    for role, paths in role_paths(model).items():
        for path in paths:
            claimed.setdefault(path, role)
    order = {path: i for i, (path, _) in enumerate(backbone_modules(model))}
    return dict(sorted(claimed.items(), key=lambda item: order.get(item[0], -1)))


__all__ = [
    "FAMILIES",
    "ROLES",
    "STACKS",
    "Backbone",
    "find_backbones",
    "model_type",
    "resolve_roles",
    "role_map",
    "role_paths",
    "split_role",
]
