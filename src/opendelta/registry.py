"""The registry of delta types: ``delta_type`` string -> (config class, delta model class)."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from opendelta.errors import UnknownDeltaTypeError

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig
    from opendelta.delta_base import DeltaBase

_REGISTRY: dict[str, tuple[type[DeltaConfig], type[DeltaBase]]] = {}


def register(delta_type: str, config_cls: type[DeltaConfig], model_cls: type[DeltaBase]) -> None:
    """Make `delta_type` known to AutoDeltaConfig / AutoDeltaModel and to checkpoint loading."""
    config_cls.delta_type = delta_type
    model_cls.delta_type = delta_type
    model_cls.config_class = config_cls
    _REGISTRY[delta_type] = (config_cls, model_cls)


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
