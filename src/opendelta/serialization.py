"""Saving and loading deltas: the table of checkpoint formats and the steps every format shares.

A format (checkpoint.py: opendelta's own; peft_format.py: PEFT's adapter folders) only turns a
delta into files and files into :class:`~opendelta.checkpoint.CheckpointContents`, through the
file operations of checkpoint_files.py. Here, for every
format: gathering the tensors across ranks before a save, and on load checking the tensors
against the module list and the backbone before the backbone is touched, then building the delta.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta.checkpoint import (
    CheckpointContents,
    delta_key,
    is_checkpoint_folder,
    read_delta_checkpoint,
    shared_keys,
    write_delta_checkpoint,
)
from opendelta.checkpoint_files import checkpoint_path, save_folder
from opendelta.distributed import all_ranks_arrive, full_tensors, on_rank_zero
from opendelta.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UnreachedModuleError,
    UnsupportedModuleError,
)
from opendelta.original_format import is_original_folder, read_original_checkpoint, refuse_saving
from opendelta.peft_format import check_peft_expressible, is_peft_folder, read_peft_checkpoint, write_peft_checkpoint
from opendelta.runtime_init import model_device
from opendelta.targets import targets_at

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase


@dataclass(frozen=True)
class CheckpointFormat:
    """One way of writing a delta to a folder and reading it back."""

    #: whether a folder holds a checkpoint of this format
    holds: Callable[[Path], bool]
    #: raise (before any rank gathers tensors) if the delta cannot be written in this format
    check_savable: Callable[[DeltaBase], None]
    #: write the delta given its gathered checkpoint tensors
    write: Callable[[DeltaBase, Path, dict[str, torch.Tensor]], Any]
    #: read a folder's config and tensor header (not its tensor data)
    read: Callable[..., CheckpointContents]


#: save_finetuned(format=...) -> the format; loading tries them in this order
FORMATS: dict[str, CheckpointFormat] = {
    "opendelta": CheckpointFormat(
        holds=is_checkpoint_folder, check_savable=lambda delta: None, write=write_delta_checkpoint,
        read=read_delta_checkpoint,
    ),
    "peft": CheckpointFormat(
        holds=is_peft_folder, check_savable=check_peft_expressible, write=write_peft_checkpoint,
        read=read_peft_checkpoint,
    ),
    # the original OpenDelta's config.json + pytorch_model.bin: read only (original_format.py)
    "original": CheckpointFormat(
        holds=is_original_folder, check_savable=refuse_saving, write=refuse_saving, read=read_original_checkpoint,
    ),
}
#: the format that explains a folder holding none (its reader names what is missing)
DEFAULT_FORMAT = "opendelta"


def checkpoint_tensors(delta: DeltaBase) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `delta` holds, by checkpoint key, as they live in the model
    (possibly sharded): each layer's, a shared tensor once, and the backbone tensors it trains."""
    aliases = shared_keys(delta.layers)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in delta.layers.items():
        for key, tensor in layer.state_dict(keep_vars=True).items():
            if delta_key(path, key) not in aliases:
                tensors[delta_key(path, key)] = tensor
    tensors.update({f"backbone.{n}": t for n, t in delta.trained_backbone_tensors().items()})
    return tensors


def save_delta(delta: DeltaBase, directory: str | os.PathLike, format: str, arrival_timeout_s: float) -> str:
    """DeltaBase.save_finetuned: every check that can fail runs on every rank before they gather."""
    if not isinstance(format, str) or format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; expected one of {tuple(FORMATS)}")
    save_folder(directory, create=False)  # a bad path fails here, on every rank, before gathering
    FORMATS[format].check_savable(delta)
    all_ranks_arrive(f"save_finetuned({str(directory)!r})", arrival_timeout_s)
    tensors = full_tensors(checkpoint_tensors(delta))
    on_rank_zero(str(directory), lambda: FORMATS[format].write(delta, Path(directory), tensors))
    return str(directory)


def read_contents(directory: str | os.PathLike, *, verify: bool = True) -> CheckpointContents:
    """The checkpoint in `directory`, in whichever format it is, config and tensor header checked."""
    path = checkpoint_path(directory, "from_finetuned")
    found = next((f for f in FORMATS.values() if f.holds(path)), FORMATS[DEFAULT_FORMAT])
    return found.read(path, verify=verify)


def load_delta(
    directory: str | os.PathLike,
    backbone_model: nn.Module,
    *,
    expected: type[DeltaBase] | None,
    name: str | None,
    dummy_inputs: Any,
    verify: bool,
    position: float | None,
) -> DeltaBase:
    """DeltaBase.from_finetuned: read, check against `backbone_model`, build, fill and attach.
    `expected` is the class the caller asked for (None: any); `position` overrides the saved one."""
    contents = read_contents(directory, verify=verify)
    where = f"{checkpoint_path(directory, 'from_finetuned')} (trained on a {contents.trained_on})"
    return load_contents(
        contents, str(directory), where, backbone_model, expected=expected, name=name, dummy_inputs=dummy_inputs,
        position=position,
    )


def check_fits(
    delta_cls: type[DeltaBase], modules: list[str], trained_on: str, source: str, backbone_model: nn.Module,
    expected: type[DeltaBase] | None,
) -> list[Any]:
    """The targets of a checkpoint's modules on `backbone_model`, or IncompatibleCheckpointError if it
    holds another class than `expected` or the backbone lacks a module; needs only the config."""
    if expected is not None and not issubclass(delta_cls, expected):
        raise IncompatibleCheckpointError(
            f"{source} holds a {delta_cls.delta_type!r} delta; load it with "
            f"{delta_cls.__name__}.from_finetuned or AutoDeltaModel.from_finetuned"
        )
    targets, missing = targets_at(backbone_model, modules)
    if missing:
        raise IncompatibleCheckpointError(
            f"the checkpoint was trained on a {trained_on}; this {type(backbone_model).__name__} has no "
            f"module(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    return targets


def load_contents(
    contents: CheckpointContents,
    source: str,
    where: str,
    backbone_model: nn.Module,
    *,
    expected: type[DeltaBase] | None,
    name: str | None,
    dummy_inputs: Any,
    position: float | None,
) -> DeltaBase:
    """Check `contents` (read from `source`, described as `where` in errors) against
    `backbone_model`, then read its tensor data, build, fill and attach."""
    if contents.for_backbone is not None:  # a format whose module list depends on the backbone
        contents = contents.for_backbone(backbone_model)
    delta_cls = contents.delta_class
    targets = check_fits(delta_cls, contents.modules, contents.trained_on, source, backbone_model, expected)
    try:
        delta = delta_cls.build_detached(backbone_model, contents.config, targets, name=name, dummy_inputs=dummy_inputs)
    except UnreachedModuleError:
        raise
    except UnsupportedModuleError as exc:
        raise IncompatibleCheckpointError(f"the checkpoint does not fit this backbone: {exc}") from exc
    backbone_names = list(contents.backbone_tensors)
    match_tensors(delta, contents.stored.shapes, backbone_names, where)  # before the data is read and hashed
    device = model_device(backbone_model)
    tensors = contents.stored.load(torch.device("cpu") if device.type == "meta" else device)
    match_tensors(delta, {k: tuple(v.shape) for k, v in tensors.items()}, backbone_names, where)
    created = contents.created
    # a delta of unknown creation time is placed by its content, never by the loading order
    order = (contents.position if position is None else position, created, "" if created else _content_digest(tensors))
    layer_states = {path: {k: tensors[delta_key(path, k)] for k in layer.state_dict()} for path, layer in delta.layers.items()}
    delta.load_trained_state(layer_states, {n: tensors[f"backbone.{n}"] for n in backbone_names}, order=order)
    return delta


def match_tensors(delta: DeltaBase, shapes: dict[str, tuple[int, ...]], backbone_names: list[str], where: str) -> None:
    """A checkpoint's tensors must be exactly the ones `delta`'s modules use (else
    CorruptCheckpointError: part of the delta would be dropped or made up) with the backbone's
    shapes (else IncompatibleCheckpointError)."""
    own = {delta_key(p, k): tuple(t.shape) for p, layer in delta.layers.items() for k, t in layer.state_dict().items()}
    params = dict(delta.backbone_model.named_parameters())
    own.update({f"backbone.{n}": tuple(params[n].shape) for n in backbone_names if n in params})
    absent = [n for n in backbone_names if n not in params]  # the backbone does not fit: not corruption
    missing = [key for key in own if key not in shapes]
    unused = sorted(set(shapes) - set(own) - {f"backbone.{n}" for n in absent})
    if missing or unused:
        raise CorruptCheckpointError(
            f"the tensors of {where} do not match its module list: "
            + (f"missing {_few(missing)}" if missing else "")
            + ("; " if missing and unused else "")
            + (f"not used by any listed module {_few(unused)}" if unused else "")
            + ". The checkpoint is damaged or was edited; save it again."
        )
    mismatched = [f"{key}: checkpoint {shapes[key]} vs backbone {own[key]}" for key in own if shapes[key] != own[key]]
    mismatched += [f"{n}: no such backbone parameter" for n in absent]
    if mismatched:
        raise IncompatibleCheckpointError(
            f"the checkpoint {where} does not fit this {type(delta.backbone_model).__name__}: " + _few(mismatched)
        )


def _few(items: list[str]) -> str:
    """The first few of a list of problems, for an error message."""
    return "; ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")


def _content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of a checkpoint's tensors (names, dtypes, shapes, bytes), independent of where they live."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensors[key].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
