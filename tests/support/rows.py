"""The reference for a mixed batch: each row run alone, with only its own delta attached, and the check
that a mixed batch matches it within the bare model's measured noise."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from support.numerics import assert_within_noise, batching_noise, float32_noise
from torch import nn

from opendelta import DeltaBase, mixed_batch


def each_row_alone(deltas: Sequence[DeltaBase], rows: Sequence[int], forward_row: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Detach every delta, then for each batch row i attach ``deltas[rows[i]]`` (none for -1), run
    ``forward_row(i)`` (a batch of one, no grad) and detach it again; the outputs concatenated."""
    for d in deltas:
        if d.is_attached:
            d.detach()
    results = []
    for i, r in enumerate(rows):
        if r >= 0:
            deltas[r].attach()
        with torch.no_grad():
            results.append(forward_row(i))
        if r >= 0:
            deltas[r].detach()
    return torch.cat(results)


def assert_mixed_batch_is_each_row_alone(
    model: nn.Module,
    attach: Callable[[nn.Module], Sequence[DeltaBase]],
    rows: Sequence[int],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
) -> None:
    """Measure the bare model's batching and float32 noise on `ids`, add deltas with `attach(model)` (non-zero
    values), then check that a mixed batch routing `rows` equals each row alone within that noise."""
    noise = batching_noise(model, lambda m, r: forward(m, ids[r]), len(ids)), float32_noise(model, lambda m, _: forward(m, ids))
    deltas = attach(model)
    with torch.no_grad(), mixed_batch(deltas, rows):
        mixed = forward(model, ids)
    alone = each_row_alone(deltas, rows, lambda i: forward(model, ids[i : i + 1]))
    assert_within_noise(mixed, alone, *noise)
