"""Load a transformers model from a local directory for the CLI commands (offline, no hub)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from opendelta.errors import OpenDeltaError


class ModelDirError(OpenDeltaError, OSError):
    """A command was given a model directory that does not exist or holds no loadable model."""


def load_local_model(directory: str, model_class: str | None = None) -> nn.Module:
    """The model saved in `directory`, with local files only: ``AutoModel.from_pretrained``, or the
    transformers class named `model_class` (e.g. ``BertForSequenceClassification``)."""
    path = Path(directory)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ModelDirError(f"model directory {directory!r} {what}; give the folder that holds config.json.")
    try:
        import transformers
    except ImportError:
        raise ModelDirError("loading a model directory needs transformers: pip install 'opendelta[hf]'.") from None
    logging = transformers.utils.logging
    logging.disable_progress_bar()  # a bar per load is noise on a command's stderr
    cls = transformers.AutoModel if model_class is None else getattr(transformers, model_class, None)
    if not hasattr(cls, "from_pretrained"):
        raise ModelDirError(f"transformers has no model class {model_class!r}; name one such as 'AutoModel'.")
    # the commands show structure, not weights: a load report that a task head is "newly initialized"
    # (the usual case, and a delta checkpoint given to inspect brings its own) is noise on stderr
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelDirError(f"cannot load a transformers model from {directory!r}: {exc}") from None
    finally:
        logging.set_verbosity(verbosity)
