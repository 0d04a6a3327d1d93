"""opendelta's checkpoint format: a JSON config plus a safetensors file of the delta tensors.

No pickle anywhere: loading a stranger's checkpoint cannot execute code. The config is the commit
point: it names the weights file (a new name for new content) and its SHA-256, so a save that
fails at any step leaves the previous checkpoint loadable. The checksum detects corruption
(truncation, bit flips, a torn save), not deliberate tampering: whoever can edit the weights can
edit the config too. The file operations themselves are checkpoint_files.py's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta.addressing import is_delta_module
from opendelta.checkpoint_files import (
    checkpoint_path,
    is_count,
    read_json,
    read_safetensors,
    read_safetensors_header,
    remove_path,
    safetensors_bytes,
    save_folder,
    write_files,
)
from opendelta.config import is_finite_number
from opendelta.distributed import tensor_shape, unsharded_class
from opendelta.errors import CheckpointNotFoundError, CorruptCheckpointError, DeltaConfigError, OpenDeltaError
from opendelta.registry import lookup
from opendelta.structure import model_type
from opendelta.version import __version__

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig
    from opendelta.delta_base import DeltaBase

CONFIG_NAME = "delta_config.json"
FORMAT = "opendelta"
FORMAT_VERSION = 2  # 2: same-shaped delta tensors stacked ("stacks" in the config)
_WEIGHTS = re.compile(r"delta_model(\.[0-9a-f]{16})?\.safetensors")


def weights_name(sha256: str) -> str:
    """The weights file name for content with this checksum: new content never overwrites the
    file the committed config names."""
    return f"delta_model.{sha256[:16]}.safetensors"


def delta_key(path: str, key: str) -> str:
    """The checkpoint key of tensor `key` of the delta layer at module `path` ("" is the root module)."""
    return f"delta.{path}.{key}" if path else f"delta.{key}"


@dataclass
class DeltaCheckpoint:
    """A checkpoint in memory: its JSON description and its tensors by key."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass
class StoredCheckpoint:
    """A checkpoint whose config and tensor header are read and checked, its tensor data not yet:
    `shapes` (by checkpoint key) lets a loader compare it with the backbone before the costly
    part, `load(device)` reads, verifies and returns the tensors by the same keys."""

    meta: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    load: Callable[[torch.device | str], dict[str, torch.Tensor]]


@dataclass
class CheckpointContents:
    """A checkpoint of any format in opendelta's terms, its tensor data not read yet: the delta
    class and config it holds, the module paths, the tensors (``stored``, by opendelta checkpoint
    key), the backbone tensors it trains (name -> saved shape), the backbone class it was trained
    on, and its place among other deltas (``position``; ``created`` is 0 when unknown)."""

    delta_class: type[DeltaBase]
    config: DeltaConfig
    modules: list[str]
    stored: StoredCheckpoint
    backbone_tensors: dict[str, Any]
    trained_on: str
    position: float = 0
    created: int = 0
    #: for a format whose module list depends on the backbone (PEFT's prefix tuning names layers by
    #: index; the original OpenDelta's BitFit, parallel adapter and soft prompt list no modules): the
    #: same contents placed on a given backbone, resolved when it is loaded onto one
    for_backbone: Callable[[Any], CheckpointContents] | None = None


def shared_keys(layers: Mapping[str, nn.Module]) -> dict[str, str]:
    """Checkpoint keys of tensors that several layers share -> the key the tensor is saved under
    (its first), so a shared tensor is saved once and loaded into the one object again."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for path, layer in layers.items():
        for key, tensor in layer.state_dict(keep_vars=True).items():
            full = delta_key(path, key)
            if first.setdefault(id(tensor), full) != full:
                aliases[full] = first[id(tensor)]
    return aliases


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
        out.update(zip(keys, out.pop(name).unbind(0)))
    return out


def _unstacked_shapes(
    shapes: dict[str, tuple[int, ...]], stacks: dict[str, list[str]], aliases: dict[str, str], source: Path
) -> dict[str, tuple[int, ...]]:
    """The shape of every checkpoint key once stacks are split and shared tensors aliased; a stack
    or alias that does not fit the file, or a key given twice, is corruption."""
    out = {k: v for k, v in shapes.items() if k not in stacks}
    for name, keys in stacks.items():
        shape = shapes.get(name)
        if shape is None or len(shape) == 0 or shape[0] != len(keys):
            raise CorruptCheckpointError(
                f"{source}: stacked tensor {name!r} is missing or does not hold the {len(keys)} tensors "
                f"the config's 'stacks' lists; the checkpoint is damaged."
            )
        for key in keys:
            if key in out:
                raise CorruptCheckpointError(f"{source}: tensor {key!r} is stored twice; the checkpoint is damaged.")
            out[key] = shape[1:]
    for key, saved_as in aliases.items():
        if key in out or saved_as not in out:
            raise CorruptCheckpointError(
                f"{source}: 'shared_tensors' maps {key!r} to {saved_as!r}, but the file "
                f"{'already holds the first' if key in out else 'does not hold the second'}; the checkpoint is damaged."
            )
        out[key] = out[saved_as]
    return out


def write_checkpoint(directory: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` and `meta` into `directory` so that a failure at any step leaves the previous
    checkpoint loadable: the weights go to a file named after their checksum, then the config that
    names them is renamed into place (the commit), then the previous weights file is removed."""
    directory = save_folder(directory)
    plain, stacks = stack_groups({k: v.detach().to("cpu") for k, v in tensors.items()})
    data, sha256 = safetensors_bytes(plain)
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    full_meta["weights"] = {"file": weights_name(sha256), "sha256": sha256}
    if stacks:
        full_meta["stacks"] = stacks
    # compact: on a deep model the module list dominates the file (`python -m json.tool` shows it)
    config = (json.dumps(full_meta, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    committed = weights_name(sha256)
    try:
        write_files(
            directory,
            [(committed, data), (CONFIG_NAME, config)],
            keep=lambda name: name == committed or not _WEIGHTS.fullmatch(name),
        )
    except BaseException:
        if _committed_weights(directory) != committed:  # written, never committed: nothing names it
            remove_path(directory / committed)
        raise
    return directory


def write_delta_checkpoint(delta: DeltaBase, directory: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `delta` in opendelta's format; `tensors` are its checkpoint tensors, gathered."""
    order = delta.order_key
    meta: dict[str, Any] = {
        "delta_type": delta.delta_type,
        "name": delta.name,
        # the delta's place among others on shared modules (order_key), so loading order never matters
        "order": {"position": order[0], "created": order[1]},
        "library_version": __version__,
        "config": delta.config.to_dict(),
        # paths only: the tensors' shapes are already in the safetensors header
        "modules": list(delta.layers),
        "backbone_tensors": {n: list(tensors[f"backbone.{n}"].shape) for n in delta.trained_backbone_tensors()},
        "backbone": {
            "class": unsharded_class(delta.backbone_model).__name__,
            "model_type": model_type(delta.backbone_model),
            "fingerprint": backbone_fingerprint(delta.backbone_model),
        },
    }
    if aliases := shared_keys(delta.layers):
        meta["shared_tensors"] = aliases
    return write_checkpoint(directory, meta, tensors)


def _committed_weights(directory: Path) -> str | None:
    """The weights file the config on disk names, if it can be read."""
    try:
        return json.loads((directory / CONFIG_NAME).read_bytes())["weights"]["file"]
    except Exception:  # no config, or a damaged one: then it names nothing
        return None


# ----------------------------------------------------------------- reading a checkpoint


class _Missing:
    def __repr__(self) -> str:
        return "nothing (the field is missing)"


def _corrupt(config_path: Path, field: str, expected: str, value: Any) -> CorruptCheckpointError:
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
    return CorruptCheckpointError(
        f"{config_path}: {field!r} must be {expected}, got {shown}; the checkpoint is damaged or was edited. "
        "Save it again with save_finetuned()."
    )


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_meta(meta: Any, config_path: Path, verify: bool) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{config_path} is not an opendelta checkpoint config (no \"format\": \"{FORMAT}\").")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _corrupt(config_path, "format_version", f"an integer from 1 to {FORMAT_VERSION}", version)
    if version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{config_path} has format version {version}; this opendelta reads up to {FORMAT_VERSION}. Upgrade opendelta."
        )
    required = {"delta_type": (str, "a delta type name such as 'lora'"), "config": (dict, "an object of the method's arguments"),
                "weights": (dict, 'an object {"file": ..., "sha256": ...}')}  # fmt: skip
    optional = {"name": (str, "a string"), "library_version": (str, "a string"), "backbone": (dict, "an object"),
                "backbone_tensors": (dict, "an object"), "stacks": (dict, "an object"),
                "shared_tensors": (dict, "an object")}  # fmt: skip
    for field, (kind, expected) in {**required, **optional}.items():
        if (field in required or field in meta) and not isinstance(meta.get(field), kind):
            raise _corrupt(config_path, field, expected, meta.get(field, _Missing()))
    modules = meta.get("modules", _Missing())
    if not _str_list(modules) or not modules:
        raise _corrupt(config_path, "modules", "a non-empty list of module paths", modules)
    if len(set(modules)) != len(modules):
        raise _corrupt(config_path, "modules", "a list without duplicates", sorted({m for m in modules if modules.count(m) > 1}))
    file = meta["weights"].get("file")
    if not isinstance(file, str) or file in ("", ".", "..") or "/" in file or "\\" in file or "\0" in file:
        raise _corrupt(config_path, "weights.file", "the plain name of a file in the checkpoint folder", file)
    sha256 = meta["weights"].get("sha256")
    if verify and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
        raise CorruptCheckpointError(
            f"{config_path} records no valid SHA-256 of {file} ('weights.sha256' is {sha256!r}), so the tensors cannot "
            "be verified; the checkpoint is damaged or was edited. Save it again, or pass verify=False to load it "
            "unverified."
        )
    if not all(_str_list(keys) for keys in meta.get("stacks", {}).values()):
        raise _corrupt(config_path, "stacks", "an object of lists of tensor keys", meta["stacks"])
    if not all(isinstance(v, str) for v in meta.get("shared_tensors", {}).values()):
        raise _corrupt(config_path, "shared_tensors", "an object of tensor keys", meta["shared_tensors"])
    backbone_tensors = meta.get("backbone_tensors", {})
    if not all(isinstance(v, list) and all(map(is_count, v)) for v in backbone_tensors.values()):
        raise _corrupt(config_path, "backbone_tensors", "an object of tensor shapes", backbone_tensors)
    if not isinstance(meta.get("backbone", {}).get("class", ""), str):
        raise _corrupt(config_path, "backbone.class", "a class name", meta["backbone"]["class"])


def read_meta(directory: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The JSON description of the checkpoint in `directory`, with every field checked."""
    directory = checkpoint_path(directory, "from_finetuned")
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint directory at {str(directory)!r}")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointNotFoundError(
            f"{str(directory)!r} holds no {CONFIG_NAME}; is it a directory written by save_finetuned()?"
        )
    meta = read_json(config_path, CorruptCheckpointError)
    _check_meta(meta, config_path, verify)
    return meta


def config_from_meta(meta: dict[str, Any], config_cls: type[Any]) -> Any:
    """The method's config from a checkpoint's "config" object: the config layer validates the
    values, and whatever it raises comes out as DeltaConfigError."""
    try:
        return config_cls.from_dict(meta["config"], strict=True)
    except OpenDeltaError:
        raise
    except Exception as exc:  # a value the method's own checks did not expect (an unhashable, a nested object)
        raise DeltaConfigError(f"the checkpoint's {meta['delta_type']!r} config is invalid ({type(exc).__name__}: {exc}).") from exc


def open_checkpoint(directory: str | os.PathLike, *, verify: bool = True) -> StoredCheckpoint:
    """Read and check the checkpoint's config and its tensors' header; the tensor data is read
    (and checksummed, unless verify=False) only by the returned object's ``load``."""
    meta = read_meta(directory, verify=verify)
    weights = Path(directory) / meta["weights"]["file"]
    if not weights.is_file():
        raise CheckpointNotFoundError(f"the checkpoint in {str(directory)!r} is missing its tensors file {weights.name}")
    stored, size = read_safetensors_header(weights)
    stacks, aliases = meta.get("stacks", {}), meta.get("shared_tensors", {})
    shapes = checkpoint_shapes(meta, stored, weights)
    sha256 = meta["weights"].get("sha256") if verify else None

    def load(device: torch.device | str) -> dict[str, torch.Tensor]:
        tensors = unstack_groups(read_safetensors(weights, size, sha256, device), stacks)
        tensors.update({key: tensors[saved_as] for key, saved_as in aliases.items()})
        return tensors

    return StoredCheckpoint(meta=meta, shapes=shapes, load=load)


def checkpoint_shapes(meta: dict[str, Any], header: dict[str, tuple[int, ...]], source: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every checkpoint key, from the weights file's header shapes (`header`, read from
    `source`) and the config's stacks and shared tensors."""
    return _unstacked_shapes(header, meta.get("stacks", {}), meta.get("shared_tensors", {}), source)


def is_checkpoint_folder(directory: Path) -> bool:
    """Whether `directory` holds an opendelta checkpoint config."""
    return (directory / CONFIG_NAME).is_file()


def saved_order(meta: dict[str, Any], where: str | os.PathLike) -> tuple[float, int]:
    """The (position, creation stamp) a checkpoint records; (0, 0), i.e. created at an unknown
    time, for checkpoints written before the field existed."""
    if "order" not in meta:
        return 0, 0
    saved = meta["order"]
    position = saved.get("position") if isinstance(saved, dict) else None
    created = saved.get("created") if isinstance(saved, dict) else None
    if not is_finite_number(position) or not is_count(created):
        raise CorruptCheckpointError(
            f"the config in {str(where)!r} has 'order' {saved!r}; it must be "
            '{"position": <finite number>, "created": <integer >= 0>}: restore it, or delete the field to load '
            "the delta at the default position."
        )
    return position, created


def read_delta_checkpoint(directory: Path, *, verify: bool = True) -> CheckpointContents:
    """The opendelta checkpoint in `directory`, its config and tensor header read and checked."""
    return delta_contents(open_checkpoint(directory, verify=verify), directory)


def delta_contents(stored: StoredCheckpoint, directory: str | os.PathLike) -> CheckpointContents:
    """An opendelta checkpoint in opendelta's terms, from its checked config and tensor header."""
    config_cls, delta_cls = lookup(stored.meta["delta_type"])
    position, created = saved_order(stored.meta, directory)
    return CheckpointContents(
        delta_class=delta_cls,
        config=config_from_meta(stored.meta, config_cls),
        modules=stored.meta["modules"],
        stored=stored,
        backbone_tensors=stored.meta.get("backbone_tensors", {}),
        trained_on=stored.meta.get("backbone", {}).get("class", "?"),
        position=position,
        created=created,
    )


def read_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu", *, verify: bool = True) -> DeltaCheckpoint:
    """Load and verify the checkpoint in `directory` (header, checksum, then tensors): each tensor
    once, as saved (a shared tensor under its first key only)."""
    stored = open_checkpoint(directory, verify=verify)
    aliases = stored.meta.get("shared_tensors", {})
    return DeltaCheckpoint(meta=stored.meta, tensors={k: v for k, v in stored.load(device).items() if k not in aliases})
