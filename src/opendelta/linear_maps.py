"""Recognising linear maps, whichever class implements them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from opendelta import quantized
from opendelta.offload import computing_like


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an ``nn.Linear`` (an hqq ``HQQLinear`` too) or a transformers ``Conv1D`` (transposed
    weight), else None."""
    if isinstance(module, nn.Linear) or quantized.is_hqq(module):  # an HQQLinear is a linear map with no .weight
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A linear map's weight seen as (out, in): the ``nn.Linear`` weight itself, a view of a ``Conv1D``'s."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear map's weight as a dense (out, in) tensor: :func:`linear_weight`, or a quantized layer's
    dequantized weight (a new tensor: no gradient reaches the packed one)."""
    return quantized.dequantized_weight(module) if quantized.is_quantized(module) else linear_weight(module)


def weight_like(module: nn.Module) -> torch.Tensor:
    """A tensor with the dtype and device a delta beside this linear map takes: its weight, or for a
    quantized layer (quantized.py) an empty tensor in the dtype it computes in, for an offloaded one
    (offload.py) an empty tensor of its dtype on the device it computes on."""
    if quantized.is_quantized(module):
        device = module.device if quantized.is_hqq(module) else module.weight.device
        return torch.empty(0, dtype=quantized.compute_dtype(module), device=device)
    return computing_like(module, module.weight)


def fold_into_weight(module: nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`change` applied to a linear map's weight seen as (out, in), returned in the module's own
    layout (a quantized layer's: dequantized; writing it back re-quantizes, see merging.py)."""
    if quantized.is_quantized(module):
        return change(quantized.dequantized_weight(module))
    weight = module.weight
    if isinstance(module, nn.Linear) or linear_shape(module) is None:  # an embedding's or convolution's own layout
        return change(weight)
    return change(weight.t()).t()  # Conv1D stores (in, out)


def update_factors(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor | None = None, b0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A', B') of a low-rank change ``B' A'`` to a weight: ``B A``, or ``B A - B0 A0`` when the
    factors started at (A0, B0) (PiSSA, OLoRA), as ``[A; A - A0]``, ``[B - B0, B0]`` (rank 2r), since
    ``B A - B0 A0 = (B - B0) A + B0 (A - A0)``: exactly zero while A, B are still A0, B0."""
    if a0 is None or b0 is None:
        return a, b
    return torch.cat([a, a - a0]), torch.cat([b - b0, b0], 1)


def pad_rows(b: torch.Tensor, ranges: tuple[tuple[int, int], ...], rows: int) -> torch.Tensor:
    """`b` (its rows the `ranges`, in order) padded with zero rows to `rows` rows: the B of a LoRA on the
    whole weight whose change is zero outside `ranges` (also how PEFT stores such a LoRA)."""
    pieces, done, taken = [], 0, 0
    for start, stop in ranges:
        pieces += [b.new_zeros(start - done, b.shape[1]), b[taken : taken + stop - start]]
        taken, done = taken + stop - start, stop
    return torch.cat([*pieces, b.new_zeros(rows - done, b.shape[1])])
