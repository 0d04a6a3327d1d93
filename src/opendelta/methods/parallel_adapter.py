"""Parallel adapter (He et al., 2022): a bottleneck beside a block, ``h_out += s * act(h_in W_down) W_up``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opendelta.config import DeltaConfig, choice, positive, size
from opendelta.delta_base import DeltaBase
from opendelta.methods.adapter import ACTIVATIONS, BottleneckLayer, bottleneck_linears, hidden_size
from opendelta.routing import Span
from opendelta.runtime_init import Observation


class ParallelAdapterLayer(BottleneckLayer):
    """m(h_in) = s * up(act(down(h_in))), added to the block's output."""

    route = "parallel"

    def __init__(self, down: nn.Module, up: nn.Module, non_linearity: str, factor: float):
        super().__init__(down, up, non_linearity)
        self.factor = factor

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.factor * self.up(ACTIVATIONS[self.non_linearity](self.down(h)))


@dataclass
class ParallelAdapterConfig(DeltaConfig):
    bottleneck_dim: int = size(24)
    non_linearity: str = choice("gelu_new", ACTIVATIONS)
    #: s, the factor on the adapter's output (named `scaled` in the original OpenDelta's API)
    scaled: float = positive(1.0)


class ParallelAdapterModel(DeltaBase):
    """A bottleneck adapter fed with each addressed block's input and added to its output.

    Arguments: ``bottleneck_dim=24, non_linearity="gelu_new", scaled=1.0`` (s); default
    positions: the attention block and the feed-forward block (``attn``, ``ffn``); where no single
    module holds the feed-forward block (BERT, BART, OPT), the span from its first projection's
    input to its last projection's output (``ffn.up->ffn.down``). Any span ``"start->end"`` of
    two modules can be addressed in `modified_modules`.
    """

    config_class = ParallelAdapterConfig
    delta_type = "parallel_adapter"
    default_modified_modules = ("attn", "ffn", "ffn.up->ffn.down")
    needs_runtime_init = True
    accepts_spans = True

    def new_layer(self, path: str, module: nn.Module | Span, observation: Observation | None) -> ParallelAdapterLayer:
        d_in = hidden_size(path, observation, "A parallel adapter", side="input")
        d_out = hidden_size(path, observation, "A parallel adapter")
        assert observation is not None
        down, _ = bottleneck_linears(d_in, self.config.bottleneck_dim, observation)
        _, up = bottleneck_linears(d_out, self.config.bottleneck_dim, observation)
        return ParallelAdapterLayer(down, up, self.config.non_linearity, float(self.config.scaled))
