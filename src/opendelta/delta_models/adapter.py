"""The original OpenDelta's module path ``opendelta.delta_models.adapter``: an alias of opendelta's method."""

from opendelta.methods import AdapterConfig, AdapterModel

__all__ = ["AdapterConfig", "AdapterModel"]
