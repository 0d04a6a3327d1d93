"""opendelta: plug-and-play delta tuning for any PyTorch model."""

from opendelta.version import __version__

from opendelta.addressing import find_modules
from opendelta.arithmetic import combine, negate
from opendelta.auto import AutoDeltaConfig, AutoDeltaModel
from opendelta.config import DeltaConfig
from opendelta.delta_base import DeltaBase
from opendelta.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointPathError,
    CheckpointPermissionError,
    CorruptCheckpointError,
    DeltaConfigError,
    DistributedSaveError,
    DuplicateDeltaTypeError,
    IncompatibleCheckpointError,
    LifecycleError,
    MergeError,
    MixedBatchError,
    NoMatchError,
    OpenDeltaError,
    PatternError,
    PeftFormatError,
    RuntimeInitError,
    SelectionCancelled,
    SelectionError,
    SelectionTimeout,
    StructureError,
    UnknownDeltaTypeError,
    UnreachedModuleError,
    UnsupportedModuleError,
)
from opendelta.hf_trainer import quantized_training
from opendelta.layer import DeltaLayer
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
from opendelta.multitask import MultiTask, mixed_batch
from opendelta.leniency import OriginalBehaviourWarning, set_strict, strict_mode

# the original OpenDelta's top-level names (docs/migrating_from_opendelta.md)
from bigmodelvis import Visualization
from opendelta.delta_configs import BaseDeltaConfig
from opendelta.utils.saving_loading_utils import SaveLoadMixin
from opendelta.utils.structure_mapping import CommonStructureMap

__all__ = [
    "AdapterConfig",
    "BaseDeltaConfig",
    "CommonStructureMap",
    "OriginalBehaviourWarning",
    "SaveLoadMixin",
    "Visualization",
    "set_strict",
    "strict_mode",
    "AdapterModel",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "BitFitConfig",
    "BitFitModel",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointPathError",
    "CheckpointPermissionError",
    "CompacterConfig",
    "CompacterModel",
    "CorruptCheckpointError",
    "DeltaBase",
    "DeltaConfig",
    "DeltaConfigError",
    "DistributedSaveError",
    "DuplicateDeltaTypeError",
    "DeltaLayer",
    "IA3Config",
    "IA3Model",
    "IncompatibleCheckpointError",
    "LifecycleError",
    "LoraConfig",
    "LoraModel",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "MergeError",
    "MixedBatchError",
    "MultiTask",
    "NoMatchError",
    "OpenDeltaError",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "PatternError",
    "PeftFormatError",
    "PrefixConfig",
    "PrefixModel",
    "RuntimeInitError",
    "SelectionCancelled",
    "SelectionError",
    "SelectionTimeout",
    "SoftPromptConfig",
    "SoftPromptModel",
    "StructureError",
    "UnknownDeltaTypeError",
    "UnreachedModuleError",
    "UnsupportedModuleError",
    "combine",
    "find_modules",
    "mixed_batch",
    "negate",
]
