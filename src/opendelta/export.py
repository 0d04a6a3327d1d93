"""Shipping a tuned delta as a plain model: fold it into the weights for good, or write the merged model.

:func:`merge_and_unload` (PEFT's name) leaves the backbone holding the merged weights and no
delta at all: no hooks, no delta children, no state-dict filter; the delta object is spent.
:func:`export_merged` writes the merged model to a folder without changing the model in memory:
a transformers model as ``save_pretrained`` does (``from_pretrained(dir)`` loads it), any other
``nn.Module`` as one ``model.safetensors`` state dict. Only methods that fold into a module's weights
merge (LoRA, VeRA, LoHa, LoKr, OFT, AdaLoRA, trainable tokens, IA3, BitFit on modules with a bias); the others
raise MergeError naming what to do. A quantized backbone's folder keeps its layers quantized (re-quantized with
the delta merged) where a transformers quantizer owns them (``quantization_config`` in the config, which
``from_pretrained`` applies again); layers quantized by hand are written dense, as the ``nn.Linear`` they compute.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from opendelta import scaling
from opendelta.addressing import is_delta_module
from opendelta.checkpoint_files import checkpoint_path, safetensors_bytes, save_folder, write_files
from opendelta.errors import LifecycleError, MergeError
from opendelta.merging import folded_values
from opendelta.quantized import dequantized_weight, is_quantized

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase

#: the file a plain nn.Module's merged state dict is written to (transformers' own name for it)
WEIGHTS_NAME = "model.safetensors"


def _cannot_merge(delta: DeltaBase, exc: MergeError) -> MergeError:
    """`exc` restated to say how to ship a delta that cannot merge."""
    return MergeError(
        f"delta {delta.name!r} ({delta.delta_type}) cannot be folded into the backbone's weights: {exc} "
        "To ship it, save the delta with save_finetuned() and load it onto the backbone with from_finetuned() "
        "(or format='peft' where PEFT has the method)."
    )


def _merge_or_explain(delta: DeltaBase) -> None:
    """delta.merge(), with a MergeError that says how to ship a delta that cannot merge."""
    try:
        delta.merge()
    except MergeError as exc:
        raise _cannot_merge(delta, exc) from exc


def _unmerged_deltas(delta: DeltaBase) -> list[str]:
    """Paths of the delta layers inside the backbone that are not `delta`'s (other deltas, attached unmerged)."""
    own = {id(layer) for layer in delta.layers.values()}
    return [
        path for path, module in delta.backbone_model.named_modules()
        if is_delta_module(module) and id(module) not in own
    ]


def merge_and_unload(delta: DeltaBase) -> None:
    """Fold `delta` into the backbone's weights and take every trace of it out, keeping the merged
    weights and the trained values of the backbone tensors it trained (an unfrozen head).

    Afterwards the backbone is a plain model (its own ``requires_grad`` flags back, full
    ``state_dict()``); the original weights are not kept, so this cannot be undone. A delta that
    cannot merge raises MergeError and nothing changes.
    """
    if not delta.is_attached:
        raise LifecycleError(f"delta {delta.name!r} is detached; attach() it before merge_and_unload()")
    if not delta.is_merged:
        _merge_or_explain(delta)
    with torch.no_grad():
        merged = {
            (path, key): param.detach().clone()
            for path, target in delta.targets.items()
            for key, param in target.site.named_parameters(recurse=False)
        }
        trained = {name: t.detach().clone() for name, t in delta.trained_backbone_tensors().items()}
    delta.detach()  # puts the originals back, removes layers, hooks, flags and the state-dict filter
    params = dict(delta.backbone_model.named_parameters())
    with torch.no_grad():
        for (path, key), value in merged.items():
            getattr(delta.targets[path].site, key).copy_(value)
        for name, value in trained.items():
            params[name].copy_(value)


def export_merged(delta: DeltaBase, directory: str | os.PathLike, *, max_shard_size: int | str = "50GB") -> str:
    """Write the backbone with `delta` merged into `directory`; the model in memory stays as it was.

    A transformers model is written with ``save_pretrained`` (config and safetensors weights,
    loadable with ``from_pretrained(directory)``); any other module as ``model.safetensors``
    (``module.load_state_dict(safetensors.torch.load_file(...))`` loads it). Every other delta on
    the backbone must be merged or detached first, since the folder could not hold it.
    """
    if not delta.is_attached:
        raise LifecycleError(f"delta {delta.name!r} is detached; attach() it before export_merged()")
    directory = checkpoint_path(directory, "export_merged")
    others = _unmerged_deltas(delta)
    if others:
        raise LifecycleError(
            f"the backbone also carries delta layers that are not merged ({others[:3]}); a merged model cannot hold "
            "them. Merge those deltas too, or detach them, before export_merged()."
        )
    save_folder(directory, create=False)  # a bad path fails before the model changes
    model = delta.backbone_model
    if delta.is_merged:
        _write_model(model, directory, _exported_state_dict(model), max_shard_size)
    elif any(target.is_span or _kept_quantized(model, target.site) for target in delta.targets.values()):
        # a quantized weight the folder keeps quantized is stored as its backend re-quantizes the merged value
        # (packed tensors beside the weight): only writing it into the layer makes them, so merge in place and
        # put the weights back
        _merge_or_explain(delta)
        try:
            _write_model(model, directory, _exported_state_dict(model), max_shard_size)
        finally:
            delta.unmerge()
    else:
        _write_model(model, directory, _merged_state_dict(delta), max_shard_size)
    return str(directory)


def _quantizer_reloads(model: nn.Module) -> bool:
    """Whether `model`'s quantized layers belong to a transformers quantizer (``quantization_config`` in
    its config), so that ``from_pretrained`` of the saved folder quantizes them again the same way."""
    return getattr(model, "hf_quantizer", None) is not None


def _kept_quantized(model: nn.Module, module: nn.Module) -> bool:
    """Whether the exported folder holds `module` (of `model`) in its quantized form rather than dense."""
    return is_quantized(module) and _quantizer_reloads(model)


def _write_model(model: nn.Module, directory: Path, state: dict[str, torch.Tensor], max_shard_size: int | str) -> None:
    """`state` as `model`'s folder: ``save_pretrained`` for a transformers model, else one safetensors file."""
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        model.save_pretrained(directory, state_dict=state, max_shard_size=max_shard_size)
    else:
        data, _ = safetensors_bytes(_unshared(state))
        write_files(save_folder(directory), [(WEIGHTS_NAME, data)])


def _merged_state_dict(delta: DeltaBase) -> dict[str, torch.Tensor]:
    """The state dict the backbone would have with `delta` merged, built without merging: the live state
    dict less the delta's layers, each merged parameter's entry replaced by its merged value (as merge()
    computes and writes it). The live weights are only read, so the model stays as it was bit for bit,
    and no copy of the weights before the merge is made and written back (what merge() + unmerge() cost)."""
    scaling.check_unscaled(delta, "export_merged")
    try:
        # a quantized layer reaching here is written dense (quantized ones the folder keeps merge in place)
        folded = folded_values(delta.backbone_model, delta.targets, delta.layers, requantized=False)
    except MergeError as exc:
        raise _cannot_merge(delta, exc) from exc
    with delta._changes.unfiltered_state_dict():
        state = _exported_state_dict(delta.backbone_model, leave_out=delta.layers.values())
    for path, values in folded.items():
        for key, value in values.items():
            name = f"{path}.{key}" if path else key
            # as copy_ into the parameter would store it: its dtype, device and a dense layout (Conv1D's
            # merged weight is a transposed view)
            state[name] = value.to(dtype=state[name].dtype, device=state[name].device, memory_format=torch.contiguous_format)
    return state


def _exported_state_dict(model: nn.Module, leave_out: Iterable[nn.Module] = ()) -> dict[str, torch.Tensor]:
    """What the folder holds: the whole state dict (:func:`_whole_state_dict`), with each quantized layer
    that no transformers quantizer will re-quantize on load written as the plain ``nn.Linear`` it computes
    (its dequantized ``weight`` in the compute dtype, and its ``bias``), which ``from_pretrained`` of the
    model's unquantized class loads. Its packed form could not be reloaded: a layer quantized by hand
    (torchao's ``to_nf4``, an ``HQQLinear`` put in place) has no config entry that rebuilds it, and a torchao
    wrapper tensor has no storage that safetensors can write."""
    state = _whole_state_dict(model, leave_out)
    quantized = {f"{path}." if path else "": module for path, module in model.named_modules() if is_quantized(module)}
    if not quantized or _quantizer_reloads(model):
        return state
    # a quantized layer has no submodules of its own: every entry under its name is its packed form
    packed = tuple(quantized)
    state = {key: value for key, value in state.items() if not key.startswith(packed)}
    with torch.no_grad():
        for prefix, module in quantized.items():
            state[f"{prefix}weight"] = dequantized_weight(module).contiguous()
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                state[f"{prefix}bias"] = module.bias.detach()
    return state


def _whole_state_dict(model: nn.Module, leave_out: Iterable[nn.Module] = ()) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the tensors of the modules in `leave_out`, checked to hold every
    other parameter and persistent buffer: a state-dict filter still installed (another delta's, the
    user's) must not make a partial model."""
    left_out = {id(module) for module in leave_out}
    modules = list(model.named_modules(remove_duplicate=False))
    skipped = tuple(f"{path}." for path, module in modules if id(module) in left_out)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith(skipped)}
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [
        f"{path}.{key}" if path else key
        for path, module in modules
        for key, buffer in module._buffers.items()
        if buffer is not None and key not in module._non_persistent_buffers_set
    ]
    missing = [n for n in names if n not in state and not n.startswith(skipped)]
    if missing:
        raise LifecycleError(
            f"the backbone's state_dict() leaves out {len(missing)} of its tensors (e.g. {missing[:3]}): a state-dict "
            "hook filters it. Remove that hook (or detach the delta that installed it) before export_merged()."
        )
    return state


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share memory (tied weights) copied apart, as safetensors needs."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        t = tensor.detach()
        storage = t.untyped_storage().data_ptr()
        out[key] = t.clone(memory_format=torch.contiguous_format) if storage in seen or not t.is_contiguous() else t
        seen.add(storage)
    return out
