"""Name-based addressing: which sub-modules of a model a list of name patterns refers to.

A pattern is one of
- a full dotted path (``encoder.layer.3.attention.self.query``);
- a tail: it matches every module whose path ends with it at a dot boundary (``"query"``,
  ``"output.dense"``; ``"uery"`` matches nothing);
- ``"[r]<regex>"``: the regular expression must match the full path, or a dot-boundary tail of it,
  entirely (``"[r]layer\\.[0-5]\\.attention"``).

Delta modules that opendelta added to the model are never addressable.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from opendelta.errors import NoMatchError, PatternError

REGEX_PREFIX = "[r]"


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
    if isinstance(patterns, str):
        raise PatternError(f"{what} must be a list of names, got the single string {patterns!r}; write [{patterns!r}].")
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
        raise NoMatchError(unused[0], suggest(unused[0], paths), what)
    return remove_excluded(model, matched, exclude, paths)


def remove_excluded(
    model: nn.Module, matched: Sequence[str], exclude: Sequence[str] | None, paths: Sequence[str] | None = None
) -> list[str]:
    """`matched` without the paths that are, or lie under, a module matched by `exclude`."""
    if not exclude:
        return list(matched)
    if paths is None:
        paths = [path for path, _ in backbone_modules(model)]
    excluded, unused = _match(paths, exclude, "exclude_modules")
    if unused:
        raise NoMatchError(unused[0], suggest(unused[0], paths), "exclude_modules")
    gone = set(excluded)
    return [p for p in matched if not any(a in gone for a in _ancestors(p))]


def find_modules_in(paths: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The `paths` any of `patterns` address; patterns that match nothing are skipped."""
    return _match(paths, patterns, "patterns")[0]


def match_names(names: Sequence[str], patterns: Sequence[str], what: str) -> list[str]:
    """The `names` (module or parameter paths) that `patterns` address; every pattern must match."""
    matched, unused = _match(names, patterns, what)
    if unused:
        raise NoMatchError(unused[0], suggest(unused[0], names), what)
    return matched


def _ancestors(path: str) -> Iterator[str]:
    """The path and every ancestor path: ``a.b.c`` -> ``a.b.c``, ``a.b``, ``a``."""
    yield path
    end = path.rfind(".")
    while end != -1:
        yield path[:end]
        end = path.rfind(".", 0, end)
