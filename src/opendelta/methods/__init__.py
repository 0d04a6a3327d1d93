"""The delta methods; importing this package registers each one's delta_type."""

from opendelta.methods.lora import LoraConfig, LoraModel
from opendelta.methods.prefix import PrefixConfig, PrefixModel
from opendelta.methods.soft_prompt import SoftPromptConfig, SoftPromptModel

__all__ = ["LoraConfig", "LoraModel", "PrefixConfig", "PrefixModel", "SoftPromptConfig", "SoftPromptModel"]
