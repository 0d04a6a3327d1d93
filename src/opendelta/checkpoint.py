"""Delta checkpoints: a JSON config plus a safetensors file of the delta tensors, written atomically.

No pickle anywhere: loading a stranger's checkpoint cannot execute code.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from opendelta.addressing import is_delta_module
from opendelta.distributed import tensor_shape, unsharded_class
from opendelta.errors import CheckpointNotFoundError, CorruptCheckpointError

CONFIG_NAME = "delta_config.json"
WEIGHTS_NAME = "delta_model.safetensors"
FORMAT = "opendelta"
FORMAT_VERSION = 2  # 2: same-shaped delta tensors stacked ("stacks" in the config)


def delta_key(path: str, key: str) -> str:
    """The checkpoint key of tensor `key` of the delta layer at module `path` ("" is the root module)."""
    return f"delta.{path}.{key}" if path else f"delta.{key}"


@dataclass
class DeltaCheckpoint:
    """A checkpoint in memory: its JSON description and its tensors by key."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def backbone_fingerprint(model: nn.Module) -> str:
    """A cheap structural fingerprint: hash of the backbone's tensor names, shapes and dtypes.

    Reads no tensor data, so it is instant on huge, bf16 or meta-device models; delta tensors,
    state-dict hooks and sharding (FSDP2, ZeRO-3) do not change it.
    """
    delta_prefixes = tuple(path + "." for path, m in model.named_modules() if path and is_delta_module(m))
    digest = hashlib.sha256(unsharded_class(model).__name__.encode())
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if not name.startswith(delta_prefixes):
            digest.update(f"{name}:{tensor_shape(tensor)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def stack_groups(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Delta tensors of one name, shape and dtype (the lora_A of every module, ...) as one stacked
    tensor each, and which keys each stack holds, in order. The safetensors header costs ~115 bytes
    per tensor, so 60 LoRA modules would otherwise add ~14 KiB of header to the file."""
    groups: dict[tuple[str, tuple[int, ...], torch.dtype], list[str]] = {}
    for key, tensor in tensors.items():
        if key.startswith("delta."):
            groups.setdefault((key.rsplit(".", 1)[-1], tuple(tensor.shape), tensor.dtype), []).append(key)
    out = dict(tensors)
    stacks: dict[str, list[str]] = {}
    for (leaf, _, _), keys in groups.items():
        if len(keys) > 1:
            name = f"stack.{len(stacks)}.{leaf}"
            out[name] = torch.stack([out.pop(k) for k in keys])
            stacks[name] = keys
    return out, stacks


def unstack_groups(tensors: dict[str, torch.Tensor], stacks: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Undo :func:`stack_groups`: every stacked key gets its own slice back."""
    out = dict(tensors)
    for name, keys in stacks.items():
        stacked = out.pop(name, None)
        if stacked is None or stacked.dim() == 0 or stacked.shape[0] != len(keys):
            raise CorruptCheckpointError(f"the checkpoint's stacked tensor {name!r} is missing or does not hold {len(keys)} tensors")
        out.update(zip(keys, stacked.unbind(0)))
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(directory: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` and `meta` into `directory` so that a failure at any point leaves the previous
    checkpoint there intact: both files are written under temporary names and renamed into place,
    and the config (renamed last) records the weights' checksum."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain, stacks = stack_groups({k: v.detach().to("cpu") for k, v in tensors.items()})
    plain = {k: v.contiguous() for k, v in plain.items()}
    fd, tmp_weights = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", suffix=".tmp", dir=directory)
    os.close(fd)
    fd, tmp_config = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(plain, tmp_weights, metadata={"format": "pt", "producer": FORMAT})
        _fsync(Path(tmp_weights))
        full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        full_meta["weights"] = {"file": WEIGHTS_NAME, "sha256": _sha256(Path(tmp_weights))}
        if stacks:
            full_meta["stacks"] = stacks
        with open(tmp_config, "w", encoding="utf-8") as handle:
            # compact: on a deep model the module list dominates the file (`python -m json.tool` shows it)
            json.dump(full_meta, handle, separators=(",", ":"))
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        os.replace(tmp_config, directory / CONFIG_NAME)
    finally:
        for leftover in (tmp_weights, tmp_config):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return directory


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON description of the checkpoint in `directory`, validated."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint directory at {str(directory)!r}")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointNotFoundError(
            f"{str(directory)!r} holds no {CONFIG_NAME}; is it a directory written by save_finetuned()?"
        )
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{config_path} is not valid JSON ({exc}); the checkpoint is damaged.") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "delta_type" not in meta:
        raise CorruptCheckpointError(f"{config_path} is not an opendelta checkpoint config.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{config_path} has format version {meta['format_version']}; this opendelta reads up to "
            f"{FORMAT_VERSION}. Upgrade opendelta."
        )
    return meta


def read_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> DeltaCheckpoint:
    """Load and verify the checkpoint in `directory` (checksum, then tensors)."""
    directory = Path(directory)
    meta = read_meta(directory)
    weights = directory / meta.get("weights", {}).get("file", WEIGHTS_NAME)
    if not weights.is_file():
        raise CheckpointNotFoundError(f"the checkpoint in {str(directory)!r} is missing its tensors file {weights.name}")
    expected = meta.get("weights", {}).get("sha256")
    if expected is not None and _sha256(weights) != expected:
        raise CorruptCheckpointError(
            f"{weights} does not match the checksum recorded in {CONFIG_NAME}: the file is truncated or "
            "was changed after saving."
        )
    try:
        tensors = load_file(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{weights} is not a readable safetensors file ({exc}).") from exc
    return DeltaCheckpoint(meta=meta, tensors=unstack_groups(tensors, meta.get("stacks", {})))
