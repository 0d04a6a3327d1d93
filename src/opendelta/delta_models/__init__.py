"""The original OpenDelta's ``opendelta.delta_models`` package: aliases of :mod:`opendelta.methods`."""

from opendelta.methods import (
    AdapterConfig,
    AdapterModel,
    BitFitConfig,
    BitFitModel,
    CompacterConfig,
    CompacterModel,
    LoraConfig,
    LoraModel,
    LowRankAdapterConfig,
    LowRankAdapterModel,
    ParallelAdapterConfig,
    ParallelAdapterModel,
    PrefixConfig,
    PrefixModel,
    SoftPromptConfig,
    SoftPromptModel,
)

__all__ = [
    "AdapterConfig", "AdapterModel", "BitFitConfig", "BitFitModel", "CompacterConfig", "CompacterModel",
    "LoraConfig", "LoraModel", "LowRankAdapterConfig", "LowRankAdapterModel", "ParallelAdapterConfig",
    "ParallelAdapterModel", "PrefixConfig", "PrefixModel", "SoftPromptConfig", "SoftPromptModel",
]
