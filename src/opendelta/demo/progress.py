"""Progress for the demos: a live bar on a terminal, a plain line every few seconds in a pipe or log."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

#: how often a line is written when stderr is not a terminal (a log gets about one line per interval)
LOG_INTERVAL_S = 10.0


class _LogLines(tqdm):
    """tqdm writing its state as whole lines: the start, then at most one line every LOG_INTERVAL_S
    seconds, then the end (a log file cannot redraw a line with a carriage return)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._last_write, self._last_n = float("-inf"), -1
        super().__init__(*args, leave=False, ascii=True, file=sys.stderr, ncols=100, **kwargs)

    def _write_line(self) -> None:
        if self.n != self._last_n:  # the count moved (rates and times always differ)
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
        self._last_write, self._last_n = time.monotonic(), self.n

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line on close: nothing to clear in a log
            return False
        if time.monotonic() - self._last_write >= LOG_INTERVAL_S:
            self._write_line()
        return True

    def close(self) -> None:
        if not self.disable:
            self._write_line()  # the final state, unless the last line already shows it
        super().close()


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal; elsewhere a line on stderr at most every LOG_INTERVAL_S seconds."""
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return _LogLines(iterable, **kwargs)
