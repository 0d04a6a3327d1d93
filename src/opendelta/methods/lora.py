"""LoRA (Hu et al., 2021): a low-rank update beside a linear map, ``h_out += s * h_in A^T B^T``.

With ``use_dora=True``, DoRA (Liu et al., 2024): the updated weight split into a trained magnitude
per output feature and a direction, ``W' = m * (W + s B A) / ||W + s B A||``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opendelta.addressing import matches
from opendelta.config import DeltaConfig, number, positive, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import UnsupportedModuleError
from opendelta.layer import DeltaLayer
from opendelta.runtime_init import Observation
from opendelta.linear_maps import fold_into_weight, linear_shape, linear_weight


@dataclass
class LoraConfig(DeltaConfig):
    lora_r: int = size(8)
    lora_alpha: float = positive(16)
    lora_dropout: float = number(0.0, low=0.0, high=1.0, high_open=True)
    #: rank-stabilised LoRA (Kalajdzievski, 2023): s = alpha / sqrt(r) instead of alpha / r
    use_rslora: bool = False
    #: per-module r and alpha, ``{module pattern: value}`` in the addressing syntax; first match wins
    rank_pattern: dict[str, int] | None = size(None)
    alpha_pattern: dict[str, float] | None = positive(None)
    #: DoRA (Liu et al., 2024): also train a magnitude per output feature of the weight
    use_dora: bool = False

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank r and alpha of the LoRA at module `path` (the first matching pattern, else the defaults)."""
        r = next((v for k, v in (self.rank_pattern or {}).items() if matches(path, k)), self.lora_r)
        alpha = next((v for k, v in (self.alpha_pattern or {}).items() if matches(path, k)), self.lora_alpha)
        return r, alpha

    def rank_and_scaling(self, path: str) -> tuple[int, float]:
        """The rank r and the scaling s of the LoRA at module `path`."""
        r, alpha = self.rank_and_alpha(path)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


class LoraLayer(DeltaLayer):
    """m(h) = s * h A^T B^T with A: (r, in), B: (out, r) zero-initialised, s = alpha / r.

    The factors take the dtype and device of the weight they sit beside.
    """

    route = "parallel"

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, weight: torch.Tensor, path: str = ""):
        super().__init__()
        r, self.scaling = config.rank_and_scaling(path)
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        if weight.device.type != "meta":  # a skeleton has no values to initialise
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            h = self.dropout(h)
        # scaling the rank-r intermediate costs r/out of scaling the output
        return F.linear(F.linear(h, self.lora_A) * self.scaling, self.lora_B)

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        h = self.dropout(h_in) if self.dropout is not None else h_in
        low = F.linear(h, self.lora_A).reshape(-1, self.lora_A.shape[0]).to(h_out.dtype)
        lora_B = self.lora_B.to(h_out.dtype)  # a no-op unless autocast made the output lower precision
        # one GEMM adds s * low B^T onto the output (scaling and sum fused, no output-sized temporary),
        # and taking B^T as the second factor makes autograd compute B's gradient as (low^T g)^T,
        # several times faster on CPU than the g^T low of a linear layer's weight gradient
        flat = _accumulator(h_out)
        if flat is None:
            return torch.addmm(h_out.reshape(-1, h_out.shape[-1]), low, lora_B.t(), alpha=self.scaling).view(h_out.shape)
        flat.addmm_(low, lora_B.t(), alpha=self.scaling)
        return flat if flat.shape == h_out.shape else flat.view(h_out.shape)

    def route_parallel_rows(self, h_in: torch.Tensor, h_out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # a linear map keeps no output for backward, so adding in place is safe: one gather, one scatter-add
        return h_out.index_add_(0, rows, self(h_in.index_select(0, rows)))

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """W + s B A (transposed for Conv1D)."""
        update = (self.lora_B @ self.lora_A) * self.scaling
        return {"weight": fold_into_weight(module, lambda w: w + update.to(w.dtype))}


class DoraLayer(LoraLayer):
    """DoRA: the module's weight becomes ``W' = m * (W + s B A) / ||W + s B A||``, norms per output feature.

    As a delta on the module's output ``h_out = W h + b``: ``h_out + (k - 1) W h + k s h A^T B^T`` with
    ``k = m / ||W + s B A||``. The norm is a constant for backward (the paper's section 4.3, as in PEFT).
    The magnitude m starts at ``||W + s B A||``, so k starts at exactly 1 and a fresh layer changes nothing.
    """

    reads_module = True
    route_parallel_rows = DeltaLayer.route_parallel_rows  # not additive: LoRA's scatter-add does not apply

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, module: nn.Module, path: str = ""):
        super().__init__(in_features, out_features, config, module.weight, path)
        self._squared_rows: tuple[weakref.ref, tuple, torch.Tensor] | None = None
        self.magnitude = nn.Parameter(torch.empty(out_features, dtype=module.weight.dtype, device=module.weight.device))
        if module.weight.device.type != "meta":
            with torch.no_grad():
                self.magnitude.copy_(self.weight_norm(module))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("a DoRA layer's change depends on its module's weight: it runs through route_parallel(module=...)")

    def weight_norm(self, module: nn.Module) -> torch.Tensor:
        """``||W + s B A||`` per output feature, in float32, without gradient and without forming
        ``W + s B A``: ``||W||^2 + 2 s <W, B A> + s^2 ||B A||^2`` per row, where ``||W||^2`` is
        computed once for as long as the weight is unchanged (see :meth:`_squared_row_norms`)."""
        with torch.no_grad():
            weight = linear_weight(module)
            a, b = self.lora_A.float(), self.lora_B.float()
            cross = (b * (weight @ self.lora_A.t().to(weight.dtype)).float()).sum(1)
            square = ((b @ (a @ a.t())) * b).sum(1)
            s = self.scaling
            return (self._squared_row_norms(module) + (2 * s) * cross + (s * s) * square).clamp_min(0).sqrt()

    def _squared_row_norms(self, module: nn.Module) -> torch.Tensor:
        """``||W||^2`` per output feature in float32, kept while the weight is the same tensor with the
        same values: an in-place change (an optimizer step, merge(), copy_) bumps its version counter and
        a move (``.to()``) changes its storage, either of which recomputes it. A change written through
        ``weight.data`` escapes the version counter; write through the parameter itself (under no_grad)."""
        weight = module.weight
        if weight.is_inference() or torch.compiler.is_compiling():  # no version counter to trust
            return linear_weight(module).float().square().sum(1)
        stamp = (weight._version, weight.data_ptr(), weight.dtype, weight.device, weight.shape)
        kept = self._squared_rows
        if kept is None or kept[0]() is not weight or kept[1] != stamp:
            kept = self._squared_rows = (weakref.ref(weight), stamp, linear_weight(module).float().square().sum(1))
        return kept[2]

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        assert module is not None, "the engine passes the module to layers with reads_module"
        dtype = h_out.dtype
        scale = self.magnitude / self.weight_norm(module).to(self.magnitude.dtype)  # k, trained through m only
        k = scale.to(dtype)
        if self.dropout is not None and self.training:
            # the magnitude rescales W applied to the dropped-out input, as PEFT does, so W h is recomputed
            h = self.dropout(h_in)
            out = torch.addcmul(h_out, F.linear(h, linear_weight(module).to(dtype)), k - 1)
        else:
            h = h_in
            bias = getattr(module, "bias", None)
            # k h_out + (1 - k) b = h_out + (k - 1)(h_out - b): one pass, and exactly h_out while k is 1
            out = h_out * k if bias is None else torch.addcmul(bias.to(dtype) * (1 - k), h_out, k)
        low = F.linear(h, self.lora_A).reshape(-1, self.lora_A.shape[0]).to(dtype)
        scaled_b = (self.lora_B * scale.unsqueeze(1)).to(dtype)  # k B: out x r, cheaper than k on the output
        if out.is_contiguous():  # a fresh tensor that nothing keeps for backward: add in place
            out.view(-1, out.shape[-1]).addmm_(low, scaled_b.t(), alpha=self.scaling)
            return out
        return out + (low @ scaled_b.t()).view(out.shape) * self.scaling

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``m * (W + s B A) / ||W + s B A||`` (transposed for Conv1D); the bias is unchanged."""
        k = (self.magnitude.float() / self.weight_norm(module)).unsqueeze(1)
        update = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return {"weight": fold_into_weight(module, lambda w: ((w.float() + update) * k).to(w.dtype))}


def _accumulator(h_out: torch.Tensor) -> torch.Tensor | None:
    """A 2-D tensor that is `h_out`'s memory and may be updated in place, or None.

    A linear map keeps neither its output nor (on 3-D inputs) the 2-D matrix product it views for
    backward, so adding in place is safe. Adding into the product itself, not into the view, spares
    autograd the view bookkeeping (CopySlices), which would copy the gradient twice in backward.
    """
    if torch.compiler.is_compiling():  # the compiler fuses the out-of-place form itself; data_ptr checks break graphs
        return None
    base = h_out._base if h_out._base is not None else h_out
    if (
        base.dim() == 2
        and not (base.is_leaf and base.requires_grad)
        and base.is_contiguous()
        and h_out.is_contiguous()
        and base.numel() == h_out.numel()
        and base.data_ptr() == h_out.data_ptr()
        and base.shape[-1] == h_out.shape[-1]
    ):
        return base
    return None


class LoraModel(DeltaBase):
    """LoRA on every addressed linear layer (``nn.Linear`` or GPT-2's ``Conv1D``).

    Arguments: ``lora_r=8, lora_alpha=16, lora_dropout=0.0``, ``use_rslora=False``,
    ``rank_pattern`` / ``alpha_pattern`` (per-module overrides), ``use_dora=False`` (DoRA: a
    trained magnitude per output feature); default positions: attention query and value.
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
        if self.config.use_dora:
            return DoraLayer(*shape, self.config, module, path)
        return LoraLayer(*shape, self.config, module.weight, path)
