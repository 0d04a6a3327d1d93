"""The original OpenDelta's module path ``opendelta.delta_models.bitfit``: an alias of opendelta's method."""

from opendelta.methods import BitFitConfig, BitFitModel

__all__ = ["BitFitConfig", "BitFitModel"]
