"""The file operations every checkpoint format shares: paths, strict JSON, one atomic writer, one
checked safetensors reader.

Nothing here is specific to a format: checkpoint.py (opendelta's) and peft_format.py (PEFT's)
both write through :func:`write_files` and read tensors through :func:`read_safetensors_header`
and :func:`read_safetensors`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from opendelta.errors import CheckpointError, CheckpointPathError, CheckpointPermissionError, CorruptCheckpointError

#: the config file of an opendelta checkpoint folder: written last, it is the folder's commit point
CONFIG_NAME = "delta_config.json"

# ----------------------------------------------------------------- paths and OS errors


def checkpoint_path(value: Any, action: str) -> Path:
    """`value` as a folder path, or CheckpointPathError saying what is wrong with it."""
    if not isinstance(value, (str, os.PathLike)):
        raise CheckpointPathError(
            f"{action} needs a folder path (str or pathlib.Path), got {type(value).__name__} {value!r}."
        )
    text = os.fspath(value)
    if not isinstance(text, str):
        raise CheckpointPathError(f"{action} needs a text path, got bytes {text!r}; decode it first.")
    if "\0" in text or not text:
        raise CheckpointPathError(f"{action}: {text!r} is not a usable path (empty, or a NUL byte in it).")
    return Path(text)


@contextlib.contextmanager
def os_errors_typed(path: Path, action: str) -> Iterator[None]:
    """A PermissionError inside becomes CheckpointPermissionError naming `path`."""
    try:
        yield
    except PermissionError as exc:
        raise CheckpointPermissionError(
            f"cannot {action} {str(path)!r}: permission denied ({exc.strerror}); check the file mode and owner, "
            "or choose a folder this account can use."
        ) from exc


def read_json(path: Path, error: type[CheckpointError]) -> Any:
    """Parse a checkpoint's JSON file strictly: no NaN/Infinity literals, bounded nesting; any
    failure is `error` naming the file."""

    def no_constants(literal: str) -> Any:
        raise ValueError(f"{literal} is not JSON")

    def finite(literal: str) -> float:
        if not math.isfinite(value := float(literal)):
            raise ValueError(f"{literal} overflows to infinity")
        return value

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({key for key, _ in pairs}) != len(pairs):
            raise ValueError(f"an object repeats a key: {sorted(k for k, _ in pairs)}")
        return dict(pairs)

    with os_errors_typed(path, "read"):
        raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constants, parse_float=finite, object_pairs_hook=unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise error(f"{path} is not valid JSON ({reason}); the checkpoint is damaged.") from exc


# ----------------------------------------------------------------- one atomic writer


_STALE = re.compile(
    r"\.(delta_model(\.[0-9a-f]{16})?\.safetensors|delta_config\.json|adapter_model\.safetensors|adapter_config\.json)"
    r"\..+\.tmp"
    r"|\.peft\..+"  # the temporary folders earlier PEFT-format saves used
)


def save_folder(directory: Any, *, create: bool = True) -> Path:
    """The folder a save writes into, created if needed; an existing file there is an error."""
    directory = checkpoint_path(directory, "save_finetuned")
    if directory.exists() and not directory.is_dir():
        raise CheckpointPathError(
            f"save_finetuned: {str(directory)!r} is an existing file, not a folder; a checkpoint is a folder "
            "of files. Choose another path or remove the file."
        )
    if create:
        with os_errors_typed(directory, "create the checkpoint folder"):
            directory.mkdir(parents=True, exist_ok=True)
    return directory


def _temporary(directory: Path, final_name: str, data: bytes) -> Path:
    """`data` in a new hidden file next to `final_name`, flushed to disk. Created like any file
    (mode 0666 less the umask), so whoever may read the folder may read the checkpoint."""
    path = directory / f".{final_name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        handle = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path


def _sync_folder(directory: Path) -> None:
    """Make the renames durable (where the platform can open a folder)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_files(directory: Path, files: list[tuple[str, bytes]], keep: Callable[[str], bool] = lambda name: True) -> None:
    """Write `files` (name, bytes) into `directory`, each through a flushed temporary file renamed
    over its name, in order; the last rename is the commit. Stale temporary files from killed saves
    are removed first; after the commit, so is every file `keep` rejects."""
    with os_errors_typed(directory, "write the checkpoint into"):
        for entry in os.listdir(directory):
            if _STALE.fullmatch(entry):
                remove_path(directory / entry)
        pending: list[Path] = []
        try:
            for name, data in files:
                pending.append(_temporary(directory, name, data))
                os.replace(pending[-1], directory / name)
                pending.pop()
        finally:
            for path in pending:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        _sync_folder(directory)
        with contextlib.suppress(OSError):  # committed: a leftover now costs only space
            for entry in os.listdir(directory):
                if not keep(entry):
                    remove_path(directory / entry)


def remove_path(path: Path) -> None:
    """Best effort: the save already succeeded (or has not begun), a leftover costs only space."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            os.unlink(path)


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """`tensors` (moved to the CPU) as the bytes of a safetensors file, and their SHA-256."""
    # one metadata key: safetensors writes the metadata map in random order, and equal checkpoints
    # should be equal bytes (the file is named after its checksum)
    data = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    return data, hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------- one safetensors reader

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """The shape of every tensor in safetensors file `path`, and the file's size, from its header
    alone: the header must describe exactly the bytes the file holds, so a padded, truncated or
    sparse file is refused before any of its data is read."""
    with os_errors_typed(path, "read"), open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER):
            raise CorruptCheckpointError(f"{path} is not a safetensors file (no valid header); the checkpoint is damaged.")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{path} has an unreadable safetensors header; the checkpoint is damaged.") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has an unreadable safetensors header; the checkpoint is damaged.")
    shapes: dict[str, tuple[int, ...]] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, offsets, dtype = (
            (entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")) if isinstance(entry, dict) else (None,) * 3
        )
        ok = (
            isinstance(dtype, str) and isinstance(shape, list) and all(map(is_count, shape))
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))
            and offsets[0] <= offsets[1]
        )  # fmt: skip
        width = _DTYPE_BYTES.get(dtype) if ok else None
        if not ok or (width is not None and offsets[1] - offsets[0] != math.prod(shape) * width):
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has a malformed header entry; the checkpoint is damaged.")
        shapes[name] = tuple(shape)
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            break
        end = stop
    if end != size - 8 - length:
        raise CorruptCheckpointError(
            f"{path} is {size} bytes but its header describes {8 + length + end}: the file is truncated, padded or "
            "damaged."
        )
    return shapes, size


def read_safetensors(path: Path, size: int, sha256: str | None, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Every tensor of `path` (read once: checksum and tensors come from the same bytes), or
    CorruptCheckpointError if it changed since its header was read or does not match `sha256`."""
    with os_errors_typed(path, "read"):
        data = path.read_bytes()
    if len(data) != size:
        raise CorruptCheckpointError(f"{path} changed while it was being loaded; load it again.")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptCheckpointError(
            f"{path} does not match the checksum recorded in its config: the file is truncated or was changed "
            "after saving."
        )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file ({exc}).") from exc
    return {k: v.to(device) for k, v in tensors.items()}
