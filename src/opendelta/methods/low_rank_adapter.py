"""Low-rank adapter (Mahabadi et al., 2021): an adapter whose projections are rank-r products ``W = L R``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opendelta.config import DeltaConfig, choice, size
from opendelta.delta_base import DeltaBase
from opendelta.methods.adapter import ACTIVATIONS, WEIGHT_INITS, BottleneckLayer, glorot_, reduced_sizes
from opendelta.runtime_init import Observation


class LowRankLinear(nn.Module):
    """y = h L R + b with L: (in, rank), R: (rank, out); ``zero=True`` starts R (so y - b) at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, init: str, observation: Observation, zero: bool):
        super().__init__()
        factory = {"dtype": observation.dtype, "device": observation.device}
        self.W_left = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.W_right = nn.Parameter(torch.zeros(rank, out_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        # each factor is initialised as if it were the full (in, out) matrix, whatever the rank
        glorot_(self.W_left, in_features, out_features, init)
        if not zero:
            glorot_(self.W_right, in_features, out_features, init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, h.reshape(-1, h.shape[-1]) @ self.W_left, self.W_right).view(*h.shape[:-1], -1)


@dataclass
class LowRankAdapterConfig(DeltaConfig):
    reduction_factor: int = size(32)
    non_linearity: str = choice("gelu_new", ACTIVATIONS)
    low_rank_w_init: str = choice("glorot-uniform", WEIGHT_INITS)
    low_rank_rank: int = size(1)


class LowRankAdapterModel(DeltaBase):
    """An adapter after each addressed module whose down and up projections have rank ``low_rank_rank``.

    Arguments: ``reduction_factor=32`` (bottleneck = hidden // reduction_factor),
    ``non_linearity="gelu_new"``, ``low_rank_w_init="glorot-uniform"``, ``low_rank_rank=1``
    (any rank works); default positions: as the adapter (``attn.o``, ``ffn.down``).
    """

    config_class = LowRankAdapterConfig
    delta_type = "low_rank_adapter"
    default_modified_modules = ("attn.o", "ffn.down")
    needs_runtime_init = True

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> BottleneckLayer:
        c = self.config
        dim, bottleneck = reduced_sizes(path, observation, "A low-rank adapter", c.reduction_factor)
        assert observation is not None
        down = LowRankLinear(dim, bottleneck, c.low_rank_rank, c.low_rank_w_init, observation, zero=False)
        up = LowRankLinear(bottleneck, dim, c.low_rank_rank, c.low_rank_w_init, observation, zero=True)
        return BottleneckLayer(down, up, c.non_linearity)
