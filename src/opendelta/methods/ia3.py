"""(IA)^3 (Liu et al., 2022): learned vectors that rescale activations elementwise, ``h <- l * h``.

As in the paper, the vectors rescale the attention keys and values (the outputs of the key and
value projections) and the feed-forward intermediate activation, which is the *input* of the
feed-forward down projection (after the non-linearity, and after the gate in gated FFNs). Each
vector starts at one, so a fresh (IA)^3 changes nothing. Because ``l * (h W^T) = h (diag(l) W)^T``
and ``(l * h) W^T = h (W diag(l))^T``, a trained vector can be folded into the projection's
weight: :meth:`IA3Layer.scaled_weight` gives that weight for a later merge.

Beyond linear maps, (IA)^3 scales a convolution's output (or input) channels and an embedding's
output features (opendelta.layer_kinds.channels says where they lie).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from opendelta.config import DeltaConfig
from opendelta.delta_base import DeltaBase
from opendelta.errors import PatternError, StructureError, UnsupportedModuleError
from opendelta.layer_kinds import Channels, along, channels
from opendelta.linear_maps import fold_into_weight, weight_like
from opendelta.layer import DeltaLayer
from opendelta.runtime_init import Observation
from opendelta.targets import resolve


class IA3Layer(DeltaLayer):
    """Rescales a module's output: ``h_out * l``; the additive delta is ``m(h) = (l - 1) * h``."""

    route = "after"

    def __init__(self, features: int, weight: torch.Tensor, layout: Channels | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features, dtype=weight.dtype, device=weight.device))
        #: the dimension of the features in the hidden state, and the weight's axis this vector scales
        self.hidden_dim = -1 if layout is None else layout.hidden_dim
        axes = (0, 1) if layout is None else layout.weight_axes
        self.weight_axis = axes[1] if self.route == "before" else axes[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (along(self.scale, self.hidden_dim, h.dim()) - 1) * h

    def route_output(self, h: torch.Tensor) -> torch.Tensor:
        # multiplying is exact where h + (l - 1) * h is not, and a vector of ones gives h back bit for bit
        return h * along(self.scale, self.hidden_dim, h.dim())

    def scaled_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight of a layer that computes what this delta and the layer compute together (a linear
        map's seen as (out, in))."""
        return weight * along(self.scale, self.weight_axis, weight.dim())

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The scaled weight; an output scale also scales the module's bias."""
        merged = {"weight": fold_into_weight(module, self.scaled_weight)}
        if self.route == "after" and isinstance(getattr(module, "bias", None), torch.Tensor):
            merged["bias"] = module.bias * self.scale
        return merged


class IA3InputLayer(IA3Layer):
    """Rescales a module's input: ``h_in * l``."""

    route = "before"

    def route_input(self, h: torch.Tensor) -> torch.Tensor:
        return h * along(self.scale, self.hidden_dim, h.dim())


@dataclass
class IA3Config(DeltaConfig):
    feedforward_modules: list[str] | None = None


class IA3Model(DeltaBase):
    """(IA)^3 scaling vectors on the addressed linear layers.

    Arguments: ``feedforward_modules`` — which of the addressed modules get their *input* scaled
    (same syntax as ``modified_modules``; roles with ``common_structure=True``); the others get
    their output scaled. Default positions: ``attn.k``, ``attn.v``, and in encoder-decoders
    ``xattn.k``, ``xattn.v`` (outputs), and ``ffn.down`` (input); with ``modified_modules``
    given and no ``feedforward_modules``, every output is scaled.
    """

    config_class = IA3Config
    delta_type = "ia3"
    default_modified_modules = ("attn.k", "attn.v", "xattn.k", "xattn.v", "ffn.down")

    def prepare(self, observations: Mapping[str, Observation]) -> None:
        """Resolve ``feedforward_modules``: the targets whose input (not output) gets scaled."""
        paths = set(self._feedforward_paths(self.config.feedforward_modules))
        stray = sorted(paths - set(self.targets))
        if stray:
            raise PatternError(
                f"feedforward_modules names {stray[:3]}, which (IA)^3 does not modify; add them to "
                "modified_modules or drop them from feedforward_modules."
            )
        self.input_scaled_paths = paths

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> IA3Layer:
        layout = channels(module)
        if layout is None:
            raise UnsupportedModuleError(
                f"(IA)^3 needs a linear layer (nn.Linear or Conv1D), an nn.Embedding or an ungrouped nn.Conv1d/2d/3d, but "
                f"{path!r} is a {type(module).__name__}; address the key, value and feed-forward projections inside it instead."
            )
        if path in self.input_scaled_paths:
            if layout.in_features is None:
                raise UnsupportedModuleError(
                    f"{path!r} is an nn.Embedding, whose input is token ids, so (IA)^3 cannot scale it; leave it out of "
                    "feedforward_modules (its output can be scaled)."
                )
            return IA3InputLayer(layout.in_features, weight_like(module), layout)
        return IA3Layer(layout.out_features, weight_like(module), layout)

    def _feedforward_paths(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            if self.config.modified_modules is not None:
                return []
            try:  # the defaults skip what a family lacks (Mixtral's experts have no down projection module)
                return [t.path for t in resolve(self.backbone_model, ["ffn.down"], roles=True)]
            except StructureError:
                return []
        targets = resolve(self.backbone_model, names, roles=self.config.common_structure, what="feedforward_modules")
        return [t.path for t in targets]
