"""LoRA on the layer kinds beyond linear maps (opendelta.layer_kinds), in PEFT's forms:

- embedding: ``E[ids] + s * A^T[ids] B^T`` (A: r x vocabulary, B: dim x r; A starts at zero);
- convolution: ``conv(x) + s * B(A(x))``, A a convolution with the base's kernel, stride, padding and
  dilation to r channels, B a 1x1 convolution back (B starts at zero);
- weights read by the forward (MultiheadAttention's projections, fused MoE experts, any parameter
  named in ``target_parameters``): ``W + s B A`` stands in for W during each call, per expert for a
  3-D ``(experts, out, in)`` stack (A: r*experts x in, B: out x r*experts, laid out as PEFT does).

Each is linear in its module's weight, so it merges exactly as PEFT does; unmerge and detach put
the saved weight back bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from opendelta.errors import UnsupportedModuleError
from opendelta.layer import WHOLE_BATCH, DeltaLayer
from opendelta.layer_kinds import CONV, weight_shape
from opendelta.linear_maps import pad_rows
from opendelta.offload import computing_like

if TYPE_CHECKING:
    from opendelta.methods.lora import LoraConfig


def _start(a: torch.Tensor, b: torch.Tensor, init: bool | str, zero: str, rank: int) -> None:
    """PEFT's starting factors. `zero` is the factor that starts at zero ("a" for embeddings, whose B is
    normal; "b" elsewhere, whose A is Kaiming-uniform, or normal with ``"gaussian"``); with
    ``init_lora_weights=False`` both are random, so a fresh delta changes the outputs."""
    if a.device.type == "meta":  # a skeleton has no values to initialise
        return
    with torch.no_grad():
        if zero == "a":
            nn.init.normal_(b)
            nn.init.normal_(a) if init is False else a.zero_()
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(b, a=math.sqrt(5)) if init is False else b.zero_()


def _no_dropout(config: LoraConfig, path: str, what: str) -> None:
    if config.lora_dropout > 0:
        raise UnsupportedModuleError(
            f"lora_dropout={config.lora_dropout} cannot apply to {path!r} ({what}): its LoRA does not act on a "
            "hidden state it could drop. Use lora_dropout=0.0, or leave the module out of modified_modules."
        )


class EmbeddingLoraLayer(DeltaLayer):
    """m(ids) = s * A^T[ids] B^T, for an ``nn.Embedding``; merging adds ``s (B A)^T`` to its weight."""

    route = "parallel"

    def __init__(self, module: nn.Embedding, config: LoraConfig, path: str = ""):
        super().__init__()
        _no_dropout(config, path, "an embedding looks token ids up")
        if module.max_norm is not None:
            raise UnsupportedModuleError(
                f"{path!r} is an nn.Embedding with max_norm, which renormalises the looked-up rows in place; LoRA on it "
                "would renormalise its own factors. Address embeddings without max_norm."
            )
        r, self.scaling = config.rank_and_scaling(path)
        like = computing_like(module, module.weight)  # an offloaded embedding's weight is on meta between calls
        factory = {"dtype": like.dtype, "device": like.device}
        self.lora_embedding_A = nn.Parameter(torch.empty(r, module.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(module.embedding_dim, r, **factory))
        _start(self.lora_embedding_A, self.lora_embedding_B, config.init_lora_weights, "a", r)
        # the padding row's factors get no gradient, as the base's padding row gets none
        self.padding_idx = module.padding_idx
        self.scale_grad_by_freq = module.scale_grad_by_freq

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        low = F.embedding(ids, self.lora_embedding_A.t(), self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        return (low @ self.lora_embedding_B.t()) * self.scaling

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        return h_out + self(h_in).to(h_out.dtype)

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """E + s (B A)^T."""
        update = (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling
        return {"weight": module.weight + update.to(module.weight.dtype)}


class ConvLoraLayer(DeltaLayer):
    """m(x) = s * B(A(x)) for an ``nn.Conv1d/2d/3d``: A (r, in, *kernel) with the base's stride, padding
    and dilation, B (out, r, 1, ...); merging adds ``s B A`` (B's 1x1 kernel times A's) to its kernel."""

    route = "parallel"

    def __init__(self, module: nn.Conv1d | nn.Conv2d | nn.Conv3d, config: LoraConfig, path: str = ""):
        super().__init__()
        if module.groups != 1 or module.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"{path!r} is a {type(module).__name__} with groups={module.groups}, padding_mode={module.padding_mode!r}; "
                "LoRA acts on convolutions with groups=1 and zero padding (a grouped kernel cannot take a full-rank "
                "update). Address other convolutions, or the linear layers around it."
            )
        r, self.scaling = config.rank_and_scaling(path)
        weight = module.weight
        dims = weight.dim() - 2
        like = computing_like(module, weight)
        factory = {"dtype": like.dtype, "device": like.device}
        self.lora_A = nn.Parameter(torch.empty(r, weight.shape[1], *weight.shape[2:], **factory))
        self.lora_B = nn.Parameter(torch.empty(weight.shape[0], r, *([1] * dims), **factory))
        _start(self.lora_A, self.lora_B, config.init_lora_weights, "b", r)
        self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
        self.dims = dims
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        conv = CONV[self.dims]
        low = conv(x, self.lora_A, None, self.stride, self.padding, self.dilation)
        return conv(low, self.lora_B) * self.scaling

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        return h_out + self(h_in).to(h_out.dtype)

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """K + s B A, with B's 1x1 kernel folded into A's."""
        update = (self.lora_B.flatten(1) @ self.lora_A.flatten(1)).view_as(module.weight) * self.scaling
        return {"weight": module.weight + update.to(module.weight.dtype)}


class WeightLoraLayer(DeltaLayer):
    """``W + s B A`` in place of each weight in `parameter_names` during every call of the module: a
    2-D (out, in) weight, or per expert e of a 3-D (experts, out, in) stack ``W_e + s B_e A_e`` with
    ``A_e`` = rows ``e*r..`` of A and ``B_e`` = columns ``e, e+E, ...`` of B (PEFT's layout).

    The factors of the i-th weight are ``lora_A.<i>`` / ``lora_B.<i>``: `parameter_names` follows the
    module's parameter order, which is also the order PEFT nests its wrappers in, so a checkpoint
    converts without the parameters' names.

    `rows` limits the change of a 2-D weight to some row ranges (a MultiheadAttention's query third of
    its fused in_proj_weight): B has only those rows, and the change is ``W + s B' A`` with B' = B
    padded with zero rows elsewhere, so the other rows stay W exactly."""

    route = "weights"
    mixed_rows = WHOLE_BATCH  # one weight serves the whole batch

    def __init__(
        self,
        module: nn.Module,
        names: tuple[str, ...],
        config: LoraConfig,
        path: str = "",
        rows: Mapping[str, tuple[tuple[int, int], ...]] | None = None,
    ):
        super().__init__()
        _no_dropout(config, path, "its weights change, not a hidden state")
        r, self.scaling = config.rank_and_scaling(path)
        self.parameter_names = tuple(names)
        self.rows = dict(rows or {})
        self.keys = {name: str(i) for i, name in enumerate(names)}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in names:
            weight = module.get_parameter(name)
            if weight.dim() not in (2, 3):
                raise UnsupportedModuleError(
                    f"LoRA on a parameter needs a 2-D (out, in) weight or a 3-D (experts, out, in) stack, but "
                    f"{path}.{name} has shape {list(weight.shape)}; target weights of linear maps."
                )
            experts, out_features, in_features = weight_shape(weight)
            if name in self.rows:
                out_features = sum(stop - start for start, stop in self.rows[name])
            factory = {"dtype": weight.dtype, "device": weight.device}
            a = nn.Parameter(torch.empty(r * experts, in_features, **factory))
            b = nn.Parameter(torch.empty(out_features, r * experts, **factory))
            _start(a, b, config.init_lora_weights, "b", r)
            self.lora_A[self.keys[name]], self.lora_B[self.keys[name]] = a, b

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("a LoRA on weights changes its module's parameters during the call (route 'weights'); it has no m(h)")

    def changed_parameters(self, module: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        changed = {}
        for name in self.parameter_names:
            w = current[name]
            a, b = self.lora_A[self.keys[name]].to(w.dtype), self.lora_B[self.keys[name]].to(w.dtype)
            if w.dim() == 2:
                if name in self.rows:
                    b = pad_rows(b, self.rows[name], w.shape[0])
                changed[name] = torch.addmm(w, b, a, alpha=self.scaling)
            else:
                experts = w.shape[0]
                a = a.reshape(experts, -1, a.shape[-1])  # (E, r, in)
                b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
                changed[name] = torch.baddbmm(w, b, a, alpha=self.scaling)
        return changed

