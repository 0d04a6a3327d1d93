"""The kinds of layer a delta can act on, recognised in one table, so a method maps kinds to its
layers (``{kind: layer class}``) instead of testing module classes itself.

- ``linear``: a linear map (``nn.Linear``, GPT-2's ``Conv1D``, a quantized linear: linear_maps.py);
- ``embedding``: ``nn.Embedding``, a lookup of rows of its weight;
- ``conv``: ``nn.Conv1d/2d/3d`` (not transposed convolutions);
- ``attention``: ``nn.MultiheadAttention``, which reads ``in_proj_weight`` and ``out_proj.weight``
  as weights instead of calling linear modules;
- ``experts``: a module holding stacked expert weights as 3-D parameters ``(experts, out, in)``, as
  transformers 5 stores Mixtral's and Qwen-MoE's, read by its forward expert by expert.

The last two have no call of their own to hook per projection: deltas on them change the parameters
the forward reads (route ``"weights"``, opendelta.routing), and :func:`weight_parameters` names them.

Linear maps and convolutions both map their input by one weight: :func:`weight_map` describes that
weight as an (out, in) matrix, so a delta that forms a whole weight change (LoHa, LoKr, AdaLoRA) acts
on both kinds through one :class:`WeightMap` instead of a layer class per kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opendelta.linear_maps import fold_into_weight, linear_shape


def _experts(module: nn.Module) -> bool:
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.dim() == 3 for p in own)


def _attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


@dataclass(frozen=True)
class LayerKind:
    name: str
    #: the classes it covers, as error messages name them
    described: str
    recognise: Callable[[nn.Module], bool]


KINDS: tuple[LayerKind, ...] = (
    LayerKind("linear", "nn.Linear or Conv1D", lambda m: linear_shape(m) is not None),
    LayerKind("embedding", "nn.Embedding", lambda m: isinstance(m, nn.Embedding)),
    LayerKind("conv", "nn.Conv1d/2d/3d", lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))),
    LayerKind("attention", "nn.MultiheadAttention", _attention),
    LayerKind("experts", "fused MoE experts (3-D parameters)", _experts),
)
BY_NAME = {kind.name: kind for kind in KINDS}


def layer_kind(module: nn.Module) -> str | None:
    """The name of the kind `module` is (the first that recognises it), else None."""
    return next((kind.name for kind in KINDS if kind.recognise(module)), None)


def described(kinds: Iterable[str]) -> str:
    """The classes of `kinds` (names), for an error message: "nn.Linear or Conv1D, nn.Embedding"."""
    return ", ".join(BY_NAME[name].described for name in kinds)


@dataclass(frozen=True)
class Channels:
    """Where a layer's features lie, for deltas that scale or shift them (IA3, BitFit)."""

    in_features: int | None  #: None where the input holds no features (an embedding's token ids)
    out_features: int
    #: the dimension of the features in the module's input and output: -1 (last), or 1 (channel-first convolutions)
    hidden_dim: int
    #: the axes of the output and input features in the weight, as linear_maps.fold_into_weight sees it
    weight_axes: tuple[int, int | None]


def channels(module: nn.Module) -> Channels | None:
    """The :class:`Channels` of a linear map, an embedding or a convolution, else None."""
    kind = layer_kind(module)
    if kind == "linear":
        in_features, out_features = linear_shape(module)  # type: ignore[misc]
        return Channels(in_features, out_features, -1, (0, 1))
    if kind == "embedding":
        return Channels(None, module.embedding_dim, -1, (1, None))
    if kind == "conv" and module.groups == 1:  # a grouped kernel holds in/groups input channels
        return Channels(module.in_channels, module.out_channels, 1, (0, 1))
    return None


def along(vector: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """`vector` shaped to broadcast along dimension `dim` of a tensor with `ndim` dimensions."""
    if dim == -1 or dim == ndim - 1:
        return vector
    shape = [1] * ndim
    shape[dim] = -1
    return vector.view(shape)


#: a MultiheadAttention's projections by name: query, key and value (the thirds of a fused in_proj_weight, in
#: this order) and the output projection
PROJECTIONS = ("q", "k", "v", "out")


def weight_parameters(module: nn.Module, projections: Iterable[str] = PROJECTIONS) -> tuple[str, ...]:
    """The parameters (relative names) a forward of an ``attention`` or ``experts`` module reads as
    weights: the fused query/key/value and output projections of a MultiheadAttention (those holding
    one of `projections`), or every 3-D parameter of an experts module."""
    if _attention(module):
        wanted = set(projections)
        if module.in_proj_weight is None:  # kdim or vdim differ from embed_dim: one weight per projection
            names = [f"{p}_proj_weight" for p in PROJECTIONS[:3] if p in wanted]
        else:
            names = ["in_proj_weight"] if wanted & set(PROJECTIONS[:3]) else []
        return (*names, *(["out_proj.weight"] if "out" in wanted else []))
    return tuple(name for name, p in module.named_parameters(recurse=False) if p.dim() == 3)


def fused_rows(module: nn.Module, projections: Iterable[str]) -> dict[str, tuple[tuple[int, int], ...]]:
    """For a MultiheadAttention with a fused ``in_proj_weight`` of which `projections` name some but not
    all of q, k, v: ``{"in_proj_weight": ((start, stop), ...)}``, the row ranges of the named thirds;
    else ``{}`` (the whole weight)."""
    chosen = [i for i, p in enumerate(PROJECTIONS[:3]) if p in set(projections)]
    if not _attention(module) or module.in_proj_weight is None or len(chosen) in (0, 3):
        return {}
    third = module.embed_dim
    return {"in_proj_weight": tuple((i * third, (i + 1) * third) for i in chosen)}


def weight_shape(parameter: torch.Tensor) -> tuple[int, int, int]:
    """(experts, out, in) of a weight read as a linear map's, one expert for a 2-D (out, in) weight."""
    if parameter.dim() == 3:
        return parameter.shape[0], parameter.shape[1], parameter.shape[2]
    return 1, parameter.shape[0], parameter.shape[1]


#: a convolution's functional form by its number of spatial dimensions
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class WeightMap:
    """How a linear map or a convolution applies its weight, for a delta that forms a whole weight change
    ``dW``, always (out, in): a convolution's kernel flattened to (out, in/groups x kernel size), as
    PEFT's LoHa, LoKr and AdaLoRA flatten it."""

    out_features: int
    #: input features (a convolution's input channels per group)
    in_channels: int
    #: a convolution's kernel size; () for a linear map
    kernel: tuple[int, ...] = ()
    #: a convolution's (stride, padding, dilation, groups)
    conv: tuple = ()

    @property
    def in_features(self) -> int:
        """The columns of dW: the inputs each output reads."""
        return self.in_channels * math.prod(self.kernel)

    def apply(self, h: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """`h` mapped by the weight `change` (out x in) the way the layer maps it by its own weight (no bias)."""
        if not self.kernel:
            return F.linear(h, change)
        stride, padding, dilation, groups = self.conv
        kernel = change.reshape(self.out_features, self.in_channels, *self.kernel)
        return CONV[len(self.kernel)](h, kernel, None, stride, padding, dilation, groups)

    def add_to(self, module: nn.Module, change: torch.Tensor) -> torch.Tensor:
        """The module's weight plus `change`, in the module's own layout (Conv1D's transposed, a kernel's shape)."""
        return fold_into_weight(module, lambda w: w + change.reshape(w.shape).to(w.dtype))


def weight_map(module: nn.Module) -> WeightMap | None:
    """The :class:`WeightMap` of a linear map or a zero-padded convolution, else None (another padding
    mode pads the input differently from the functional convolution a change runs)."""
    kind = layer_kind(module)
    if kind == "linear":
        in_features, out_features = linear_shape(module)  # type: ignore[misc]
        return WeightMap(out_features, in_features)
    if kind == "conv" and module.padding_mode == "zeros":
        spec = (module.stride, module.padding, module.dilation, module.groups)
        return WeightMap(module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size), spec)
    return None
