"""Where a delta runs among the deltas sharing its modules: its ``order=`` position and the
creation stamp that breaks ties (see :attr:`opendelta.DeltaBase.order_key`)."""

from __future__ import annotations

import threading
import time
from typing import Any

from opendelta.config import is_finite_number
from opendelta.errors import DeltaConfigError

_stamp_lock = threading.Lock()
_last_stamp = 0


def creation_stamp() -> int:
    """Nanoseconds since the epoch, strictly increasing within this process, so a delta created
    later gets a larger stamp (across processes too, as far as their clocks agree)."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


def checked_position(order: Any) -> float:
    """`order` if it is a finite number, else DeltaConfigError."""
    if not is_finite_number(order):
        raise DeltaConfigError(
            f"order must be a finite number, got {order!r}: a negative order runs the delta before the deltas "
            "of the default order 0 on the modules it shares with them, a positive one after them."
        )
    return order
