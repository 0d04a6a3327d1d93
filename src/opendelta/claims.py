"""Which attached delta changed which backbone parameter, so each detach undoes exactly its own changes.

Two kinds of claims, kept outside the user's modules (nothing is stored on them):

- a ``requires_grad`` flag: a stack per parameter of (delta, flag before that delta set it).
  Releasing any entry restores exactly what the others expect, in any order: the top entry puts
  its saved flag back; an entry below hands its saved flag to the entry above it.
- a trained value (a backbone tensor the delta trains, e.g. an unfrozen head): one owner at a
  time, because one tensor holds one value and two deltas cannot both be served by it.

Owners are held by weak reference: an owner references its backbone, so a strong one would keep
every parameter key alive and a discarded model would never be freed.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from opendelta.errors import LifecycleError

_FLAGS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> [[ref to owner, flag before it set it], ...]
_VALUES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> ref to the attached delta that owns its value


def set_flag(param: nn.Parameter, owner: Any, flag: bool) -> None:
    """Set `param.requires_grad` to `flag` on behalf of `owner`; :func:`release_flag` undoes it."""
    release_flag(param, owner)  # the latest freeze of an owner goes on top
    _FLAGS.setdefault(param, []).append([weakref.ref(owner), param.requires_grad])
    param.requires_grad_(flag)


def release_flag(param: nn.Parameter, owner: Any) -> None:
    """Undo `owner`'s :func:`set_flag` on `param`, whatever other owners did since."""
    stack = _FLAGS.get(param)
    index = next((i for i, (ref, _) in enumerate(stack or ()) if ref() is owner), None)
    if stack is None or index is None:
        return
    before = stack.pop(index)[1]
    if index == len(stack):
        param.requires_grad_(before)
    else:
        stack[index][1] = before
    if not stack:
        del _FLAGS[param]


def value_owner(param: nn.Parameter) -> Any:
    """The attached delta that owns `param`'s value, or None."""
    ref = _VALUES.get(param)
    return ref() if ref is not None else None


def claim_value(param: nn.Parameter, owner: Any) -> None:
    """Record that `owner` (attached) owns `param`'s value; check :func:`value_owner` first."""
    _VALUES[param] = weakref.ref(owner)


def release_value(param: nn.Parameter, owner: Any) -> None:
    if value_owner(param) is owner:
        del _VALUES[param]


def check_value_free(param: nn.Parameter, name: str, owner: Any, action: str, also_free: Any = None) -> None:
    """Raise LifecycleError if an attached delta other than `owner` (and `also_free`, which is
    leaving) owns the value of backbone tensor `name`."""
    other = value_owner(param)
    if other is not None and other is not owner and other is not also_free:
        raise LifecycleError(
            f"cannot {action}: backbone tensor {name!r} is trained by delta {other.name!r}, which is attached, and one "
            f"tensor holds one value, so two attached deltas cannot both train it: they take turns. Detach "
            f"{other.name!r} first."
        )
