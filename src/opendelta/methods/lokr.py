"""LoKr (Yeh et al., 2024, LyCORIS): a Kronecker product beside a linear map or a convolution,
``dW = s * kron(W1, W2)``, ``s = alpha / r``.

The out x in weight splits as ``out = a * b``, ``in = c * d`` (factors near the square root, or near
``decompose_factor``), ``W1`` is a x c and ``W2`` b x d. As in PEFT, W2 is the low-rank product
``W2_a W2_b`` when ``r < max(b, d) / 2``, and so is W1 (``W1_a W1_b``) with ``decompose_both`` and
``r < max(a, c) / 2``; otherwise each is a full matrix. W1 (or W1_a) starts at zero, so a fresh
LoKr changes nothing; ``init_weights="lycoris"`` zeroes W2 (or W2_b) instead, ``False`` neither.

On a convolution, ``in`` is its input channels per group and the kernel goes with W2, as in PEFT
(without ``use_effective_conv2d``): a full W2 is (b, d, *kernel), W2_b is r x (d x kernel size), and
dW is the kernel flattened to (out, in x kernel size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from opendelta.config import MAX_SIZE, choice, number
from opendelta.delta_base import DeltaBase
from opendelta.layer_kinds import WeightMap
from opendelta.linear_maps import weight_like
from opendelta.runtime_init import Observation
from opendelta.weight_change import WeightChangeConfig, WeightChangeLayer, weight_map_of


@dataclass
class LoKrConfig(WeightChangeConfig):
    #: also factor W1 into rank r (when r < max(a, c) / 2)
    decompose_both: bool = False
    #: split each dimension into factors the smaller of which is at most this (this itself where it divides the
    #: dimension); -1: near the square root; 0: no split, W1 is 1 x 1 (as in PEFT)
    decompose_factor: int = number(-1, low=-1, high=MAX_SIZE)
    #: rescale the rows rank_dropout keeps by the inverse of the fraction kept
    rank_dropout_scale: bool = False
    #: True (W1 zero), "lycoris" (W2 zero) or False (neither: a fresh delta changes the outputs)
    init_weights: bool | str = choice(True, ("lycoris",))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n = dimension`` and ``m <= n``: `factor` and its cofactor if it divides the
    dimension, else the pair nearest the square root with ``m <= factor`` (LyCORIS's rule, as in PEFT)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for candidate in range(2, min(dimension, limit) + 1):  # the divisors upward, up to the first past the square root
        if dimension % candidate == 0:
            m = candidate
            if m * m >= dimension:
                break
    return min(m, dimension // m), max(m, dimension // m)


class LoKrLayer(WeightChangeLayer):
    """``dW = s * kron(W1, W2)``; each of W1, W2 a full matrix or a rank-r product (see the module docstring).

    The factor tensors carry PEFT's names: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or
    ``lokr_w2_a``/``lokr_w2_b``.
    """

    def __init__(self, form: WeightMap, config: LoKrConfig, weight: torch.Tensor, path: str):
        super().__init__(form, config.rank_dropout, config.module_dropout, config.rank_dropout_scale)
        r, self.scaling = config.rank_and_scaling(path)
        (a, b), (c, d) = factorization(form.out_features, config.decompose_factor), factorization(form.in_channels, config.decompose_factor)
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        self.full_w2 = not r < max(b, d) / 2
        w1 = self.factor("lokr_w1", (a, c), r, self.full_w1, factory)
        w2 = self.factor("lokr_w2", (b, d, *form.kernel), r, self.full_w2, factory)
        if weight.device.type == "meta":
            return
        # the one factor that starts at zero (W1's left one by default) makes the fresh product zero
        zero = {True: w1[0], "lycoris": w2[-1], False: None}[config.init_weights]
        for tensor in (*w1, *w2):
            if tensor is zero:
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=5**0.5)

    def factor(self, name: str, shape: tuple[int, ...], r: int, full: bool, factory: dict) -> tuple[nn.Parameter, ...]:
        """Register W (`shape`: rows x cols, x kernel for a convolution's W2) whole as `name`, or as ``name_a``
        (rows x r) and ``name_b`` (r x the rest, flattened)."""
        rows, rest = shape[0], math.prod(shape[1:])
        shapes = {name: shape} if full else {f"{name}_a": (rows, r), f"{name}_b": (r, rest)}
        for key, shape in shapes.items():
            self.register_parameter(key, nn.Parameter(torch.empty(shape, **factory)))
        return tuple(getattr(self, key) for key in shapes)

    def weight_change(self) -> torch.Tensor:
        w1 = self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2.flatten(1) if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b  # a kernel with its columns
        return torch.kron(w1, w2.contiguous()) * self.scaling


class LoKrModel(DeltaBase):
    """LoKr on every addressed linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) or convolution (``nn.Conv1d/2d/3d``).

    Arguments (PEFT's names): ``r=8, alpha=8`` (s = alpha / r), ``decompose_both=False``,
    ``decompose_factor=-1``, ``rank_dropout=0.0``, ``rank_dropout_scale=False``, ``module_dropout=0.0``,
    ``rank_pattern`` / ``alpha_pattern`` (per-module overrides), ``init_weights=True``; default
    positions: attention query and value.
    """

    config_class = LoKrConfig
    delta_type = "lokr"
    default_modified_modules = ("attn.q", "attn.v")

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> LoKrLayer:
        return LoKrLayer(weight_map_of("LoKr", path, module), self.config, weight_like(module), path)
