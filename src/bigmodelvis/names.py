"""Compress the names of grouped sibling modules: ``0-11``, ``1-3,5-7``, ``query,key,value``."""

from __future__ import annotations

from collections.abc import Sequence


def compress_names(names: Sequence[str]) -> str:
    """Join sibling names with commas, folding runs of three or more consecutive integers.

    Order is kept: ``["0", "1", "2", "5", "6"]`` gives ``"0-2,5,6"``; other names pass through.
    """
    parts: list[str] = []
    run_start: int | None = None
    run_end: int | None = None

    def close_run() -> None:
        if run_start is None:
            return
        if run_end - run_start >= 2:
            parts.append(f"{run_start}-{run_end}")
        else:
            parts.extend(str(n) for n in range(run_start, run_end + 1))

    for name in names:
        number = int(name) if name.isdigit() and str(int(name)) == name else None
        if number is not None and run_end is not None and number == run_end + 1:
            run_end = number
            continue
        close_run()
        run_start = run_end = number
        if number is None:
            parts.append(name)
    close_run()
    return ",".join(parts)
