"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every layer, scaled by
trained vectors: ``m(h) = b * ((d * (h A^T)) B^T)``, i.e. ``dW = diag(b) B diag(d) A``.

A (r x in_max) and B (out_max x r) are sized to the largest input and output of the addressed
layers, and each layer takes its top-left slice (as in PEFT). They come from ``projection_prng_key``
exactly as PEFT draws them (Kaiming-uniform from a seeded CPU generator), so a PEFT folder saved
without them rebuilds the same matrices. With ``save_projection=True`` (PEFT's default) a checkpoint
holds them once; with False it holds only the vectors and loading redraws the pair from the seed.
As in PEFT, d starts at ``d_initial`` and b at zero, so a fresh VeRA changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opendelta.config import DeltaConfig, number, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import UnsupportedModuleError
from opendelta.layer_kinds import WeightMap
from opendelta.linear_maps import linear_shape, weight_like
from opendelta.runtime_init import Observation
from opendelta.weight_change import WeightChangeLayer


@dataclass
class VeraConfig(DeltaConfig):
    #: the rank of the shared projections (PEFT's default; VeRA trains r + out values per layer, not r (in + out))
    r: int = size(256)
    #: the seed A and B are drawn from
    projection_prng_key: int = number(0, low=0, high=2**63 - 1)
    #: store A and B in the checkpoint (once); False: store only the vectors and redraw the pair from the seed
    save_projection: bool = True
    vera_dropout: float = number(0.0, low=0.0, high=1.0, high_open=True)
    #: the starting value of every entry of d (small values, <= 0.1, train best: the paper's table 6c)
    d_initial: float = number(0.1)


class VeraProjection(nn.Module):
    """The frozen pair one VeRA delta shares among its layers: ``vera_A`` (r x in_max), ``vera_B`` (out_max x r).

    One module held by every layer, so moves (``.to()``) and copies keep one pair, and a checkpoint
    stores it once (under the first layer's key). Its buffers are left out of state dicts when the
    pair is not saved (``save_projection=False``).
    """

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, persistent: bool, like: torch.Tensor):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # drawn in float32 on the CPU in PEFT's order (A, then B), whatever the backbone, so the seed alone rebuilds them
        a, b = _kaiming_uniform((r, in_max), generator), _kaiming_uniform((out_max, r), generator)
        self.register_buffer("vera_A", a.to(like.device, like.dtype), persistent=persistent)
        self.register_buffer("vera_B", b.to(like.device, like.dtype), persistent=persistent)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain sqrt(2) over fan_in (columns): ``U(-sqrt(6 / fan_in), +sqrt(6 / fan_in))``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraLayer(WeightChangeLayer):
    """``m(h) = b * ((d * (h A_s^T)) B_s^T)`` with the shared pair's slices A_s = A[:, :in], B_s = B[:out]."""

    def __init__(self, in_features: int, out_features: int, config: VeraConfig, projection: VeraProjection, weight: torch.Tensor):
        super().__init__(WeightMap(out_features, in_features))
        self.in_features, self.out_features = in_features, out_features
        self.projection = projection
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, **factory))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial, **factory))
        self.dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else None

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared pair: A_s (r x in), B_s (out x r), on the vectors' dtype and device."""
        like = self.vera_lambda_d
        return self.projection.vera_A[:, : self.in_features].to(like), self.projection.vera_B[: self.out_features].to(like)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            h = self.dropout(h)
        a, b = self.projections()
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(h, a), b)

    def weight_change(self) -> torch.Tensor:
        a, b = self.projections()
        return (self.vera_lambda_b.unsqueeze(1) * b) @ (self.vera_lambda_d.unsqueeze(1) * a)


class VeraModel(DeltaBase):
    """VeRA on every addressed linear layer (``nn.Linear`` or GPT-2's ``Conv1D``).

    Arguments (PEFT's names): ``r=256``, ``projection_prng_key=0``, ``save_projection=True``,
    ``vera_dropout=0.0``, ``d_initial=0.1``; default positions: attention query and value.
    """

    config_class = VeraConfig
    delta_type = "vera"
    default_modified_modules = ("attn.q", "attn.v")

    def prepare(self, observations: Mapping[str, Observation]) -> None:
        """Draw the pair this build's layers share, sized to the largest input and output among them."""
        shapes = [(linear_shape(t.module), t.module) for t in self.targets.values()]
        linear = [(shape, module) for shape, module in shapes if shape is not None]
        if not linear:  # new_layer refuses each target
            return
        c = self.config
        in_max, out_max = max(s[0] for s, _ in linear), max(s[1] for s, _ in linear)
        self.projection = VeraProjection(c.r, in_max, out_max, c.projection_prng_key, c.save_projection, weight_like(linear[0][1]))

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> VeraLayer:
        shape = linear_shape(module)
        if shape is None:
            raise UnsupportedModuleError(
                f"VeRA needs a linear layer (nn.Linear or Conv1D), but {path!r} is a {type(module).__name__}; "
                "address the linear projections inside it instead."
            )
        return VeraLayer(*shape, self.config, self.projection, weight_like(module))
