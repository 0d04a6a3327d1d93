"""The original OpenDelta's (0.3.2) checkpoint folders: ``config.json`` + ``pytorch_model.bin``.

The original's ``save_finetuned`` wrote the backbone's trainable state dict with ``torch.save`` and
its config as JSON. Here such a folder is read without unrestricted unpickling
(``torch.load(weights_only=True)``: tensors and plain containers only) and translated into
opendelta's terms: the delta tensors' keys by a table per method (:data:`KEY_MAPS`), everything
else as backbone tensors the delta trains (an unfrozen head). ``opendelta convert`` rewrites such a
folder in opendelta's own format (safetensors + JSON, checksummed).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from opendelta.checkpoint import CheckpointContents, StoredCheckpoint, delta_key, write_checkpoint
from opendelta.checkpoint_files import checkpoint_path, read_json
from opendelta.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from opendelta.original_config import read_saved_config
from opendelta.registry import lookup
from opendelta.version import __version__

ORIGINAL_CONFIG = "config.json"
ORIGINAL_WEIGHTS = "pytorch_model.bin"

#: delta_type -> (pattern of an original state-dict key of a delta tensor, the layer key it becomes);
#: the pattern's ``path`` group is the module the original inserted its delta module into
KEY_MAPS: dict[str, tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = {
    # LowRankLinear inserted in parallel as "lora": lora_A (r, in), lora_B (out, r), as ours
    "lora": (re.compile(r"(?P<path>.+)\.lora(?:_\d+)?\.(?P<key>lora_A|lora_B)"), lambda m: m["key"]),
    # AdapterLayer inserted sequentially as "adapter": modulelist.down_proj / up_proj Linear layers
    "adapter": (
        re.compile(r"(?P<path>.+)\.adapter(?:_\d+)?\.modulelist\.(?P<proj>down_proj|up_proj)\.(?P<p>weight|bias)"),
        lambda m: f"{'down' if m['proj'] == 'down_proj' else 'up'}.{m['p']}",
    ),
}


def is_original_folder(directory: Path) -> bool:
    """Whether `directory` looks like a folder the original OpenDelta saved (a delta config.json
    beside pytorch_model.bin; a transformers model folder has those names too, but no delta_type)."""
    config = directory / ORIGINAL_CONFIG
    if not (config.is_file() and (directory / ORIGINAL_WEIGHTS).is_file()):
        return False
    try:
        values = read_json(config, CorruptCheckpointError)
    except CheckpointError:
        return False
    return isinstance(values, dict) and "delta_type" in values


def refuse_saving(delta: Any) -> None:
    raise CheckpointError(
        "opendelta reads the original OpenDelta's pickled format but never writes pickles; save with "
        "format='opendelta' (safetensors + JSON), which opendelta and `opendelta convert` produce."
    )


def load_state_dict_safely(weights: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: a pickle that holds anything but tensors and plain
    containers is refused (CorruptCheckpointError), never run."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"{weights} is not a plain tensor state dict that can be read without running code "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it is damaged, or holds "
            "objects other than tensors, which opendelta does not unpickle."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CorruptCheckpointError(f"{weights} must hold a dict of tensor names to tensors (a state dict)")
    return state


def translate_state_dict(delta_type: str, state: dict[str, torch.Tensor], where: str) -> tuple[list[str], dict[str, torch.Tensor], dict[str, Any]]:
    """An original state dict in opendelta's checkpoint terms: (module paths, tensors by checkpoint
    key, backbone tensor name -> shape)."""
    if delta_type not in KEY_MAPS:
        raise IncompatibleCheckpointError(
            f"{where} holds an original OpenDelta {delta_type!r} delta; opendelta translates the original's "
            f"{', '.join(sorted(KEY_MAPS))} checkpoints. Retrain the delta with opendelta's {delta_type!r} method."
        )
    pattern, layer_key = KEY_MAPS[delta_type]
    paths: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    backbone: dict[str, Any] = {}
    for name, tensor in state.items():
        match = pattern.fullmatch(name)
        if match is None:
            tensors[f"backbone.{name}"] = tensor
            backbone[name] = list(tensor.shape)
            continue
        if match["path"] not in paths:
            paths.append(match["path"])
        tensors[delta_key(match["path"], layer_key(match))] = tensor
    if not paths:
        raise CorruptCheckpointError(f"{where} holds no {delta_type} tensors (keys such as {pattern.pattern!r})")
    return paths, tensors, backbone


def original_keys_as_backbone_keys(delta_type: str, state: Mapping[str, torch.Tensor], delta_name: str) -> dict[str, torch.Tensor]:
    """An original state dict under the keys the backbone's ``state_dict()`` has with opendelta's
    delta `delta_name` attached (for ``load_state_dict``)."""
    if delta_type not in KEY_MAPS:
        raise IncompatibleCheckpointError(f"opendelta translates the original's {', '.join(sorted(KEY_MAPS))} tensors, not {delta_type!r}")
    pattern, layer_key = KEY_MAPS[delta_type]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = pattern.fullmatch(name)
        out[f"{match['path']}.{delta_name}.{layer_key(match)}" if match else name] = tensor
    return out


def read_original_checkpoint(directory: str | os.PathLike, *, verify: bool = True) -> CheckpointContents:
    """An original OpenDelta folder in opendelta's terms (it records no checksum, so `verify` has
    nothing to check; the tensors are read here, since a pickle has no header)."""
    folder = checkpoint_path(directory, "from_finetuned")
    if not (folder / ORIGINAL_WEIGHTS).is_file():
        raise CheckpointNotFoundError(f"{str(folder)!r} has no {ORIGINAL_WEIGHTS}")
    config = read_saved_config(folder)
    state = load_state_dict_safely(folder / ORIGINAL_WEIGHTS)
    paths, tensors, backbone = translate_state_dict(config.delta_type, state, str(folder))
    _, delta_cls = lookup(config.delta_type)
    stored = StoredCheckpoint(
        meta={"config": config.to_dict()},
        shapes={k: tuple(v.shape) for k, v in tensors.items()},
        load=lambda device: {k: v.to(device) for k, v in tensors.items()},
    )
    return CheckpointContents(
        delta_class=delta_cls, config=config, modules=paths, stored=stored, backbone_tensors=backbone,
        trained_on=getattr(config, "backbone_class", None) or "backbone of unknown class",
    )


def convert(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rewrite the original OpenDelta folder `directory` as an opendelta checkpoint in `out`
    (safetensors + JSON, checksummed), loadable with ``AutoDeltaModel.from_finetuned(out, model)``."""
    contents = read_original_checkpoint(directory)
    tensors = contents.stored.load("cpu")
    meta = {
        "delta_type": contents.config.delta_type,
        "name": contents.config.delta_type,
        "order": {"position": 0, "created": 0},  # unknown creation time: placed by content among others
        "library_version": __version__,
        "config": contents.config.to_dict(),
        "modules": contents.modules,
        "backbone_tensors": contents.backbone_tensors,
        "backbone": {"class": contents.trained_on},
    }
    return write_checkpoint(out, meta, tensors)
