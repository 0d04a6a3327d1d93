"""The original OpenDelta's ``opendelta.utils.signature``: argument names of a function."""

from __future__ import annotations

import inspect
from collections import namedtuple
from collections.abc import Callable
from typing import Any

Signature = namedtuple("Signature", ["args", "varargs", "varkw", "defaults"])


def signature(f: Callable[..., Any]) -> Signature:
    """The argument names (without ``self``), ``*args`` and ``**kwargs`` names and defaults of `f`."""
    spec = inspect.getfullargspec(f)
    args = [a for a in spec.args + spec.kwonlyargs if a != "self"]
    return Signature(args, spec.varargs, spec.varkw, spec.defaults)


def get_arg_names(f: Callable[..., Any]) -> list[str]:
    """The names of `f`'s arguments (without ``self``)."""
    return signature(f).args


def get_arg_names_inside_func(func: Callable[..., Any]) -> list[str]:
    """The names of `func`'s arguments, called from inside it (the original's helper)."""
    return get_arg_names(func)
