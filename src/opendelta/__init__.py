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
    DistributedSaveError,
    IncompatibleCheckpointError,
    LifecycleError,
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
    UnsupportedModuleError,
)
from opendelta.methods import LoraConfig, LoraModel
from opendelta.routing import DeltaLayer

__all__ = [
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DeltaBase",
    "DeltaConfig",
    "DeltaConfigError",
    "DistributedSaveError",
    "DeltaLayer",
    "IncompatibleCheckpointError",
    "LifecycleError",
    "LoraConfig",
    "LoraModel",
    "NoMatchError",
    "OpenDeltaError",
    "PatternError",
    "PeftFormatError",
    "RuntimeInitError",
    "SelectionCancelled",
    "SelectionError",
    "SelectionTimeout",
    "StructureError",
    "UnknownDeltaTypeError",
    "UnsupportedModuleError",
    "find_modules",
]
