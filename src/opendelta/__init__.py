"""opendelta: plug-and-play delta tuning for any PyTorch model."""

__version__ = "0.1.0"

from opendelta.addressing import find_modules
from opendelta.auto import AutoDeltaConfig, AutoDeltaModel
from opendelta.config import DeltaConfig
from opendelta.delta_base import DeltaBase
from opendelta.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DeltaConfigError,
    IncompatibleCheckpointError,
    LifecycleError,
    NoMatchError,
    OpenDeltaError,
    PatternError,
    RuntimeInitError,
    StructureError,
    UnknownDeltaTypeError,
    UnsupportedModuleError,
)
from opendelta.methods import (
    AdapterConfig,
    AdapterModel,
    BitFitConfig,
    BitFitModel,
    CompacterConfig,
    CompacterModel,
    IA3Config,
    IA3Model,
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
from opendelta.routing import DeltaLayer

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "BitFitConfig",
    "BitFitModel",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CompacterConfig",
    "CompacterModel",
    "CorruptCheckpointError",
    "DeltaBase",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaLayer",
    "IA3Config",
    "IA3Model",
    "IncompatibleCheckpointError",
    "LifecycleError",
    "LoraConfig",
    "LoraModel",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "NoMatchError",
    "OpenDeltaError",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "PatternError",
    "PrefixConfig",
    "PrefixModel",
    "RuntimeInitError",
    "SoftPromptConfig",
    "SoftPromptModel",
    "StructureError",
    "UnknownDeltaTypeError",
    "UnsupportedModuleError",
    "find_modules",
]
