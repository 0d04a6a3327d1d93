"""Recognising linear maps, whichever class implements them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from opendelta import quantized


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D`` (transposed
    weight), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None


def weight_like(module: nn.Module) -> torch.Tensor:
    """A tensor with the dtype and device a delta beside this linear map takes: its weight, or for a
    quantized layer (quantized.py) an empty tensor in the dtype it computes in."""
    if quantized.is_quantized(module):
        return torch.empty(0, dtype=quantized.compute_dtype(module), device=module.weight.device)
    return module.weight


def fold_into_weight(module: nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`change` applied to a linear map's weight seen as (out, in), returned in the module's own
    layout (a quantized layer's: dequantized; writing it back re-quantizes, see merging.py)."""
    if quantized.is_quantized(module):
        return change(quantized.dequantized_weight(module))
    weight = module.weight
    if isinstance(module, nn.Linear):
        return change(weight)
    return change(weight.t()).t()  # Conv1D stores (in, out)
