"""Hot-swapping LoRA weights in a compiled model: one slot, many deltas, no recompilation.

A :class:`LoraSlot` is a LoRA delta at rank ``max_rank``, attached once (compile the model after
creating it), whose layers hold their scaling as a 0-dim float64 tensor instead of a Python float.
``slot.load(delta)`` copies another LoRA delta's factors into the slot's parameters in place
(zero-padded to ``max_rank``) and its scaling into that tensor. Shapes, dtypes and the Python
attributes the compiled graph was guarded on never change, so ``torch.compile`` runs the new
weights without recompiling. The slot runs LoRA's own route with the same operations in the same
order (a tensor scale multiplies as the same float does), so a delta of rank ``max_rank`` gives the
outputs of that delta attached normally bit for bit. A lower rank is zero-padded: the zeros are exact,
but the wider matrices make a BLAS kernel choose another blocking and accumulation order, so the
outputs equal that delta's within float rounding (docs/shipping.md measures why no padding avoids it),
and equal the same slot run eagerly bit for bit.
The slot is for serving: its own config records scaling 1.0, so save the deltas it loads, not the slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from opendelta.config import check_name_list
from opendelta.errors import DeltaConfigError, IncompatibleCheckpointError
from opendelta.registry import lookup


class LoraSlot:
    """A preallocated LoRA delta at `max_rank` on `modified_modules` that LoRA deltas are swapped into."""

    def __init__(self, backbone_model: nn.Module, modified_modules: Sequence[str], max_rank: int, *, name: str | None = None,
                 **kwargs: Any):
        check_name_list(modified_modules, "LoraSlot modified_modules", "modified_modules")
        if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
            raise DeltaConfigError(f"max_rank must be a positive integer (the largest rank to swap in), got {max_rank!r}")
        _, lora_cls = lookup("lora")
        self.delta = lora_cls(backbone_model, modified_modules=list(modified_modules), lora_r=max_rank,
                              lora_alpha=max_rank, name=name, **kwargs)
        for layer in self.delta.layers.values():
            # a tensor, not a buffer: .to(dtype) must not round it, and a CPU scalar multiplies tensors on any device
            layer.scaling = torch.tensor(1.0, dtype=torch.float64)
        self.max_rank = max_rank
        self.loaded: Any = None
        self.clear()

    def clear(self) -> None:
        """Zero the slot: the model computes what the bare backbone computes."""
        with torch.no_grad():
            for layer in self.delta.layers.values():
                layer.lora_A.zero_()
                layer.lora_B.zero_()
                layer.scaling.fill_(1.0)
        self.loaded = None

    def load(self, delta: Any) -> None:
        """Copy LoRA `delta`'s factors into the slot in place (modules it lacks get zeros).

        `delta` need not be attached (a detached delta or one built on another copy of the backbone
        works); its modules must be among the slot's and its ranks at most ``max_rank``.
        """
        if getattr(delta, "delta_type", None) != "lora":
            raise DeltaConfigError(f"LoraSlot.load takes a LoRA delta, got {delta!r}")
        layers = self.delta.layers
        stray = sorted(set(delta.layers) - set(layers))
        if stray:
            raise IncompatibleCheckpointError(
                f"delta {delta.name!r} modifies {stray[:3]}, which the slot does not; build the slot on those modules too."
            )
        for path, source in delta.layers.items():
            extra = sorted(({n for n, _ in source.named_parameters()} | set(dict(source.named_buffers()))) - {"lora_A", "lora_B"})
            if extra:
                raise DeltaConfigError(
                    f"delta {delta.name!r} at {path!r} also has {extra} (DoRA, or factors started from the weight); "
                    "the slot holds plain LoRA factors only. Attach that delta normally."
                )
            r = source.lora_A.shape[0]
            if r > self.max_rank or source.lora_A.shape[1] != layers[path].lora_A.shape[1] or \
                    source.lora_B.shape[0] != layers[path].lora_B.shape[0]:
                raise IncompatibleCheckpointError(
                    f"delta {delta.name!r} at {path!r} has factors {tuple(source.lora_A.shape)} and "
                    f"{tuple(source.lora_B.shape)}; the slot holds rank <= {self.max_rank} of "
                    f"{tuple(layers[path].lora_A.shape[1:])} in, {layers[path].lora_B.shape[0]} out."
                )
        with torch.no_grad():
            for path, layer in layers.items():
                source = delta.layers.get(path)
                layer.lora_A.zero_()
                layer.lora_B.zero_()
                layer.scaling.fill_(1.0)
                if source is None:
                    continue
                r = source.lora_A.shape[0]
                layer.lora_A[:r].copy_(source.lora_A)
                layer.lora_B[:, :r].copy_(source.lora_B)
                layer.scaling.fill_(float(source.scaling))
        self.loaded = delta
