"""Plain LoRA layers of one module in a mixed batch, run as one batched product for all their rows.

In a mixed batch of many LoRA tasks each layer would gather its rows, run two small products and
scatter-add them back: five ops per task per module, which in decoding (one token per row) is all
the time there is. :class:`StackedLora` gives every covered row its own factors, stacked once per
mixed batch (``A^T``: n x in x r, ``s B^T``: n x r x out, lower ranks padded with zeros, which add
exact zeros), and adds ``h A^T (s B^T)`` for all rows with two ``bmm`` calls. Rows of a mix are
disjoint, so each row's output gets exactly one change, as it would alone; the products round
differently from the per-task kernels (like any batched kernel), within the batching noise the
mixed-batch tests measure.

With gradients enabled (training through a mixed batch) per-row factors would need a gather
of every factor into each row and its scatter back in backward, so training uses the factors side
by side instead: one product ``h [A_1; ...; A_k]^T`` gives every row all tasks' rank-r columns,
a per-row mask (the task's scaling on its own columns, exact zeros elsewhere) keeps only its own
task's, and one product with ``[B_1, ..., B_k]`` adds the change. Zeroed columns add exact zeros
and pass back zero gradients, so each row's gradient reaches only its own task's factors; the
products round differently from the per-task ones (like any batched kernel). It costs k times the
rank-r columns per row, so it is used while the stacked rank is at most a quarter of the layer's
smaller side (the extra columns then cost at most half the frozen layer's own product); above that,
a dropout in training mode or a scale set meanwhile, the layers run one by one, as without
stacking. Factors or scalings changed during the batch (in place, replaced, moved, or a float scaling
set by hand: :mod:`opendelta.watch`) are restacked before use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from opendelta.watch import Sources

if TYPE_CHECKING:
    from opendelta.methods.lora import LoraLayer


def accumulator(h_out: torch.Tensor) -> torch.Tensor | None:
    """A 2-D tensor that is `h_out`'s memory and may be updated in place, or None.

    A linear map keeps neither its output nor (on 3-D inputs) the 2-D matrix product it views for
    backward, so adding in place is safe. Adding into the product itself, not into the view, spares
    autograd the view bookkeeping (CopySlices), which would copy the gradient twice in backward.
    Without autograd (decoding) there is no bookkeeping, so a 2-D view of a contiguous output serves
    too: a bias-free linear's 3-D output is no view of its product (matmul returns it through
    ``_unsafe_view``). In place or not, addmm adds the same product the same way, bit for bit.
    """
    if torch.compiler.is_compiling():  # the compiler fuses the out-of-place form itself; data_ptr checks break graphs
        return None
    base = h_out._base
    if base is None:
        if h_out.dim() > 2 and not torch.is_grad_enabled() and h_out.is_contiguous():
            return h_out.view(-1, h_out.shape[-1])
        base = h_out
    if (
        base.dim() == 2
        and not (base.is_leaf and base.requires_grad)
        and base.is_contiguous()
        and h_out.is_contiguous()
        and base.numel() == h_out.numel()
        and base.data_ptr() == h_out.data_ptr()
        and base.shape[-1] == h_out.shape[-1]
    ):
        return base
    return None


def add_product(h_out: torch.Tensor, low: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h_out + low @ b.T`` in `h_out`'s shape, added in place into its memory where `accumulator` allows.

    One GEMM adds the product onto the output (no output-sized temporary), and taking B^T as the second
    factor makes autograd compute B's gradient as (low^T g)^T, several times faster on CPU than the
    g^T low of a linear layer's weight gradient.
    """
    flat = accumulator(h_out)
    if flat is None:
        return torch.addmm(h_out.reshape(-1, h_out.shape[-1]), low, b.t()).view(h_out.shape)
    flat.addmm_(low, b.t())
    if flat.shape == h_out.shape:
        return flat
    # `h_out` shares `flat`'s memory, so it holds the sum already; without autograd (decoding) it is
    # returned as it is (one op less per call). With it, a fresh view: the one made before the in-place
    # add would rebuild its autograd history on use
    return h_out if not flat.requires_grad else flat.view(h_out.shape)


class StackedLora:
    """``route_parallel`` for the plain LoRA layers of `parts` ((layer, its rows) pairs, rows disjoint)."""

    def __init__(self, parts: list[tuple[LoraLayer, torch.Tensor]], batch_size: int):
        self.parts = list(parts)
        self.batch_size = batch_size
        self.rows = torch.cat([rows for _, rows in parts])
        #: whether the rows are every row of the batch in order: then the change is added in place, no scatter
        self.full = self.rows.numel() == batch_size and bool(
            torch.equal(self.rows, torch.arange(batch_size, device=self.rows.device))
        )
        self._sources: Sources | None = None  # stacked on first use without gradients
        first = self.parts[0][0]
        self.ranks = [layer.lora_A.shape[0] for layer, _ in self.parts]
        smaller_side = min(first.lora_A.shape[1], first.lora_B.shape[0])
        #: whether training takes the side-by-side product (see the module's docstring)
        self.side_by_side = 4 * sum(self.ranks) <= smaller_side
        self._masks: dict[torch.dtype, tuple[torch.Tensor, list[int]]] = {}  # with the layers' attribute edits then

    def _stack(self) -> None:
        # what the stack is made of: the factors, the scalings (floats, or a hot-swap slot's tensors)
        self._sources = Sources(layer for layer, _ in self.parts)
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
        return self._sources is None or not self._sources.unchanged()

    def _one_by_one(self) -> bool:
        return any(layer.change_scale != 1.0 or (layer.dropout is not None and layer.training) for layer, _ in self.parts)

    def _mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(rows, 1, stacked rank): each covered row's own task's scaling on its columns, zeros elsewhere."""
        scalings = [layer.scaling for layer, _ in self.parts]
        edits = [layer.attribute_edits for layer, _ in self.parts]
        mask, made_at = self._masks.get(dtype, (None, None))
        if mask is not None and made_at == edits and not any(isinstance(s, torch.Tensor) for s in scalings):
            return mask  # a float scaling changes only by an attribute edit (a hot-swap slot's tensor, in place)
        first = self.parts[0][0].lora_A
        mask = torch.zeros(self.batch_size, sum(self.ranks), dtype=dtype, device=first.device)
        start = 0
        for (_, rows), r, scaling in zip(self.parts, self.ranks, scalings):
            mask[rows, start : start + r] = scaling
            start += r
        mask = mask.unsqueeze(1)
        self._masks[dtype] = (mask, edits)
        return mask

    def _side_by_side(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        """Every task's factors side by side, each row masked to its own task's columns (the module's docstring)."""
        # by subscript, as LoraLayer.route_parallel reads them (DeepSpeed ZeRO-3 gathers on __getitem__)
        a = torch.cat([layer._parameters["lora_A"] for layer, _ in self.parts])
        b = torch.cat([layer._parameters["lora_B"] for layer, _ in self.parts], dim=1)
        dtype, stacked = h_out.dtype, a.shape[0]
        if dtype != a.dtype and any(layer.in_own_precision for layer, _ in self.parts):
            # the precision policy's float32 factors on a low-precision backbone: computed in their dtype and
            # cast back, as each layer's own route does (opendelta.precision)
            return self._side_by_side(h_in.to(a.dtype), h_out.to(a.dtype)).to(dtype)
        low = F.linear(h_in, a)
        if low.dtype != dtype:  # autocast made the output lower precision
            low = low.to(dtype)
        low = (low.view(self.batch_size, -1, stacked) * self._mask(dtype)).view(-1, stacked)
        if b.dtype != dtype:
            b = b.to(dtype)
        return add_product(h_out, low, b)

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled()
        if training and self.side_by_side and not self._one_by_one():
            return self._side_by_side(h_in, h_out)
        if training or self._one_by_one():
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
