"""Name-based addressing: which sub-modules of a model a list of name patterns refers to.

A pattern is one of
- a full dotted path (``encoder.layer.3.attention.self.query``);
- a tail: it matches every module whose path ends with it at a dot boundary (``"query"``,
  ``"output.dense"``; ``"uery"`` matches nothing);
- ``"[r]<regex>"``: the regular expression must match the full path, or a dot-boundary tail of it,
  entirely (``"[r]layer\\.[0-5]\\.attention"``).

A *span* ``"<start>-><end>"`` (each side a pattern as above) addresses a pair of modules, for
methods that take their input at one module and add their result at a later one (a parallel
adapter across BERT's ``intermediate.dense->output.dense``). Each start is paired with the end
that shares its deepest ancestor (the same layer) and comes after it (:func:`pair_spans`);
:mod:`opendelta.targets` resolves whole pattern lists, spans and roles included, into targets.

Delta modules that opendelta added to the model are never addressable.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from opendelta.config import check_name_list
from opendelta.errors import NoMatchError, PatternError
from opendelta.leniency import relax

REGEX_PREFIX = "[r]"
SPAN_SEP = "->"


def is_delta_module(module: nn.Module) -> bool:
    """Whether `module` is a delta layer added by opendelta (or anything marking itself as one)."""
    return bool(getattr(type(module), "is_delta_module", False))


def backbone_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(path, module)`` for every module of the backbone, skipping delta layers and the root."""
    skipping: str | None = None  # named_modules is pre-order, so a delta's subtree is contiguous
    for path, module in model.named_modules():
        if not path:
            continue
        if skipping is not None and path.startswith(skipping):
            continue
        skipping = None
        if is_delta_module(module):
            skipping = path + "."
            continue
        yield path, module


def tails(path: str) -> Iterator[str]:
    """All dot-boundary tails of a path, longest first: ``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``."""
    yield path
    start = path.find(".")
    while start != -1:
        yield path[start + 1 :]
        start = path.find(".", start + 1)


@dataclass(frozen=True)
class _Regex:
    text: str
    compiled: re.Pattern[str]


def _compile(patterns: Sequence[str], what: str) -> tuple[set[str], list[_Regex]]:
    check_name_list(patterns, what)
    plain: set[str] = set()
    regexes: list[_Regex] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern or pattern == REGEX_PREFIX:
            raise PatternError(f"{what} holds {pattern!r}; every entry must be a non-empty module name or '[r]regex'.")
        if pattern.startswith(REGEX_PREFIX):
            body = pattern[len(REGEX_PREFIX) :]
            try:
                compiled = re.compile(rf"(?:.*\.)?(?:{body})")
            except re.error as exc:
                raise PatternError(f"{what} pattern {pattern!r} is not a valid regular expression: {exc}.") from exc
            regexes.append(_Regex(pattern, compiled))
        else:
            plain.add(pattern)
    return plain, regexes


def _match(paths: Sequence[str], patterns: Sequence[str], what: str) -> tuple[list[str], list[str]]:
    """Paths matched by any pattern (in model order) and the patterns that matched nothing."""
    plain, regexes = _compile(patterns, what)
    used: set[str] = set()
    matched: list[str] = []
    for path in paths:
        hit = False
        if plain:
            for tail in tails(path):
                if tail in plain:
                    used.add(tail)
                    hit = True
        for rx in regexes:
            if rx.compiled.fullmatch(path):
                used.add(rx.text)
                hit = True
        if hit:
            matched.append(path)
    unused = [p for p in dict.fromkeys(patterns) if p not in used]
    return matched, unused


def matches(path: str, pattern: str) -> bool:
    """Whether `pattern` (a path, a tail name or an ``[r]`` regex) addresses the module at `path`."""
    return bool(_match([path], [pattern], "pattern")[0])


def suggest(pattern: str, paths: Sequence[str], limit: int = 5) -> list[str]:
    """Up to `limit` module names (tails or full paths) that look like `pattern`."""
    needle = pattern[len(REGEX_PREFIX) :].replace("\\", "") if pattern.startswith(REGEX_PREFIX) else pattern
    candidates = {tail for path in paths for tail in tails(path)}
    return difflib.get_close_matches(needle, sorted(candidates, key=len), n=limit, cutoff=0.5)


def find_modules(
    model: nn.Module,
    patterns: Sequence[str],
    exclude: Sequence[str] | None = None,
    *,
    what: str = "modified_modules",
    strict: bool = True,
) -> list[str]:
    """Paths of the modules that `patterns` address, minus those in or under an `exclude` match.

    With `strict` (the default) every pattern must match at least one module, else
    :class:`NoMatchError` names it with the closest module names; without it, patterns that match
    nothing are skipped (family tables list alternatives). Touches nothing; linear in the number of
    modules.
    """
    paths = [path for path, _ in backbone_modules(model)]
    matched, unused = _match(paths, patterns, what)
    if unused and strict:
        matched, unused = _with_aliases(model, paths, matched, unused, what)
    if unused and strict:
        raise NoMatchError(unused[0], suggest(unused[0], paths), what)
    return remove_excluded(model, matched, exclude, paths)


def _with_aliases(
    model: nn.Module, paths: Sequence[str], matched: Sequence[str], patterns: Sequence[str], what: str
) -> tuple[list[str], list[str]]:
    """`matched` plus the modules that `patterns` address under a second path (a module registered
    twice, ``model.alias = model.encoder.layer[0]``, which ``named_modules()`` lists once), given by
    their canonical paths in model order; and the patterns that still match nothing."""
    canonical = {id(module): path for path, module in backbone_modules(model)}
    aliases = {
        path: canonical[id(module)]
        for path, module in model.named_modules(remove_duplicate=False)
        if id(module) in canonical and canonical[id(module)] != path
    }
    if not aliases:
        return list(matched), list(patterns)
    via_alias, unused = _match(list(aliases), patterns, what)
    found = set(matched) | {aliases[p] for p in via_alias}
    return [p for p in paths if p in found], unused


def remove_excluded(
    model: nn.Module, matched: Sequence[str], exclude: Sequence[str] | None, paths: Sequence[str] | None = None
) -> list[str]:
    """`matched` without the paths that are, or lie under, a module matched by `exclude`."""
    gone = excluded_paths(model, exclude, paths)
    return [p for p in matched if not is_under(p, gone)]


def excluded_paths(model: nn.Module, exclude: Sequence[str] | None, paths: Sequence[str] | None = None) -> set[str]:
    """Paths of the modules `exclude` matches (through aliases too); every pattern must match one."""
    if not exclude:
        return set()
    if paths is None:
        paths = [path for path, _ in backbone_modules(model)]
    excluded, unused = _match(paths, exclude, "exclude_modules")
    if unused:
        excluded, unused = _with_aliases(model, paths, excluded, unused, "exclude_modules")
    if unused:
        raise NoMatchError(unused[0], suggest(unused[0], paths), "exclude_modules")
    return set(excluded)


def is_under(path: str, roots: set[str]) -> bool:
    """Whether `path` is one of `roots` or lies under one of them."""
    return any(a in roots for a in ancestors(path))


def split_span(text: str) -> tuple[str, str] | None:
    """``"a->b"`` -> ``("a", "b")`` (each side stripped); None for a name that is not a span."""
    if not isinstance(text, str) or SPAN_SEP not in text:
        return None
    start, _, end = (part.strip() for part in text.partition(SPAN_SEP))
    if not start or not end or SPAN_SEP in end:
        raise PatternError(f"span {text!r} must be '<start module>{SPAN_SEP}<end module>', one of each")
    return start, end


def span_path(start: str, end: str) -> str:
    """The path of the span from `start` to `end` (the module itself when they are the same)."""
    return start if start == end else f"{start}{SPAN_SEP}{end}"


def _shared_depth(a: str, b: str) -> int:
    depth = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        depth += 1
    return depth


def pair_spans(
    text: str, starts: Sequence[str], ends: Sequence[str], position: dict[str, int], *, strict: bool = True
) -> list[tuple[str, str]]:
    """``(start, end)`` pairing each of `starts` with an end of `ends`: among those sharing its deepest
    ancestor (its block), the first at or after it in model order (`position`: path -> index).

    Ends no start claims are left alone. With `strict`, a start without such an end, or an end
    claimed by two starts, is a PatternError naming it; without, those starts are skipped.
    """
    pairs: dict[str, str] = {}
    problem = None
    for start in starts:
        depths = {end: _shared_depth(start, end) for end in ends}
        closest = [end for end in ends if depths[end] == max(depths.values())]
        later = sorted((e for e in closest if position.get(e, -1) >= position.get(start, -1)), key=position.get)
        if not later:
            problem = problem or f"start {start!r} has no end after it in its block"
        elif later[0] in pairs.values():
            problem = problem or f"end {later[0]!r} is the closest end of two starts"
        else:
            pairs[start] = later[0]
    if strict and problem:
        raise PatternError(
            f"span {text!r} must pair each start module with one end module in the same block, but {problem}; "
            "make each side name exactly the modules to pair (e.g. full paths, or a [r]regex per side)."
        )
    return list(pairs.items())


def match_names(names: Sequence[str], patterns: Sequence[str], what: str, *, strict: bool | None = True) -> list[str]:
    """The `names` (module or parameter paths) that `patterns` address; a pattern that matches
    nothing raises NoMatchError if `strict`, else (``False``, or ``None`` outside
    :func:`opendelta.leniency.is_strict` mode) warns naming it and its close candidates."""
    matched, unused = _match(names, patterns, what)
    for pattern in unused:
        relax(NoMatchError(pattern, suggest(pattern, names), what), strict)
    return matched


def ancestors(path: str) -> Iterator[str]:
    """The path and every ancestor path: ``a.b.c`` -> ``a.b.c``, ``a.b``, ``a``."""
    yield path
    end = path.rfind(".")
    while end != -1:
        yield path[:end]
        end = path.rfind(".", 0, end)
