"""The original OpenDelta's ``opendelta.delta_configs``: ``BaseDeltaConfig`` is opendelta's :class:`DeltaConfig`."""

from opendelta.config import DeltaConfig as BaseDeltaConfig

__all__ = ["BaseDeltaConfig"]
