"""The original OpenDelta's ``opendelta.utils.logging``: standard-library loggers under ``opendelta``;
and a filter for two harmless warnings torchao logs on import, for our own programs (CLI, benchmarks)."""

from __future__ import annotations

import logging
import re

# torchao's optional compiled kernels: one built for another Python (cpython-310), one for Hopper GPUs (sm_90a)
_TORCHAO_OPTIONAL_KERNEL = re.compile(r"Failed to load \S*torchao/(_C_mxfp8|_C_cutlass_90a)\.[\w.-]+\.so: ")
_ENUM_CONSTANT = "%s is an Enum subclass and is now natively supported"


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger `name` (default: ``opendelta``)."""
    return logging.getLogger(name or "opendelta")


def set_verbosity(level: int) -> None:
    """Set the level of opendelta's loggers (e.g. ``logging.INFO``)."""
    logging.getLogger("opendelta").setLevel(level)


class _KnownImportNoise(logging.Filter):
    """Rejects exactly the known records (see `quiet_known_import_noise`); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torchao":
            return not _TORCHAO_OPTIONAL_KERNEL.match(record.getMessage())
        if record.name == "torch.utils._pytree" and isinstance(record.msg, str) and record.msg.startswith(_ENUM_CONSTANT):
            enum = record.args[0] if isinstance(record.args, tuple) and record.args else None
            return not getattr(enum, "__module__", "").startswith("torchao.")
        return True


_FILTER = _KnownImportNoise()


def quiet_known_import_noise() -> None:
    """Drop two warnings importing torchao (through PEFT or transformers) logs on every run, though nothing
    is wrong: its optional mxfp8 / sm_90a kernel libraries failing to load (built for another Python and a
    Hopper GPU; unused on this path), and torch's notice that registering torchao's enums as pytree
    constants is deprecated. Only those records, by their loggers; for programs (the CLI, the benchmarks),
    not done on importing the library, whose users' logging is theirs."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(_FILTER)  # before torchao is imported: it logs through these objects
