"""Backbones bigger than memory: modules whose weights accelerate keeps offloaded (CPU or disk).

A model loaded with ``device_map=...`` and offloaded layers carries accelerate's ``AlignDevicesHook``
on each offloaded module: between calls its weights sit on the ``meta`` device, the hook loads them
from its weight map (memory or files on disk) for the call and puts them back on ``meta`` after.
Deltas live beside such a module without touching it: their layers take the device the hook
computes on and the dtype of the weight (never ``meta``), the weights and hooks stay as they are,
and what cannot be done exactly refuses with a typed error: merging into an offloaded weight (the
hook would reload the original from its map on the next call), training an offloaded backbone
tensor (the hook swaps in a new tensor every call, so an optimizer would never see its gradient),
and a delta inside a module whose hook offloads its whole sub-tree (the hook would offload the
delta's own tensors too). Nothing here imports accelerate: the hooks are recognised by their
attributes, so a model without them pays one ``getattr`` per module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from opendelta.errors import MergeError, UnsupportedModuleError

_HOOK_ATTR = "_hf_hook"  # where accelerate.hooks.add_hook_to_module keeps a module's hook


def _hooks(module: nn.Module) -> Iterator[Any]:
    """accelerate's hooks on `module`, a SequentialHook unpacked."""
    hook = getattr(module, _HOOK_ATTR, None)
    if hook is None:
        return
    for one in getattr(hook, "hooks", (hook,)):
        yield one


def offloading_hook(module: nn.Module) -> Any | None:
    """The accelerate hook that keeps `module`'s own weights offloaded, or None."""
    return next((h for h in _hooks(module) if getattr(h, "offload", False) and hasattr(h, "weights_map")), None)


def is_offloaded(module: nn.Module) -> bool:
    """Whether `module`'s weights stay offloaded (on ``meta``) between calls."""
    return offloading_hook(module) is not None


def execution_device(module: nn.Module) -> torch.device | None:
    """The device an offloaded `module` computes on (its hook's), or None when it is not offloaded."""
    hook = offloading_hook(module)
    if hook is None or hook.execution_device is None:
        return None
    device = hook.execution_device
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def computing_like(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or for an offloaded module's ``meta`` weight an empty tensor of its dtype on the
    device the module computes on: what a delta beside the module is made of."""
    device = execution_device(module) if tensor.is_meta else None
    return tensor if device is None else torch.empty(0, dtype=tensor.dtype, device=device)


def check_mergeable(paths_and_modules: Iterable[tuple[str, nn.Module]]) -> None:
    """MergeError for the first offloaded module: its hook reloads the stored weight on every call."""
    for path, module in paths_and_modules:
        if is_offloaded(module):
            raise MergeError(
                f"{path!r} has its weights offloaded by accelerate (device_map with 'cpu'/'disk' offload): its hook "
                "reloads the stored weight on every call, so a merged weight would be lost; keep the delta attached "
                "as a layer there (or load that module on a device first)."
            )


def check_trainable(path: str, module: nn.Module) -> None:
    """UnsupportedModuleError when backbone tensor `path` of `module` is offloaded and so cannot be trained."""
    if is_offloaded(module):
        raise UnsupportedModuleError(
            f"{path!r} is offloaded by accelerate: its hook loads a fresh copy from the weight map on every call, "
            "so an optimizer would never update it; train a delta there instead, or load that module on a device "
            "(leave it out of device_map's offloaded modules)."
        )


def check_placement(backbone: nn.Module, placed: Iterable[tuple[str, nn.Module, Any]]) -> None:
    """UnsupportedModuleError for a delta layer (`placed`: path, module, layer) that cannot work beside
    offloaded weights: inside a module whose hook offloads its whole sub-tree (``place_submodules``:
    that hook would offload the delta's own tensors too), or reading an offloaded module's weight
    after its call (DoRA: the hook has put the weight back on ``meta`` by then)."""
    placed = list(placed)
    for path, module, layer in placed:
        if getattr(layer, "reads_module", False) and is_offloaded(module):
            raise UnsupportedModuleError(
                f"{type(layer).__name__} at {path!r} reads the module's weight, but accelerate offloads that weight "
                "right after each call; use a method that does not read it (LoRA without DoRA), or load that "
                "module on a device."
            )
    owners = [
        name for name, m in backbone.named_modules()
        if any(getattr(h, "offload", False) and getattr(h, "place_submodules", False) for h in _hooks(m))
    ]
    for path, _, _ in placed:
        for name in owners:
            if not name or path == name or path.startswith(name + "."):
                raise UnsupportedModuleError(
                    f"{path!r} lies inside {name or 'the model'!r}, whose accelerate hook offloads every tensor below it "
                    "(a module class in preload_module_classes, or a whole-model cpu_offload), so it would offload the "
                    "delta too; offload its layers one by one (device_map per layer) or address a module outside it."
                )
