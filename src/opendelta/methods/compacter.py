"""Compacter (Mahabadi et al., 2021): an adapter whose projections are PHM layers, ``W = sum_i A_i (x) B_i``.

Each projection's weight is a sum of n Kronecker products of a small "rule" A_i (n x n) and a
block B_i (in/n x out/n), with n = ``hypercomplex_division``; with ``factorized_phm`` each B_i is
itself a rank-``phm_rank`` product s_i t_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opendelta.config import DeltaConfig
from opendelta.delta_base import DeltaBase
from opendelta.errors import DeltaConfigError, UnsupportedModuleError
from opendelta.methods.adapter import (
    ACTIVATIONS,
    BottleneckLayer,
    check_activation,
    check_init,
    check_positive_int,
    glorot_,
    hidden_size,
)
from opendelta.runtime_init import Observation


def new_phm_rule(n: int, config: CompacterConfig, observation: Observation) -> torch.Tensor:
    """The n rules A_i as one (n, n, n) tensor, initialised as ``phm_c_init`` says."""
    rule = torch.empty(n, n, n, dtype=observation.dtype, device=observation.device)
    if config.phm_c_init == "normal":
        rule.normal_(0.0, config.phm_init_range)
    else:
        rule.uniform_(-1.0, 1.0)
    return rule


class PHMLinear(nn.Module):
    """y = h (sum_i A_i (x) B_i) + b; ``zero=True`` starts the B_i (so y - b) at zero.

    The rule A is this layer's own unless the caller passes a shared one to :meth:`forward`.
    """

    def __init__(
        self, in_features: int, out_features: int, config: CompacterConfig, observation: Observation, *,
        zero: bool, bias: bool, own_rule: bool,
    ):
        super().__init__()
        n = config.hypercomplex_division
        p, q = in_features // n, out_features // n
        factory = {"dtype": observation.dtype, "device": observation.device}
        init = config.hypercomplex_nonlinearity
        if config.factorized_phm:
            self.W_left = nn.Parameter(torch.empty(n, p, config.phm_rank, **factory))
            self.W_right = nn.Parameter(torch.zeros(n, config.phm_rank, q, **factory))
            glorot_(self.W_left, p, q, init)
            if not zero:
                glorot_(self.W_right, p, q, init)
        else:
            self.W = nn.Parameter(torch.zeros(n, p, q, **factory))
            if not zero:
                glorot_(self.W, p, q, init)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        if own_rule:
            rule = new_phm_rule(n, config, observation)
            if config.learn_phm:
                self.phm_rule = nn.Parameter(rule)
            else:
                self.register_buffer("phm_rule", rule)

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        blocks = self.W_left @ self.W_right if hasattr(self, "W_left") else self.W
        n, p, q = blocks.shape
        return torch.einsum("iab,ixy->axby", rule, blocks).reshape(n * p, n * q)

    def forward(self, h: torch.Tensor, rule: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight(self.phm_rule if rule is None else rule)
        flat = h.reshape(-1, h.shape[-1])
        out = flat @ weight if self.bias is None else torch.addmm(self.bias, flat, weight)
        return out.view(*h.shape[:-1], -1)


class CompacterLayer(BottleneckLayer):
    """A PHM bottleneck; with ``shared_phm_rule`` its down and up projections share one rule A."""

    def __init__(self, down: PHMLinear, up: PHMLinear, non_linearity: str, shared_rule: torch.Tensor | None,
                 learn_rule: bool):
        super().__init__(down, up, non_linearity)
        if shared_rule is not None:
            if learn_rule:
                self.phm_rule = nn.Parameter(shared_rule)
            else:
                self.register_buffer("phm_rule", shared_rule)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rule = getattr(self, "phm_rule", None)
        return self.up(ACTIVATIONS[self.non_linearity](self.down(h, rule)), rule)


@dataclass
class CompacterConfig(DeltaConfig):
    reduction_factor: int = 16
    non_linearity: str = "gelu_new"
    hypercomplex_division: int = 4
    phm_c_init: str = "normal"
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    shared_phm_rule: bool = False
    factorized_phm: bool = True
    phm_rank: int = 1
    phm_init_range: float = 0.0001
    use_bias_up_sampler: bool = True
    use_bias_down_sampler: bool = True

    def validate(self) -> None:
        check_positive_int("reduction_factor", self.reduction_factor)
        check_positive_int("hypercomplex_division", self.hypercomplex_division)
        check_positive_int("phm_rank", self.phm_rank)
        check_activation(self.non_linearity)
        check_init("hypercomplex_nonlinearity", self.hypercomplex_nonlinearity)
        if self.phm_c_init not in ("normal", "uniform"):
            raise DeltaConfigError(f"phm_c_init must be 'normal' or 'uniform', got {self.phm_c_init!r}")
        if not self.phm_init_range > 0:
            raise DeltaConfigError(f"phm_init_range must be positive, got {self.phm_init_range!r}")


class CompacterModel(DeltaBase):
    """A Compacter (PHM adapter) after each addressed module.

    Arguments: ``reduction_factor=16`` (bottleneck = hidden // reduction_factor),
    ``hypercomplex_division=4`` (n), ``non_linearity="gelu_new"``, ``phm_c_init="normal"``,
    ``phm_init_range=1e-4``, ``learn_phm=True``, ``hypercomplex_nonlinearity="glorot-uniform"``,
    ``shared_phm_rule=False`` (True: the down and up projections of an adapter share A),
    ``factorized_phm=True``, ``phm_rank=1``, ``use_bias_up_sampler=True``,
    ``use_bias_down_sampler=True``; default positions: as the adapter (``attn.o``, ``ffn.down``).
    """

    config_class = CompacterConfig
    delta_type = "compacter"
    default_modified_modules = ("attn.o", "ffn.down")
    needs_runtime_init = True

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> CompacterLayer:
        dim = hidden_size(path, observation, "Compacter")
        assert observation is not None
        c = self.config
        n = c.hypercomplex_division
        bottleneck = dim // c.reduction_factor
        if bottleneck < 1 or dim % n or bottleneck % n:
            raise UnsupportedModuleError(
                f"Compacter needs the hidden size and the bottleneck (hidden // reduction_factor) to be positive "
                f"multiples of hypercomplex_division={n}, but at {path!r} they are {dim} and {bottleneck}; "
                "choose a smaller reduction_factor or hypercomplex_division."
            )
        own = not c.shared_phm_rule
        down = PHMLinear(dim, bottleneck, c, observation, zero=False, bias=c.use_bias_down_sampler, own_rule=own)
        up = PHMLinear(bottleneck, dim, c, observation, zero=True, bias=c.use_bias_up_sampler, own_rule=own)
        shared = None if own else new_phm_rule(n, c, observation)
        return CompacterLayer(down, up, c.non_linearity, shared, c.learn_phm)
