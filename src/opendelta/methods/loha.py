"""LoHa (Hyeon-Woo et al., 2022, FedPara): a Hadamard product of two low-rank weights beside a linear map
or a convolution, ``dW = s * (A1 B1) * (A2 B2)``, ``s = alpha / r``; a rank-r^2 change for the parameters
of two rank-r LoRAs. A convolution's dW is its kernel flattened to (out, in/groups x kernel size), as in
PEFT's LoHa without ``use_effective_conv2d``.

As in PEFT, A1, B1 and A2 start random and B2 at zero, so a fresh LoHa changes nothing.
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
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling


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
