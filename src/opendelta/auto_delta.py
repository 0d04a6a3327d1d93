"""The original OpenDelta's ``opendelta.auto_delta``: aliases of :mod:`opendelta.auto`."""

from opendelta.auto import AutoDeltaConfig, AutoDeltaModel

__all__ = ["AutoDeltaConfig", "AutoDeltaModel"]
