"""LoHa (Hyeon-Woo et al., 2022, FedPara): a Hadamard product of two low-rank weights beside a linear map
or a convolution, ``dW = s * (A1 B1) * (A2 B2)``, ``s = alpha / r``; a rank-r^2 change for the parameters
of two rank-r LoRAs. A convolution's dW is its kernel flattened to (out, in/groups x kernel size), as in
PEFT's LoHa without ``use_effective_conv2d``.

As in PEFT, A1, B1 and A2 start random and B2 at zero, so a fresh LoHa changes nothing. Backward keeps
only the four factors and recomputes the two products (:class:`HadamardProduct`), as PEFT does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opendelta.delta_base import DeltaBase
from opendelta.layer_kinds import WeightMap
from opendelta.linear_maps import weight_like
from opendelta.runtime_init import Observation
from opendelta.weight_change import WeightChangeConfig, WeightChangeLayer, weight_map_of


@dataclass
class LoHaConfig(WeightChangeConfig):
    #: False: B2 random too, so a fresh delta already changes the outputs (PEFT's init_weights=False)
    init_weights: bool = True


class HadamardProduct(torch.autograd.Function):
    """``(w1a @ w1b) * (w2a @ w2b) * scaling``, saving only the factors for backward: autograd would keep both
    out x in products until then, and recomputing them there costs two rank-r matrix products."""

    @staticmethod
    def forward(ctx, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scaling: float) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scaling = scaling
        return (w1a @ w1b) * (w2a @ w2b) * scaling

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # autograd's own steps for the expression above, so the gradients are the same bits
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scaling
        of_first = grad * (w2a @ w2b)  # the gradient of w1a @ w1b
        grad_w1a, grad_w1b = of_first @ w1b.t(), w1a.t() @ of_first
        del of_first  # one out x in temporary at a time
        of_second = grad * (w1a @ w1b)
        return grad_w1a, grad_w1b, of_second @ w2b.t(), w2a.t() @ of_second, None


class LoHaLayer(WeightChangeLayer):
    """``dW = s * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)``: a factors out x r, b factors r x in."""

    def __init__(self, form: WeightMap, config: LoHaConfig, weight: torch.Tensor, path: str):
        super().__init__(form, config.rank_dropout, config.module_dropout, rank_dropout_scale=True)  # PEFT always rescales
        r, self.scaling = config.rank_and_scaling(path)
        in_features, out_features = form.in_features, form.out_features
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r, **factory))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_features, **factory))
        if weight.device.type != "meta":
            for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, *([] if config.init_weights else [self.hada_w2_b])):
                nn.init.kaiming_uniform_(factor, a=5**0.5)

    def weight_change(self) -> torch.Tensor:
        return HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling)


class LoHaModel(DeltaBase):
    """LoHa on every addressed linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) or convolution (``nn.Conv1d/2d/3d``).

    Arguments (PEFT's names): ``r=8, alpha=8`` (s = alpha / r), ``rank_dropout=0.0``, ``module_dropout=0.0``,
    ``rank_pattern`` / ``alpha_pattern`` (per-module overrides), ``init_weights=True``; default
    positions: attention query and value.
    """

    config_class = LoHaConfig
    delta_type = "loha"
    default_modified_modules = ("attn.q", "attn.v")

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> LoHaLayer:
        return LoHaLayer(weight_map_of("LoHa", path, module), self.config, weight_like(module), path)
