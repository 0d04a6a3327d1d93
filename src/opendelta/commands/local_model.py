"""Load a transformers model from a local directory for the CLI commands (offline, no hub)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from opendelta.errors import OpenDeltaError


class ModelDirError(OpenDeltaError, OSError):
    """A command was given a model directory that does not exist or holds no loadable model."""


def load_local_model(directory: str) -> nn.Module:
    """The model saved in `directory` (``AutoModel.from_pretrained`` with local files only)."""
    path = Path(directory)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ModelDirError(f"model directory {directory!r} {what}; give the folder that holds config.json.")
    try:
        from transformers import AutoModel
    except ImportError:
        raise ModelDirError("loading a model directory needs transformers: pip install 'opendelta[hf]'.") from None
    try:
        return AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelDirError(f"cannot load a transformers model from {directory!r}: {exc}") from None
