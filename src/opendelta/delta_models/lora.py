"""The original OpenDelta's module path ``opendelta.delta_models.lora``: an alias of opendelta's method."""

from opendelta.methods import LoraConfig, LoraModel

__all__ = ["LoraConfig", "LoraModel"]
