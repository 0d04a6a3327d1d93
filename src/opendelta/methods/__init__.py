"""The delta methods; importing this package registers each one's delta_type."""

from opendelta.methods.lora import LoraConfig, LoraModel

__all__ = ["LoraConfig", "LoraModel"]
