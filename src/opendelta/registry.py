"""The registry of delta types: ``delta_type`` string <-> (config class, delta model class).

It is the one record of which classes a type names: registering writes nothing onto the classes.
A method class that declares ``delta_type = "..."`` registers itself when it is defined; a class
that does not learns its type (and its config class) from here, or inherits them from its base.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from opendelta.errors import DeltaConfigError, DuplicateDeltaTypeError, UnknownDeltaTypeError

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig
    from opendelta.delta_base import DeltaBase

_REGISTRY: dict[str, tuple[type[DeltaConfig], type[DeltaBase]]] = {}
_TYPE_OF: dict[type, str] = {}  # every registered config and model class -> its delta_type


def _declared(cls: type, attribute: str) -> Any:
    """The plain value `cls` declares or inherits for `attribute` (None if only a registry lookup gives it)."""
    for klass in cls.__mro__:
        if attribute in klass.__dict__:
            value = klass.__dict__[attribute]
            return None if isinstance(value, (RegisteredType, RegisteredConfig)) else value
    return None


def register(delta_type: str, config_cls: type[DeltaConfig], model_cls: type[DeltaBase], *, replace: bool = False) -> None:
    """Make `delta_type` known to AutoDeltaConfig / AutoDeltaModel and to checkpoint loading.

    Registering the same classes again changes nothing. A type already registered with other
    classes raises DuplicateDeltaTypeError unless `replace=True` (then the new classes serve it);
    a class keeps one type: a class registered, declaring or inheriting another raises it too.
    """
    if not isinstance(delta_type, str) or not delta_type.isidentifier():
        raise DeltaConfigError(f"a delta_type must be a name such as 'my_lora', got {delta_type!r}.")
    for cls in (config_cls, model_cls):
        if not isinstance(cls, type) or isinstance(cls.__dict__.get("delta_type"), RegisteredType):
            raise DeltaConfigError(
                f"register a subclass of DeltaConfig and one of DeltaBase as {delta_type!r}, got {cls!r}: the base "
                "classes stand for every method."
            )
    for cls, attribute, wanted in ((model_cls, "delta_type", delta_type), (model_cls, "config_class", config_cls)):
        declared = _declared(cls, attribute)
        if declared not in (None, "", wanted):
            raise DuplicateDeltaTypeError(
                f"cannot register {model_cls.__name__} as {delta_type!r}: it has {attribute} = "
                f"{getattr(declared, '__name__', declared)!r}. Declare {attribute} = "
                f"{getattr(wanted, '__name__', repr(wanted))} on the class instead (a class declaring delta_type "
                "registers itself when it is defined)."
            )
    for cls in (config_cls, model_cls):
        if _TYPE_OF.get(cls, delta_type) != delta_type:
            raise DuplicateDeltaTypeError(
                f"cannot register {cls.__name__} as {delta_type!r}: it is already {_TYPE_OF[cls]!r}'s class. "
                f"Subclass it (class My{cls.__name__}({cls.__name__}): ...) and register the subclass."
            )
    current = _REGISTRY.get(delta_type)
    if current == (config_cls, model_cls):
        return
    if current is not None and not replace:
        raise DuplicateDeltaTypeError(
            f"delta_type {delta_type!r} is already registered to {current[1].__qualname__} (config "
            f"{current[0].__qualname__}); {model_cls.__qualname__} would silently take it over. Pick another "
            f"delta_type, or take it over explicitly: `class {model_cls.__name__}(..., replace=True)` or "
            f"AutoDeltaModel.register({delta_type!r}, {config_cls.__name__}, {model_cls.__name__}, replace=True)."
        )
    if current is not None:
        unregister(delta_type)
    _REGISTRY[delta_type] = (config_cls, model_cls)
    _TYPE_OF[config_cls] = _TYPE_OF[model_cls] = delta_type


def unregister(delta_type: str) -> None:
    """Forget `delta_type` (a plugin unloading, a test cleaning up); its classes keep what they declare."""
    config_cls, model_cls = lookup(delta_type)
    del _REGISTRY[delta_type]
    for cls in (config_cls, model_cls):
        if _TYPE_OF.get(cls) == delta_type:
            del _TYPE_OF[cls]


def lookup(delta_type: str) -> tuple[type[DeltaConfig], type[DeltaBase]]:
    try:
        return _REGISTRY[delta_type]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list or dict from edited JSON)
        close = difflib.get_close_matches(str(delta_type), list(_REGISTRY), n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UnknownDeltaTypeError(
            f"unknown delta_type {delta_type!r}.{hint} Known: {', '.join(sorted(_REGISTRY))}. "
            "Register your own with AutoDeltaModel.register(delta_type, config_cls, model_cls)."
        ) from None


def known_delta_types() -> list[str]:
    return sorted(_REGISTRY)


def type_of(cls: type) -> str:
    """The delta_type `cls` (a config or model class) is registered under, or inherits from its
    nearest registered base; "" for a class outside the registry."""
    return next((_TYPE_OF[klass] for klass in cls.__mro__ if klass in _TYPE_OF), "")


class RegisteredType:
    """``delta_type`` of a class that does not declare one: the type the registry knows it by."""

    def __get__(self, instance: object, owner: type) -> str:
        return type_of(owner)


class RegisteredConfig:
    """``config_class`` of a model class that does not declare one: the config class registered
    with its type, else `default`."""

    def __init__(self, default: type) -> None:
        self.default = default

    def __get__(self, instance: object, owner: type) -> type:
        delta_type = type_of(owner)
        return _REGISTRY[delta_type][0] if delta_type else self.default
