"""Trainable tokens: train only chosen rows of the input embedding (new vocabulary), as PEFT's
``TRAINABLE_TOKENS`` (and LoRA's ``trainable_token_indices``) does.

The layer holds the trained rows, ``trainable_tokens_delta`` (one per index in ``token_indices``),
starting as copies of the embedding's rows, so a fresh delta changes nothing; only those rows are
saved. The embedding's output keeps every other token's vector bit for bit and takes the trained row
for the chosen tokens. A linear layer whose weight is tied to the embedding (an LM head tied to the
input embeddings) is modified too, so it sees the same rows: it adds ``x (rows - original rows)^T`` to
those tokens' logits. Weights are never written,
so detach restores the embedding bit for bit; merge() writes the rows (refused where the weight is tied).

:class:`TokenLayers` builds these layers for this method and for LoRA's ``trainable_token_indices``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.checkpoint import delta_key
from opendelta.config import DeltaConfig, number
from opendelta.delta_base import DeltaBase
from opendelta.errors import DeltaConfigError, PeftFormatError, UnsupportedModuleError
from opendelta.layer import DeltaLayer
from opendelta.peft_format import PEFT_WEIGHTS_NAME, PeftMethod, PeftTensors, peft_field, register_peft_method
from opendelta.runtime_init import Observation
from opendelta.targets import Target, tied_targets


@dataclass
class TrainableTokensConfig(DeltaConfig):
    #: the token ids whose embedding rows are trained (required; no repeats)
    token_indices: list[int] | None = number(None, low=0)
    #: True: the rows start as the embedding's own; False: random (normal), so a fresh delta changes outputs
    init_weights: bool = True



class TrainableTokensLayer(DeltaLayer):
    """On an embedding: the chosen tokens' vectors become the trained rows (times the module's ``embed_scale``)."""

    route = "parallel"
    reads_module = True  # a scaled embedding (Gemma) scales the rows too

    def __init__(self, indices: list[int], embedding: nn.Embedding, init_weights: bool):
        super().__init__()
        weight = embedding.weight
        index = torch.tensor(indices, dtype=torch.long, device=weight.device)
        skeleton = weight.device.type == "meta"
        original = torch.empty(len(indices), weight.shape[1], dtype=weight.dtype, device=weight.device)
        if not skeleton:
            original = weight.detach()[index].clone()
        rows = original.clone() if init_weights or skeleton else torch.randn_like(original)
        self.trainable_tokens_delta = nn.Parameter(rows)
        self.register_buffer("trainable_tokens_original", original, persistent=False)  # rebuilt from the backbone
        self.register_buffer("token_index", index, persistent=False)
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot[index] = torch.arange(len(indices), device=weight.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> its row here, -1 for the others

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("a trainable-tokens layer replaces rows of its module's output: it runs through route_parallel")

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        which = self.slot[h_in]
        rows = self.trainable_tokens_delta[which.clamp_min(0)]
        scale = getattr(module, "embed_scale", None)
        if scale is not None:
            rows = rows * (scale.to(rows.dtype) if isinstance(scale, torch.Tensor) else scale)
        return torch.where((which >= 0).unsqueeze(-1), rows.to(h_out.dtype), h_out)

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The embedding with the trained rows written in."""
        return {"weight": module.weight.index_copy(0, self.token_index, self.trainable_tokens_delta.to(module.weight.dtype))}


class TiedTokensLayer(DeltaLayer):
    """On a linear head whose weight is tied to the embedding (or a second addressed embedding sharing it):
    the same rows, through the embedding's layer.

    The rows are the embedding layer's parameter, kept out of this layer's state (saved once). The head
    adds ``x (rows - original)^T`` to the chosen tokens' outputs: exactly zero while the rows are untrained.
    """

    route = "parallel"
    reads_module = True

    def __init__(self, source: TrainableTokensLayer):
        super().__init__()
        self.source = [source]  # a plain list: not a child module, so its tensors are not this layer's state

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("a tied trainable-tokens layer runs through route_parallel")

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        source = self.source[0]
        if isinstance(module, nn.Embedding):  # a second addressed embedding sharing the weight (seq2seq encoder/decoder)
            return source.route_parallel(h_in, h_out, module)
        change = (source.trainable_tokens_delta - source.trainable_tokens_original).to(h_in.dtype)
        logits = h_in @ change.t()
        return h_out.index_add(-1, source.token_index, logits.to(h_out.dtype))

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.source[0].merged_parameters(module)


class TrainableTokensModel(DeltaBase):
    """Trainable rows of the input embedding: ``token_indices`` (required), ``init_weights=True``;
    default position: the input embeddings. Modules tied to an addressed embedding follow it."""

    config_class = TrainableTokensConfig
    delta_type = "trainable_tokens"
    default_modified_modules = ("embed",)

    @classmethod
    def resolve_targets(cls, backbone_model: nn.Module, config: DeltaConfig | None = None, **config_values: Any) -> list[Target]:
        """The addressed embeddings, then every linear layer whose weight is tied to one of them (an LM head)."""
        targets = super().resolve_targets(backbone_model, config, **config_values)
        return [*targets, *tied_targets(backbone_model, targets)]

    def prepare(self, observations: Any) -> None:
        """Check the token ids as a whole (each id alone is checked by the config)."""
        self.tokens = TokenLayers(self.config.token_indices, self.config.init_weights, "trainable_tokens", "token_indices")

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> DeltaLayer:
        return self.tokens.build(path, module)


class TokenLayers:
    """Builds the trainable-tokens layers of one delta: a :class:`TrainableTokensLayer` on the first module
    with an embedding weight, a :class:`TiedTokensLayer` on each later module sharing that weight. Shared by
    TrainableTokensModel and LoRA's ``trainable_token_indices`` (PEFT's LoRA option)."""

    def __init__(self, indices: list[int] | None, init_weights: bool, method: str, field: str):
        if not indices:
            raise DeltaConfigError(
                f"{method} needs {field}, the token ids whose embedding rows it trains, e.g. "
                f"{field}=tokenizer.convert_tokens_to_ids(new_tokens)."
            )
        if len(set(indices)) != len(indices):
            repeated = sorted({i for i in indices if indices.count(i) > 1})
            raise DeltaConfigError(f"{method} argument {field} repeats {repeated}; give each token id once.")
        self.indices, self.init_weights, self.method, self.field = indices, init_weights, method, field
        self.by_weight: dict[int, TrainableTokensLayer] = {}  # id(embedding weight) -> its layer, for the tied ones

    def build(self, path: str, module: nn.Module) -> DeltaLayer:
        weight = getattr(module, "weight", None)
        source = self.by_weight.get(id(weight))
        if source is not None and isinstance(module, (nn.Linear, nn.Embedding)):
            return TiedTokensLayer(source)
        if not isinstance(module, nn.Embedding):
            raise UnsupportedModuleError(
                f"{self.method} trains rows of an nn.Embedding, but {path!r} is a {type(module).__name__}; address the "
                "input embeddings (the default), e.g. modified_modules=['embed_tokens']."
            )
        if module.max_norm is not None:
            raise UnsupportedModuleError(f"{path!r} renormalises its rows (max_norm={module.max_norm}), which {self.method} does not follow.")
        too_big = [i for i in self.indices if i >= module.num_embeddings]
        if too_big:
            raise DeltaConfigError(
                f"{self.method} {self.field} {too_big} are beyond {path!r}'s {module.num_embeddings} rows; resize the "
                "embeddings first (model.resize_token_embeddings(len(tokenizer)))."
            )
        layer = TrainableTokensLayer(self.indices, module, self.init_weights)
        self.by_weight[id(weight)] = layer
        return layer


# ----------------------------------------------------------------- PEFT's trainable tokens

_KEY = ".trainable_tokens_delta"


def _write_peft(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    out: dict[str, torch.Tensor] = {}
    primary: list[str] = []
    by_layer = {id(layer): path for path, layer in delta.layers.items()}
    for path, layer in delta.layers.items():
        source = layer.source[0] if isinstance(layer, TiedTokensLayer) else layer
        out[path + _KEY] = tensors[delta_key(by_layer[id(source)], "trainable_tokens_delta")].clone()  # PEFT keeps a copy per module
        if source is layer:
            primary.append(path)
    fields = {
        "token_indices": list(delta.config.token_indices),
        "target_modules": primary[0] if len(primary) == 1 else primary,
        "init_weights": True,
    }
    return out, fields


def _read_peft(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
    names = [n for n in stored if n.endswith(_KEY)]
    if not names:
        raise PeftFormatError(f"{path.parent / PEFT_WEIGHTS_NAME} holds no '<module>{_KEY}' tensor; it is not a trainable-tokens adapter.")
    indices = peft_field(peft, "token_indices", (list,), "a list of token ids", None, path)
    targets = peft_field(peft, "target_modules", (str, list, type(None)), "a module name or a list of them", None, path)
    listed = [targets] if isinstance(targets, str) else list(targets or [])
    paths = [n[: -len(_KEY)] for n in names]
    primary = [p for p in paths if any(p == t or p.endswith("." + t) for t in listed)] or paths[:1]
    # the others are PEFT's copies for modules tied to the embedding: opendelta's tied layers read the embedding's rows
    ordered = primary + [p for p in paths if p not in primary]
    shapes = {delta_key(p, "trainable_tokens_delta"): stored[p + _KEY] for p in primary}
    values = {"modified_modules": primary, "token_indices": indices}
    return PeftTensors(
        values, ordered, shapes, lambda t: {delta_key(p, "trainable_tokens_delta"): t[p + _KEY] for p in primary}, set(names)
    )


register_peft_method(PeftMethod("TRAINABLE_TOKENS", "trainable_tokens", _write_peft, _read_peft))
