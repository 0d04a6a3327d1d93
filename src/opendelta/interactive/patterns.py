"""Turn a set of selected module paths into the shortest list of patterns that addresses exactly that set.

The patterns use the addressing syntax (tails, full paths, ``[r]regex``) and are checked against
every module path of the model, so ``find_modules(model, patterns)`` gives back the selection, no
more and no less.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

from torch import nn

from opendelta.addressing import REGEX_PREFIX, backbone_modules, match_names, suggest, tails
from opendelta.errors import NoMatchError


class SelectionCompressor:
    """Index of a model's module paths that compresses selections of them into exact patterns.

    Built once per model (linear in modules times depth), then ``compress`` is cheap enough to run
    on every click.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._index = {path: i for i, path in enumerate(self.paths)}
        self._by_tail: dict[str, list[int]] = defaultdict(list)
        for i, path in enumerate(self.paths):
            for tail in tails(path):
                self._by_tail[tail].append(i)

    @classmethod
    def for_model(cls, model: nn.Module) -> SelectionCompressor:
        """An index of every addressable module of `model` (delta layers excluded)."""
        return cls([path for path, _ in backbone_modules(model)])

    def indices(self, selected: Iterable[str]) -> list[int]:
        """Model-order positions of `selected`; an unknown path raises NoMatchError naming it."""
        found: set[int] = set()
        for path in selected:
            if not isinstance(path, str) or path not in self._index:
                raise NoMatchError(str(path), suggest(str(path), self.paths), "selected module")
            found.add(self._index[path])
        return sorted(found)

    def compress(self, selected: Iterable[str]) -> list[str]:
        """Patterns addressing exactly `selected`, in model order of the first module each covers.

        Preference: a tail shared by several selected modules (``"query"``), then a regex over one
        varying layer number (``"[r]encoder\\.layer\\.[0-5]\\.attention\\.self\\.query"``), then
        the full path; a path that is also the tail of another path is anchored (``"[r]^..."``).
        """
        chosen = set(self.indices(selected))
        found: list[tuple[int, str]] = []
        singles: list[int] = []
        covered: set[int] = set()
        for i in sorted(chosen):
            if i in covered:
                continue
            tail, hits = self._shortest_exact_tail(i, chosen)
            if tail is not None and len(hits) > 1:
                found.append((hits[0], tail))
                covered.update(hits)
            else:
                singles.append(i)
        found.extend(self._number_regexes(singles))
        return [pattern for _, pattern in sorted(found)]

    def _shortest_exact_tail(self, i: int, chosen: set[int]) -> tuple[str | None, list[int]]:
        for tail in reversed(list(tails(self.paths[i]))):
            hits = self._by_tail[tail]
            if all(h in chosen for h in hits):
                return tail, hits
        return None, []

    def _number_regexes(self, singles: list[int]) -> list[tuple[int, str]]:
        """Group paths that differ in one numeric segment into regexes; the rest become full paths."""
        found: list[tuple[int, str]] = []
        remaining = sorted(singles)
        while len(remaining) > 1:
            groups: dict[tuple[int, tuple[str, ...], tuple[str, ...]], list[int]] = defaultdict(list)
            for i in remaining:
                parts = self.paths[i].split(".")
                for k, part in enumerate(parts):
                    if part.isascii() and part.isdigit():  # "²".isdigit() is true, and int("²") fails
                        groups[(k, tuple(parts[:k]), tuple(parts[k + 1 :]))].append(i)
            best_key, best = max(groups.items(), key=lambda item: len(item[1]), default=(None, []))
            if len(best) < 2:
                break
            k, before, after = best_key
            numbers = [self.paths[i].split(".")[k] for i in best]
            body = r"\.".join([*map(re.escape, before), _numbers_regex(numbers), *map(re.escape, after)])
            found.append((best[0], self._exact_regex(body, best)))
            taken = set(best)
            remaining = [i for i in remaining if i not in taken]
        for i in remaining:
            path = self.paths[i]
            exact = self._by_tail[path] == [i]
            found.append((i, path if exact else REGEX_PREFIX + "^" + re.escape(path)))
        return found

    def _exact_regex(self, body: str, members: list[int]) -> str:
        """`body` as a pattern, anchored at the root when it would also match deeper tails."""
        wanted = [self.paths[i] for i in members]
        pattern = REGEX_PREFIX + body
        if match_names(self.paths, [pattern], "selection") == wanted:
            return pattern
        return REGEX_PREFIX + "^" + body


def _numbers_regex(numbers: Sequence[str]) -> str:
    """A regex matching exactly these decimal strings: ``0..5`` -> ``[0-5]``, ``0..23`` ->
    ``(?:[0-9]|1[0-9]|2[0-3])``, ``0,2,4`` -> ``[024]``."""
    unique = sorted(set(numbers), key=lambda n: (len(n), n))
    if any(n != str(int(n)) for n in unique):  # leading zeros: no arithmetic, list them
        return "(?:" + "|".join(unique) + ")"
    digits: dict[tuple[str, int], set[int]] = defaultdict(set)  # (fixed prefix, free digits after) -> digit
    for lo, hi in _runs(sorted(int(n) for n in unique)):
        for prefix, first, last, free in _range_pieces(lo, hi):
            digits[(prefix, free)].update(range(first, last + 1))
    alternatives = [
        prefix + _digit_class(sorted(ds)) + ("" if free == 0 else "[0-9]" if free == 1 else f"[0-9]{{{free}}}")
        for (prefix, free), ds in digits.items()
    ]
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers: ``[0, 1, 2, 5]`` -> ``[(0, 2), (5, 5)]``."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def _range_pieces(lo: int, hi: int) -> list[tuple[str, int, int, int]]:
    """Split ``lo..hi`` into pieces ``prefix + [first-last] + free digits`` (the classic range regex)."""
    pieces = []
    while lo <= hi:
        free = 0
        while lo > 0 and lo % 10 ** (free + 1) == 0 and lo + 10 ** (free + 1) - 1 <= hi:
            free += 1
        step = 10**free
        first = lo // step % 10
        last = min(9, first + (hi - lo + 1) // step - 1)
        prefix = lo // (step * 10)
        pieces.append((str(prefix) if prefix else "", first, last, free))
        lo += (last - first + 1) * step
    return pieces


def _digit_class(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    parts = [f"{a}-{b}" if b - a >= 2 else "".join(map(str, range(a, b + 1))) for a, b in _runs(values)]
    return "[" + "".join(parts) + "]"


def compress_selection(model: nn.Module, selected: Iterable[str]) -> list[str]:
    """The shortest patterns that address exactly the modules at `selected` paths of `model`."""
    return SelectionCompressor.for_model(model).compress(selected)
