"""The original OpenDelta's module path ``opendelta.delta_models.compacter``: an alias of opendelta's method."""

from opendelta.methods import CompacterConfig, CompacterModel

__all__ = ["CompacterConfig", "CompacterModel"]
