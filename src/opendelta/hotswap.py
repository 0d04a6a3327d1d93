"""Hot-swapping LoRA weights in a compiled model: one slot, many deltas, no recompilation.

A :class:`LoraSlot` is a LoRA delta at rank ``max_rank`` with scaling 1.0, attached once (compile
the model after creating it). ``slot.load(delta)`` copies another LoRA delta's factors into the
slot's parameters in place: A scaled by the delta's own scaling and both factors zero-padded to
``max_rank``, so ``B_slot A_slot = s B A``. Shapes, dtypes and the Python attributes the compiled
graph was guarded on never change, so ``torch.compile`` runs the new weights without recompiling;
the outputs equal the eager model with that delta attached (up to float rounding: the scaling is
applied to A instead of to the rank-r intermediate).
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
        # alpha = r: scaling exactly 1.0, so each swapped-in delta carries its own scaling in A
        self.delta = lora_cls(backbone_model, modified_modules=list(modified_modules), lora_r=max_rank,
                              lora_alpha=max_rank, name=name, **kwargs)
        self.max_rank = max_rank
        self.loaded: Any = None
        self.clear()

    def clear(self) -> None:
        """Zero the slot: the model computes what the bare backbone computes."""
        with torch.no_grad():
            for layer in self.delta.layers.values():
                layer.lora_A.zero_()
                layer.lora_B.zero_()
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
                if source is None:
                    continue
                r = source.lora_A.shape[0]
                layer.lora_A[:r].copy_(source.lora_A * source.scaling)
                layer.lora_B[:, :r].copy_(source.lora_B)
        self.loaded = delta
