"""The reference for a mixed batch: each row run alone, with only its own delta attached."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from opendelta import DeltaBase


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
