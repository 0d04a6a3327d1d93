"""The original OpenDelta's module path ``opendelta.delta_models.soft_prompt``: an alias of opendelta's method."""

from opendelta.methods import SoftPromptConfig, SoftPromptModel

__all__ = ["SoftPromptConfig", "SoftPromptModel"]
