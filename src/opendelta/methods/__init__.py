"""The delta methods; importing this package registers each one's delta_type."""

from opendelta.methods.adalora import AdaLoraConfig, AdaLoraModel
from opendelta.methods.adapter import AdapterConfig, AdapterModel
from opendelta.methods.bitfit import BitFitConfig, BitFitModel
from opendelta.methods.compacter import CompacterConfig, CompacterModel
from opendelta.methods.ia3 import IA3Config, IA3Model
from opendelta.methods.loha import LoHaConfig, LoHaModel
from opendelta.methods.lokr import LoKrConfig, LoKrModel
from opendelta.methods.lora import LoraConfig, LoraModel
from opendelta.methods.oft import OftConfig, OftModel
from opendelta.methods.low_rank_adapter import LowRankAdapterConfig, LowRankAdapterModel
from opendelta.methods.parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel
from opendelta.methods.prefix import PrefixConfig, PrefixModel
from opendelta.methods.soft_prompt import SoftPromptConfig, SoftPromptModel
from opendelta.methods.vera import VeraConfig, VeraModel
from opendelta.methods.trainable_tokens import TrainableTokensConfig, TrainableTokensModel

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdapterConfig",
    "AdapterModel",
    "BitFitConfig",
    "BitFitModel",
    "CompacterConfig",
    "CompacterModel",
    "IA3Config",
    "IA3Model",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoraConfig",
    "LoraModel",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "OftConfig",
    "OftModel",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "PrefixConfig",
    "PrefixModel",
    "SoftPromptConfig",
    "SoftPromptModel",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "VeraConfig",
    "VeraModel",
]
