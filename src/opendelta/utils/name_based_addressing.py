"""The original OpenDelta's name matching helpers, on opendelta's addressing (:mod:`opendelta.addressing`).

opendelta's rules are the original's with its quirks fixed: a tail matches at a dot boundary, and an
``[r]`` regex must match the whole path or a whole dot-boundary tail of it.
"""

from __future__ import annotations

from collections.abc import Sequence

from opendelta.addressing import matches


def endswith_in(str_a: str, list_b: Sequence[str]) -> bool:
    """Whether the module path `str_a` is addressed by any name (tail or ``[r]`` regex) of `list_b`."""
    return any(matches(str_a, b) for b in list_b)


def is_child_key(str_a: str, list_b: Sequence[str]) -> bool:
    """Whether `str_a` is one of `list_b` or lies under one of them."""
    return any(str_a == b or str_a.startswith(b + ".") for b in list_b)


def superstring_in(str_a: str, list_b: Sequence[str]) -> bool:
    """Whether any string of `list_b` contains `str_a`."""
    return any(str_a in b for b in list_b)
