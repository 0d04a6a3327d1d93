"""The original OpenDelta's module path ``opendelta.delta_models.prefix``: an alias of opendelta's method."""

from opendelta.methods import PrefixConfig, PrefixModel

__all__ = ["PrefixConfig", "PrefixModel"]
