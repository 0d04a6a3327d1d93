"""Every error opendelta raises on bad input: one family per failure, each naming the input and a fix."""

from __future__ import annotations


class OpenDeltaError(Exception):
    """Base class of every error raised by opendelta."""


class NoMatchError(OpenDeltaError, KeyError):
    """A module pattern matched no module of the model."""

    def __init__(self, pattern: str, suggestions: list[str], what: str = "modified_modules"):
        self.pattern = pattern
        self.suggestions = suggestions
        hint = f" Did you mean: {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        super().__init__(
            f"{what} pattern {pattern!r} matches no module of the model.{hint} "
            "Print the model (or bigmodelvis.Visualization(model).structure_graph()) to see its module names."
        )

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class DeltaConfigError(OpenDeltaError, ValueError):
    """A delta configuration has unknown keys or invalid values."""


class PatternError(DeltaConfigError):
    """A module pattern is malformed (empty, not a string, or an invalid regular expression), or a list
    of patterns is not a list; a DeltaConfigError, as the config layer reports the same mistakes."""


class UnsupportedModuleError(OpenDeltaError, TypeError):
    """A delta method was addressed to a module it cannot act on."""


class UnreachedModuleError(UnsupportedModuleError):
    """An addressed module that the backbone's forward never calls, so a delta there would do nothing."""


class StructureError(OpenDeltaError, ValueError):
    """Common-structure roles could not be resolved on this backbone."""


class RuntimeInitError(OpenDeltaError, RuntimeError):
    """The dummy forward pass that measures hidden-state shapes could not run."""


class LifecycleError(OpenDeltaError, RuntimeError):
    """attach/detach/merge called in a state that does not allow it (e.g. attaching twice)."""


class MixedBatchError(OpenDeltaError, ValueError):
    """A mixed-task batch was asked for what it cannot do (bad row indices, a foreign delta,
    deltas that cannot share a batch, a forward whose batch size differs from the rows)."""


class MergeError(OpenDeltaError, TypeError):
    """merge() was called on a delta whose method is not linear in the module's weight."""


class UnknownDeltaTypeError(OpenDeltaError, KeyError):
    """A delta_type that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateDeltaTypeError(OpenDeltaError, ValueError):
    """A delta_type registered again with other classes, without ``replace=True``."""


class CheckpointError(OpenDeltaError):
    """Base class of checkpoint failures."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory or one of its files does not exist."""


class CheckpointPathError(CheckpointError, ValueError):
    """A checkpoint path that cannot name a checkpoint folder: not a path, a NUL byte in it, or an existing file."""


class CheckpointPermissionError(CheckpointError, PermissionError):
    """The operating system refused to read or write a checkpoint file (file mode, owner, read-only disk)."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint file is unreadable, truncated, or does not match its recorded checksum."""


class CheckpointNotCachedError(CheckpointNotFoundError):
    """A Hub checkpoint file is not in the local Hub cache and cannot be fetched (offline mode,
    ``local_files_only=True``, or the Hub cannot be reached)."""


class HubError(CheckpointError, OSError):
    """A Hugging Face Hub request failed (network, permissions, a gated repo) or its arguments contradict each other."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """The checkpoint's modules or tensor shapes do not fit this backbone."""


class DistributedSaveError(OpenDeltaError, RuntimeError):
    """A distributed save was not reached by every rank, or rank 0 failed to write it."""


class PeftFormatError(CheckpointError, ValueError):
    """A PEFT adapter folder that opendelta cannot read or a delta that the PEFT format cannot express."""


class SelectionError(OpenDeltaError, RuntimeError):
    """The interactive module selection could not give a result (port taken, cancelled, timed out)."""


class SelectionCancelled(SelectionError):
    """The user cancelled the interactive selection (Cancel on the page, or Ctrl-C)."""


class SelectionTimeout(SelectionError, TimeoutError):
    """No selection was submitted before the timeout."""
