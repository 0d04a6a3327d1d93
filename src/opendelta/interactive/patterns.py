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
                    if part.isdigit():
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
    ``(?:[0-9]|1[0-9]|2[0-3])``."""
    by_stem: dict[str, list[str]] = defaultdict(list)
    for number in sorted(set(numbers), key=lambda n: (len(n), n)):
        by_stem[number[:-1]].append(number[-1])
    alternatives = [stem + _digit_class(digits) for stem, digits in by_stem.items()]
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def _digit_class(digits: list[str]) -> str:
    if len(digits) == 1:
        return digits[0]
    values = sorted(int(d) for d in digits)
    pieces: list[str] = []
    start = prev = values[0]
    for value in [*values[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        pieces.append(f"{start}-{prev}" if prev - start >= 2 else "".join(str(v) for v in range(start, prev + 1)))
        if value is not None:
            start = prev = value
    return "[" + "".join(pieces) + "]"


def compress_selection(model: nn.Module, selected: Iterable[str]) -> list[str]:
    """The shortest patterns that address exactly the modules at `selected` paths of `model`."""
    return SelectionCompressor.for_model(model).compress(selected)
