"""Deltas that change a layer's weight, ``W <- W + dW``: beside the layer, ``m(h)`` = h mapped by dW.

A method whose change is a weight formed from its factors (LoHa's Hadamard product, LoKr's
Kronecker product, VeRA's scaled random projections) subclasses :class:`WeightChangeLayer` and
gives :meth:`~WeightChangeLayer.weight_change`; the layer's forward and merge() follow from it, for
``nn.Linear``, GPT-2's ``Conv1D`` and convolutions alike (dW is always out x in, a kernel flattened
as :class:`opendelta.layer_kinds.WeightMap` says). The LyCORIS family's two
training-time dropouts act on dW, as PEFT does: ``rank_dropout`` zeroes output rows of dW,
``module_dropout`` skips the whole change for a call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opendelta.addressing import matches
from opendelta.config import DeltaConfig, number, positive, size
from opendelta.errors import UnsupportedModuleError
from opendelta.layer import DeltaLayer
from opendelta.layer_kinds import WeightMap, weight_map

_PROBABILITY = {"low": 0.0, "high": 1.0, "high_open": True}


@dataclass
class WeightChangeConfig(DeltaConfig):
    """The arguments of a weight change of rank r scaled by ``alpha / r`` (PEFT's LyCORIS arguments)."""

    r: int = size(8)
    alpha: float = positive(8)
    #: training only: the probability of zeroing each output row of dW (PEFT's rank_dropout)
    rank_dropout: float = number(0.0, **_PROBABILITY)
    #: training only: the probability of skipping the change for a whole call
    module_dropout: float = number(0.0, **_PROBABILITY)
    #: per-module r and alpha, ``{module pattern: value}`` in the addressing syntax; first match wins
    rank_pattern: dict[str, int] | None = size(None)
    alpha_pattern: dict[str, float] | None = positive(None)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank r and the alpha of the change at module `path` (the first matching pattern, else the defaults)."""
        r = next((v for k, v in (self.rank_pattern or {}).items() if matches(path, k)), self.r)
        alpha = next((v for k, v in (self.alpha_pattern or {}).items() if matches(path, k)), self.alpha)
        return r, alpha

    def rank_and_scaling(self, path: str) -> tuple[int, float]:
        """The rank r and the scaling ``alpha / r`` of the change at module `path`."""
        r, alpha = self.rank_and_alpha(path)
        return r, alpha / r


def weight_map_of(method: str, path: str, module: nn.Module) -> WeightMap:
    """The :class:`WeightMap` of the layer a weight-change delta acts on, or UnsupportedModuleError saying what it takes."""
    form = weight_map(module)
    if form is None:
        raise UnsupportedModuleError(
            f"{method} changes the weight of a linear layer (nn.Linear, Conv1D) or a zero-padded convolution "
            f"(nn.Conv1d/2d/3d), but {path!r} is a {type(module).__name__}"
            f"{' with padding_mode=' + repr(module.padding_mode) if hasattr(module, 'padding_mode') else ''}; "
            "address the layers inside it, or others, instead."
        )
    return form


class WeightChangeLayer(DeltaLayer):
    """``m(h)`` = h mapped by ``dW = weight_change()`` (out x in) as the layer maps it by W; merges as ``W + dW``.

    In training, ``module_dropout`` skips the change for a call and ``rank_dropout`` zeroes each
    output row of dW with that probability, rescaling the kept rows by the inverse of the fraction
    kept when ``rank_dropout_scale`` (a call that keeps no row changes nothing).
    """

    route = "parallel"

    def __init__(self, form: WeightMap, rank_dropout: float = 0.0, module_dropout: float = 0.0, rank_dropout_scale: bool = False):
        super().__init__()
        self.form = form
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.rank_dropout_scale = rank_dropout_scale

    def weight_change(self) -> torch.Tensor:
        """dW, out x in, in the layer's dtype (without dropout)."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout and not bool(torch.rand(1) > self.module_dropout):
            return torch.zeros((), dtype=h.dtype, device=h.device)  # adds nothing, broadcast over the output
        change = self.weight_change()
        if self.training and self.rank_dropout:
            change = self.drop_rows(change)
        return self.form.apply(h, change)

    def drop_rows(self, change: torch.Tensor) -> torch.Tensor:
        """dW with each output row zeroed with probability ``rank_dropout``."""
        rows = change.shape[0]
        kept = (torch.rand(rows) > self.rank_dropout).float()
        if self.rank_dropout_scale:
            # the mean is 0 or at least 1/rows: the floor only turns PEFT's 0/0 (NaN) into "no change"
            kept = kept / kept.mean().clamp_min(0.5 / rows)
        return (change * kept.to(change.device).unsqueeze(1)).to(change.dtype)

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``W + dW`` (transposed back for Conv1D, shaped as the kernel for a convolution)."""
        return {"weight": self.form.add_to(module, self.weight_change())}

