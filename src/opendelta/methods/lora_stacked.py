"""Plain LoRA layers of one module in a mixed batch, run as one batched product for all their rows.

In a mixed batch of many LoRA tasks each layer would gather its rows, run two small products and
scatter-add them back: five ops per task per module, which in decoding (one token per row) is all
the time there is. :class:`StackedLora` gives every covered row its own factors, stacked once per
mixed batch (``A^T``: n x in x r, ``s B^T``: n x r x out, lower ranks padded with zeros, which add
exact zeros), and adds ``h A^T (s B^T)`` for all rows with two ``bmm`` calls. Rows of a mix are
disjoint, so each row's output gets exactly one change, as it would alone; the products round
differently from the per-task kernels (like any batched kernel), within the batching noise the
mixed-batch tests measure.

It serves inference only: with gradients enabled (training through a mixed batch), a dropout in
training mode or a scale set meanwhile, it runs the layers one by one, as without stacking. Factors
changed in place during the batch (their version counters move; also a hot-swap slot's scaling) are
restacked before use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from opendelta.methods.lora import LoraLayer


class StackedLora:
    """``route_parallel`` for the plain LoRA layers of `parts` ((layer, its rows) pairs, rows disjoint)."""

    def __init__(self, parts: list[tuple[LoraLayer, torch.Tensor]], batch_size: int):
        self.parts = list(parts)
        self.rows = torch.cat([rows for _, rows in parts])
        #: whether the rows are every row of the batch in order: then the change is added in place, no scatter
        self.full = self.rows.numel() == batch_size and bool(
            torch.equal(self.rows, torch.arange(batch_size, device=self.rows.device))
        )
        self._stamp: list | None = None
        self._stack()

    def _factors(self) -> list[torch.Tensor]:
        """What the stack is made of: the factors, and the scalings a hot-swap slot holds as tensors."""
        held = [t for layer, _ in self.parts for t in (layer._parameters["lora_A"], layer._parameters["lora_B"])]
        return held + [layer.scaling for layer, _ in self.parts if isinstance(layer.scaling, torch.Tensor)]

    def _stack(self) -> None:
        factors = self._factors()
        self._stamp = [(t, t._version) for t in factors]
        first = self.parts[0][0].lora_A
        rank = max(layer.lora_A.shape[0] for layer, _ in self.parts)
        n, features_in, features_out = self.rows.numel(), first.shape[1], self.parts[0][0].lora_B.shape[0]
        with torch.no_grad():
            a = first.new_zeros(n, features_in, rank)
            b = first.new_zeros(n, rank, features_out)
            start = 0
            for layer, rows in self.parts:
                end, r = start + rows.numel(), layer.lora_A.shape[0]
                a[start:end, :, :r] = layer.lora_A.t()
                b[start:end, :r, :] = layer.lora_B.t() * layer.scaling
                start = end
        self.a, self.b = a, b

    def _stale(self) -> bool:
        stamp = self._stamp
        assert stamp is not None
        return any(t is not held or t._version != version for t, (held, version) in zip(self._factors(), stamp))

    def _one_by_one(self) -> bool:
        return torch.is_grad_enabled() or any(
            layer.change_scale != 1.0 or (layer.dropout is not None and layer.training) for layer, _ in self.parts
        )

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        if self._one_by_one():
            for layer, rows in self.parts:
                if layer.change_scale == 1.0:
                    h_out = layer.route_parallel_rows(h_in, h_out, rows)
                else:
                    change = layer.scaled_change(h_in.index_select(0, rows), layer.change_scale)
                    h_out = h_out.index_add(0, rows, change)
            return h_out
        if self._stale():
            self._stack()
        a, b = self.a, self.b
        if a.dtype != h_out.dtype:  # autocast made the output lower precision
            a, b = a.to(h_out.dtype), b.to(h_out.dtype)
        n = self.rows.numel()
        h = h_in if self.full else h_in.index_select(0, self.rows)
        low = torch.bmm(h.reshape(n, -1, a.shape[1]).to(a.dtype), a)
        if self.full and h_out.is_contiguous():
            # h_out is a linear layer's fresh output (as the per-row path, which adds in place too)
            h_out.view(n, -1, b.shape[2]).baddbmm_(low, b)
            return h_out
        return h_out.index_add_(0, self.rows, torch.bmm(low, b).view(n, *h_out.shape[1:]))
