"""BitFit (Ben Zaken et al., 2022): train only bias terms, ``h_out += b``.

Every addressed module gets its own zero-initialised bias delta, whether or not it has a bias
of its own (T5 and LLaMA projections and norms have none); an existing bias stays frozen and
untouched, so detaching is exact and a checkpoint holds only the bias deltas. An addressed block
(an attention or feed-forward module holding linear layers) stands for the bias terms inside it,
as in the original OpenDelta (bitfit.py, ``modify_module``): its linear layers and LayerNorms, and
any sub-module with a bias of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.checkpoint import delta_key
from opendelta.config import DeltaConfig
from opendelta.delta_base import DeltaBase
from opendelta.errors import CorruptCheckpointError, MergeError, PeftFormatError, UnsupportedModuleError
from opendelta.layer_kinds import along, channels, layer_kind
from opendelta.linear_maps import weight_like
from opendelta.layer import DeltaLayer
from opendelta.peft_format import PEFT_WEIGHTS_NAME, PeftMethod, PeftTensors, peft_field, register_peft_method
from opendelta.runtime_init import Observation
from opendelta.targets import Target


# torch's channel-first norms scale dim 1, not the last dim a broadcast bias would shift
_CHANNEL_FIRST = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def output_features(module: nn.Module) -> tuple[int, torch.Tensor | None, int] | None:
    """(output size, a tensor whose dtype and device the delta takes, if the module has one, the
    dimension of the output's features) of a linear map, an embedding, a convolution (channels first)
    or a norm over the last dimension (a 1-D weight, or a parameter-free norm's one-dimensional
    ``normalized_shape``), else None."""
    layout = channels(module)
    if layout is not None:
        return layout.out_features, weight_like(module), layout.hidden_dim
    if isinstance(module, _CHANNEL_FIRST):
        return None
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0], weight_like(module), -1
    normalized = getattr(module, "normalized_shape", None)
    if isinstance(normalized, int):
        normalized = (normalized,)
    if isinstance(normalized, (tuple, list, torch.Size)) and len(normalized) == 1 and isinstance(normalized[0], int):
        return normalized[0], None, -1
    return None


class BiasLayer(DeltaLayer):
    """m(h) = b, broadcast over the features' dimension (the last, or a convolution's channels); b starts at zero."""

    route = "after"

    def __init__(self, features: int, dtype: torch.dtype, device: torch.device, hidden_dim: int = -1):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features, dtype=dtype, device=device))
        self.hidden_dim = hidden_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return along(self.bias, self.hidden_dim, h.dim())

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's own bias plus this one (a module without a bias cannot take it)."""
        own = getattr(module, "bias", None)
        if not isinstance(own, nn.Parameter) or own.shape != self.bias.shape:
            raise MergeError(
                f"BitFit merges into a module's own bias, but this {type(module).__name__} has none; "
                "keep the delta attached as a layer there."
            )
        return {"bias": own + self.bias}


@dataclass
class BitFitConfig(DeltaConfig):
    """BitFit takes only the arguments every method takes."""


class BitFitModel(DeltaBase):
    """A trainable bias on the output of every addressed linear layer or norm.

    No arguments of its own; default positions: the attention projections (``attn.q/k/v/o``, and
    ``xattn.q/k/v/o`` in encoder-decoders), the feed-forward projections (``ffn.up``,
    ``ffn.gate``, ``ffn.down``) and the layer norms (``norm.attn``, ``norm.xattn``, ``norm.ffn``,
    ``norm.final``) — those of them the backbone's family has.
    """

    config_class = BitFitConfig
    delta_type = "bitfit"
    default_modified_modules = (
        "attn.q", "attn.k", "attn.v", "attn.o", "xattn.q", "xattn.k", "xattn.v", "xattn.o",
        "ffn.up", "ffn.gate", "ffn.down", "norm.attn", "norm.xattn", "norm.ffn", "norm.final",
    )

    @classmethod
    def resolve_targets(
        cls, backbone_model: nn.Module, config: DeltaConfig | None = None, **config_values: Any
    ) -> list[Target]:
        """The addressed modules, each block among them replaced by the bias terms inside it."""
        targets = super().resolve_targets(backbone_model, config, **config_values)
        expanded: dict[str, Target] = {}
        for target in targets:
            inside = [] if output_features(target.module) is not None else _biased_inside(target.path, target.module)
            for path, module in inside or [(target.path, target.module)]:
                expanded.setdefault(path, Target(path, path, module))
        return list(expanded.values())

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> BiasLayer:
        found = output_features(module)
        if found is None:
            raise UnsupportedModuleError(
                f"BitFit needs a linear layer (nn.Linear or Conv1D), an nn.Embedding, an ungrouped nn.Conv1d/2d/3d or a norm "
                f"over the last dimension, but {path!r} is a "
                f"{type(module).__name__}; address the projections and norms inside it instead."
            )
        features, like, hidden_dim = found
        if like is None:  # a parameter-free norm outputs the hidden state's dtype: take the backbone's
            like = next(iter(self.backbone_model.parameters()), torch.empty(0))
        return BiasLayer(features, like.dtype, like.device, hidden_dim)


def _biased_inside(path: str, block: nn.Module) -> Sequence[tuple[str, nn.Module]]:
    """What the original's BitFit biased inside a block (bitfit.py,
    add_bias_to_modules_have_bias_or_known_type): each sub-module with a bias of its own, and each
    linear layer or LayerNorm; their paths under `path`."""
    found = []
    for name, module in block.named_modules():
        if not name or output_features(module) is None:
            continue
        own_bias = isinstance(module._parameters.get("bias"), torch.Tensor)
        if own_bias or layer_kind(module) == "linear" or isinstance(module, nn.LayerNorm):
            found.append((f"{path}.{name}" if path else name, module))
    return found


# ----------------------------------------------------------------- PEFT's BEFT: the same bias after a linear layer

#: PEFT's name of the bias vector, stored (1, out) as ``<path>.beft_bias``
_BEFT = "beft_bias"


def _check_peft(delta: DeltaBase) -> None:
    """PEFT's BEFT wraps nn.Linear layers only; a bias on a norm, an embedding or GPT-2's Conv1D has no PEFT form."""
    for path in delta.layers:
        module = delta.targets[path].module
        if not isinstance(module, nn.Linear):
            raise PeftFormatError(
                f"{path!r} is a {type(module).__name__}; PEFT's BEFT (its BitFit) takes nn.Linear layers only, so "
                "peft.PeftModel.from_pretrained could not load this delta. Address linear layers only, or save it with "
                "format='opendelta'."
            )


def _write_peft(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    out = {f"{path}.{_BEFT}": tensors[delta_key(path, "bias")].reshape(1, -1) for path in delta.layers}
    return out, {"target_modules": sorted(delta.layers), "init_weights": True}


def _read_peft(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
    peft_field(peft, "target_modules", (str, list, type(None)), "a module name, a list of them or null", None, path)
    owners: dict[str, str] = {}  # stored name -> module path
    for name, shape in stored.items():
        module, _, leaf = name.rpartition(".")
        if not module or leaf != _BEFT:
            continue
        if len(shape) != 2 or shape[0] != 1:
            raise CorruptCheckpointError(f"{path.parent / PEFT_WEIGHTS_NAME}: {name} has shape {list(shape)}; BEFT stores (1, out).")
        owners[name] = module
    if not owners:
        raise PeftFormatError(f"{path.parent / PEFT_WEIGHTS_NAME} holds no '<module>.{_BEFT}' tensor; it is not a BEFT adapter.")
    paths = list(owners.values())
    shapes = {delta_key(m, "bias"): (stored[n][1],) for n, m in owners.items()}
    return PeftTensors(
        {"modified_modules": paths}, paths, shapes,
        lambda t: {delta_key(m, "bias"): t[n].reshape(-1) for n, m in owners.items()}, set(owners),
    )


register_peft_method(PeftMethod("BEFT", "bitfit", _write_peft, _read_peft), check=_check_peft)
