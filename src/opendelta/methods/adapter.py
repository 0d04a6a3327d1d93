"""Adapters (Houlsby et al., 2019): a bottleneck after a sub-layer, ``h_out += act(h_out W_down) W_up``.

The bottleneck here is shared by the adapter family: Compacter and the low-rank adapter swap in
other linear maps for the two projections, the parallel adapter feeds it a block's input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opendelta.config import DeltaConfig, choice, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import UnsupportedModuleError
from opendelta.layer import DeltaLayer
from opendelta.runtime_init import Observation

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda h: F.gelu(h, approximate="tanh"),  # the name transformers gives the tanh approximation
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda h: h,
}


def hidden_size(path: str, observation: Observation | None, method: str, *, side: str = "output") -> int:
    """The observed last-dimension size of the module's output (or input) at `path`."""
    shape, dtype = None, None
    if observation is not None:
        shape = observation.output_shape if side == "output" else observation.input_shape
        dtype = observation.dtype if side == "output" else observation.input_dtype
    if not shape or dtype is None or not dtype.is_floating_point:
        raise UnsupportedModuleError(
            f"{method} needs a module whose {side} is a hidden-state tensor (batch, ..., hidden), but the dummy "
            f"forward saw no floating-point tensor {side} at {path!r}; address a linear layer or a block instead."
        )
    return shape[-1]


def reduced_sizes(
    path: str, observation: Observation | None, method: str, reduction_factor: int, *, multiple_of: int = 1
) -> tuple[int, int]:
    """``(hidden, hidden // reduction_factor)`` at `path`; both must be positive multiples of `multiple_of`."""
    dim = hidden_size(path, observation, method)
    bottleneck = dim // reduction_factor
    if bottleneck < 1 or dim % multiple_of or bottleneck % multiple_of:
        need = "positive" if multiple_of == 1 else f"positive multiples of hypercomplex_division={multiple_of}"
        raise UnsupportedModuleError(
            f"{method} needs the hidden size and the bottleneck (hidden // reduction_factor={reduction_factor}) to be "
            f"{need}, but at {path!r} they are {dim} and {bottleneck}; choose a smaller reduction_factor"
            + (" or hypercomplex_division." if multiple_of > 1 else f" (at most {dim}).")
        )
    return dim, bottleneck


class BottleneckLayer(DeltaLayer):
    """m(h) = up(act(down(h))); `up` starts at zero, so a fresh bottleneck changes nothing."""

    route = "after"

    def __init__(self, down: nn.Module, up: nn.Module, non_linearity: str):
        super().__init__()
        self.down = down
        self.up = up
        self.non_linearity = non_linearity

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(ACTIVATIONS[self.non_linearity](self.down(h)))


def bottleneck_linears(dim: int, bottleneck: int, observation: Observation) -> tuple[nn.Linear, nn.Linear]:
    """Down and up projections of a plain adapter in the hidden state's dtype and device; up is zero."""
    factory = {"dtype": observation.dtype, "device": observation.device}
    down = nn.Linear(dim, bottleneck, **factory)
    up = nn.Linear(bottleneck, dim, **factory)
    with torch.no_grad():
        nn.init.normal_(down.weight, std=1e-2)  # OpenDelta's initialisation of the down projection
        down.bias.zero_()
        up.weight.zero_()
        up.bias.zero_()
    return down, up


@dataclass
class AdapterConfig(DeltaConfig):
    bottleneck_dim: int = size(24)
    non_linearity: str = choice("gelu_new", ACTIVATIONS)


class AdapterModel(DeltaBase):
    """A bottleneck adapter after each addressed module, added to its output.

    Arguments: ``bottleneck_dim=24, non_linearity="gelu_new"``; default positions: the attention
    output projection and the feed-forward down projection (``attn.o``, ``ffn.down``).
    """

    config_class = AdapterConfig
    delta_type = "adapter"
    default_modified_modules = ("attn.o", "ffn.down")
    needs_runtime_init = True

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> BottleneckLayer:
        dim = hidden_size(path, observation, "An adapter")
        assert observation is not None
        down, up = bottleneck_linears(dim, self.config.bottleneck_dim, observation)
        return BottleneckLayer(down, up, self.config.non_linearity)


WEIGHT_INITS = ("glorot-uniform", "glorot-normal", "normal")


def glorot_(tensor: torch.Tensor, fan_in: int, fan_out: int, kind: str) -> None:
    """One of :data:`WEIGHT_INITS` with explicit fans, for weights stored in factorised shapes."""
    with torch.no_grad():
        if kind == "glorot-uniform":
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            tensor.uniform_(-bound, bound)
        elif kind == "glorot-normal":
            tensor.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        else:
            tensor.normal_(0.0, 1e-2)
