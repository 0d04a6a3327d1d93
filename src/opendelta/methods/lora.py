"""LoRA (Hu et al., 2021): a low-rank update beside a linear map, ``h_out += s * h_in A^T B^T``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opendelta.config import DeltaConfig
from opendelta.delta_base import DeltaBase
from opendelta.errors import DeltaConfigError, UnsupportedModuleError
from opendelta.routing import DeltaLayer
from opendelta.runtime_init import Observation


@dataclass
class LoraConfig(DeltaConfig):
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise DeltaConfigError(f"lora_r must be a positive integer, got {self.lora_r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise DeltaConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D`` (transposed weight)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None


def fold_into_weight(module: nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`change` applied to a linear map's weight seen as (out, in), returned in the module's own layout."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        return change(weight)
    return change(weight.t()).t()  # Conv1D stores (in, out)


class LoraLayer(DeltaLayer):
    """m(h) = s * h A^T B^T with A: (r, in), B: (out, r) zero-initialised, s = alpha / r."""

    route = "parallel"

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, weight: torch.Tensor):
        super().__init__()
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(config.lora_r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.lora_r, **factory))
        if weight.device.type != "meta":  # a skeleton has no values to initialise
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = config.lora_alpha / config.lora_r
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            h = self.dropout(h)
        # scaling the rank-r intermediate costs r/out of scaling the output
        return F.linear(F.linear(h, self.lora_A) * self.scaling, self.lora_B)

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        # a linear map does not keep its output for backward, so accumulating in place is safe and saves a copy
        return h_out.add_(self(h_in))

    def route_parallel_rows(self, h_in: torch.Tensor, h_out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # in place for the reason route_parallel gives; one gather of the rows' inputs, one scatter-add
        return h_out.index_add_(0, rows, self(h_in.index_select(0, rows)))

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """W + s B A (transposed for Conv1D)."""
        update = (self.lora_B @ self.lora_A) * self.scaling
        return {"weight": fold_into_weight(module, lambda w: w + update.to(w.dtype))}


class LoraModel(DeltaBase):
    """LoRA on every addressed linear layer (``nn.Linear`` or GPT-2's ``Conv1D``).

    Arguments: ``lora_r=8, lora_alpha=16, lora_dropout=0.0``; default positions: attention
    query and value.
    """

    config_class = LoraConfig
    delta_type = "lora"
    default_modified_modules = ("attn.q", "attn.v")

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> LoraLayer:
        shape = linear_shape(module)
        if shape is None:
            raise UnsupportedModuleError(
                f"LoRA needs a linear layer (nn.Linear or Conv1D), but {path!r} is a {type(module).__name__}; "
                "address the linear projections inside it instead."
            )
        return LoraLayer(*shape, self.config, module.weight)
