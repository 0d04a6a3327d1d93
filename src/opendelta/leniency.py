"""Where opendelta is stricter than the original OpenDelta, and the one switch that chooses.

A script written for the original must run: where continuing cannot build a different delta than
the one asked for (an ``exclude`` name written for another family, training arguments in a delta
config dict), the strict check becomes a :class:`OriginalBehaviourWarning` naming the input and
the close candidates. ``opendelta.set_strict(True)`` (or ``OPENDELTA_STRICT=1`` in the
environment) turns those warnings back into the typed errors. docs/migrating_from_opendelta.md
lists every such place.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

from opendelta.errors import OpenDeltaError

_ENV = "OPENDELTA_STRICT"
_strict: bool | None = None  # None: read the environment


class OriginalBehaviourWarning(UserWarning):
    """Something the original OpenDelta accepted silently and opendelta would refuse in strict mode."""


def is_strict() -> bool:
    """Whether checks that the original OpenDelta did not make raise (True) or warn (False, the default)."""
    if _strict is not None:
        return _strict
    return os.environ.get(_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_strict(strict: bool) -> None:
    """Make the checks the original OpenDelta did not make raise (True) or warn (False) from now on."""
    global _strict
    if not isinstance(strict, bool):
        raise TypeError(f"set_strict() takes True or False, got {strict!r}")
    _strict = strict


@contextlib.contextmanager
def strict_mode(strict: bool = True) -> Iterator[None]:
    """``with strict_mode():`` the checks raise inside the block (tests, a careful pipeline)."""
    global _strict
    before = _strict
    set_strict(strict)
    try:
        yield
    finally:
        _strict = before


def relax(error: OpenDeltaError, strict: bool | None = None) -> None:
    """Raise `error` in strict mode (`strict`, else the global switch); otherwise warn with its message."""
    if is_strict() if strict is None else strict:
        raise error
    warnings.warn(
        f"{error} (accepted as the original OpenDelta did; opendelta.set_strict(True) makes this an error)",
        OriginalBehaviourWarning,
        stacklevel=3,
    )
