"""Compress the names of grouped sibling modules: ``0-11``, ``1-3,5-7``, ``query,key,value``."""

from __future__ import annotations

from collections.abc import Sequence


def compress_names(names: Sequence[str]) -> str:
    """Join sibling names with commas, folding runs of three or more consecutive integers.

    Order is kept: ``["0", "1", "2", "5", "6"]`` gives ``"0-2,5,6"``; other names pass through.
    """
    runs: list[list[str]] = []  # each run: consecutive integers, or one non-integer name
    for name in names:
        previous = runs[-1][-1] if runs else ""
        if _is_int(name) and _is_int(previous) and int(name) == int(previous) + 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    parts: list[str] = []
    for run in runs:
        parts.extend([f"{run[0]}-{run[-1]}"] if len(run) >= 3 else run)
    return ",".join(parts)


def _is_int(name: str) -> bool:
    """Plain non-negative integers only; ``"01"`` is a name, not a number."""
    return name.isascii() and name.isdigit() and str(int(name)) == name  # "²".isdigit() is true
