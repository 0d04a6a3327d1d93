"""Soft prompts (Lester et al., 2021): learned embeddings prepended to the input embeddings.

The prompt enters where the token ids do. A *before* delta on the model's top-level call (on
the encoder stack of an encoder-decoder, where ``generate()`` runs the encoder on its own) looks
the ids up in the input embedding, puts the prompt in front and passes ``inputs_embeds``; the
inputs that run along the sequence follow: ``attention_mask`` gets ones, ``token_type_ids``
zeros, token-level ``labels`` -100 and explicit ``position_ids`` shift by the prompt length
(the prompt holds positions ``0..n-1``). Outputs keep the prompt positions, as in the paper.

With a KV cache the prompt is prepended once: on a call whose cache already holds entries, only
the attention mask (which covers the cache) and explicit positions are extended. An
encoder-decoder's decoder gets the extended mask for its cross-attention over the prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opendelta.config import DeltaConfig, positive, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import MixedBatchError, OpenDeltaError, UnsupportedModuleError
from opendelta.layer import COMBINED, DeltaLayer, as_keywords, combined_order, positional_names, prepend
from opendelta.runtime_init import Observation
from opendelta.targets import Target, resolve_config

CACHE_ARGS = ("cache", "past_key_values")


@dataclass
class SoftPromptConfig(DeltaConfig):
    soft_token_num: int = size(100)
    init_range: float = positive(0.5)
    token_init: bool = True


def _cache_length(kwargs: dict) -> int:
    cache = next((kwargs[n] for n in CACHE_ARGS if kwargs.get(n) is not None), None)
    return int(cache.get_seq_length()) if cache is not None else 0


def _extended_mask(mask: Any, n: int, where: str) -> Any:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise UnsupportedModuleError(
            f"SoftPromptModel extends 2-D attention masks (batch, length), but {where} got "
            f"{type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}; pass a 2-D mask "
            "(a static or compiled cache builds 4-D masks: use the default dynamic cache)."
        )
    return prepend(mask, n, 1)  # a model's input mask: true (1) = attend, whatever its dtype


class PromptCall:
    """The call of a model with a prompt in front of its input: for one soft prompt, or for several
    combined in a mixed batch. Subclasses give `soft_token_num`, `embedding`, `positional` and
    :meth:`prompt_like`."""

    soft_token_num: int
    embedding: list[nn.Module]
    positional: tuple[str, ...]

    def prompt_like(self, embeds: torch.Tensor) -> torch.Tensor:
        """The prompt for every row of `embeds` (batch, length, hidden): (batch, soft_token_num, hidden)."""
        raise NotImplementedError

    def route_call(self, args: tuple, kwargs: dict, input_name: str | None) -> tuple[tuple, dict]:
        kwargs = as_keywords(self.positional, args, kwargs)
        n = self.soft_token_num
        first = _cache_length(kwargs) == 0
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if first and (ids is not None or embeds is not None):
            if embeds is None:
                embeds = self.embedding[0](ids)
            length = embeds.shape[1]
            prompt = self.prompt_like(embeds)
            kwargs["input_ids"], kwargs["inputs_embeds"] = None, torch.cat([prompt, embeds], dim=1)
            if isinstance(kwargs.get("token_type_ids"), torch.Tensor):
                kwargs["token_type_ids"] = prepend(kwargs["token_type_ids"], n, 0, dim=1)
            labels = kwargs.get("labels")
            if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == length:
                kwargs["labels"] = prepend(labels, n, -100, dim=1)
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor):
            shifted = positions + n
            if first:
                own = torch.arange(n, device=positions.device, dtype=positions.dtype)
                shifted = torch.cat([own.expand(*positions.shape[:-1], n), shifted], dim=-1)
            kwargs["position_ids"] = shifted
        kwargs["attention_mask"] = _extended_mask(kwargs.get("attention_mask"), n, "the model")
        return (), kwargs


class SoftPromptLayer(PromptCall, DeltaLayer):
    """The prompt P (soft_token_num x hidden), put in front of the embedded input of each call."""

    route = "before"
    mixed_rows = COMBINED

    def __init__(self, config: SoftPromptConfig, embedding: nn.Module, host: nn.Module):
        super().__init__()
        weight = embedding.weight
        if config.token_init:
            vocab = weight.shape[0]
            ids = torch.randperm(vocab)[: config.soft_token_num] if vocab >= config.soft_token_num else torch.randint(
                vocab, (config.soft_token_num,)
            )
            with torch.no_grad():
                start = embedding(ids.to(weight.device)).detach().clone()
        else:
            start = torch.empty(config.soft_token_num, weight.shape[1], dtype=weight.dtype, device=weight.device)
            nn.init.uniform_(start, -config.init_range, config.init_range)
        self.soft_embeds = nn.Parameter(start)
        self.embedding = [embedding]  # a list: looked up, never registered as this layer's child
        self.positional = positional_names(host)

    def forward(self) -> torch.Tensor:
        return self.soft_embeds

    @property
    def soft_token_num(self) -> int:
        return self.soft_embeds.shape[0]

    def prompt_like(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.soft_embeds.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)

    @classmethod
    def combine_rows(cls, parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int) -> RowPrompts:
        _same_length(parts)
        return RowPrompts(parts, batch_size)  # type: ignore[arg-type]


def _same_length(parts: list[tuple[DeltaLayer, torch.Tensor]]) -> None:
    lengths = sorted({layer.soft_token_num for layer, _ in parts})  # type: ignore[attr-defined]
    if len(lengths) != 1:
        raise MixedBatchError(
            f"soft prompts of one mixed batch must have the same soft_token_num, got {lengths}; "
            "mix prompts of one length, or run them in separate batches."
        )


class RowPrompts(PromptCall):
    """Several soft prompts in a mixed batch: each row gets its delta's prompt."""

    def __init__(self, parts: list[tuple[SoftPromptLayer, torch.Tensor]], batch_size: int):
        first = parts[0][0]
        self.parts = parts
        self.batch_size = batch_size
        self.soft_token_num = first.soft_token_num
        self.embedding = first.embedding
        self.positional = first.positional
        self.order = combined_order(parts, batch_size, "a soft prompt")

    def prompt_like(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.shape[0] != self.batch_size:
            raise MixedBatchError(
                f"this mixed batch routes {self.batch_size} rows, but the model got a batch of {embeds.shape[0]}; "
                "pass one row index per batch row (no beam search or num_return_sequences > 1)"
            )
        prompts = [layer.prompt_like(embeds[: rows.numel()]) for layer, rows in self.parts]
        return torch.cat(prompts).index_select(0, self.order)


class CrossPromptMaskLayer(DeltaLayer):
    """On an encoder-decoder's decoder: the cross-attention mask gets ones for the encoder's prompt."""

    route = "before"
    mixed_rows = COMBINED

    def __init__(self, soft_token_num: int, host: nn.Module):
        super().__init__()
        self.soft_token_num = soft_token_num
        self.positional = positional_names(host)

    def route_call(self, args: tuple, kwargs: dict, input_name: str | None) -> tuple[tuple, dict]:
        kwargs = as_keywords(self.positional, args, kwargs)
        mask, states = kwargs.get("encoder_attention_mask"), kwargs.get("encoder_hidden_states")
        if isinstance(mask, torch.Tensor) and isinstance(states, torch.Tensor):
            if mask.shape[-1] == states.shape[1] - self.soft_token_num:
                kwargs["encoder_attention_mask"] = _extended_mask(mask, self.soft_token_num, "the decoder")
        return (), kwargs

    @classmethod
    def combine_rows(cls, parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int) -> DeltaLayer:
        _same_length(parts)
        combined_order(parts, batch_size, "a soft prompt")
        return parts[0][0]  # the mask needs only the (common) prompt length


class SoftPromptModel(DeltaBase):
    """Soft prompt tuning: ``soft_token_num`` learned embeddings in front of every input.

    Arguments: ``soft_token_num=100, init_range=0.5, token_init=True`` (token_init copies the
    embeddings of randomly drawn vocabulary tokens; otherwise uniform in ±init_range).
    ``modified_modules`` names the input embedding (default: role ``embed``, else the model's
    ``get_input_embeddings()``); the prompt itself sits on the model's top-level call, or on the
    encoder (and the decoder's cross-attention mask) of an encoder-decoder.
    """

    config_class = SoftPromptConfig
    delta_type = "soft_prompt"
    default_modified_modules = ("embed",)

    @classmethod
    def resolve_targets(
        cls, backbone_model: nn.Module, config: DeltaConfig | None = None, **config_values: Any
    ) -> list[Target]:
        """The calls the prompt intercepts: the model (path ``""``), or the encoder and decoder stacks."""
        if config is None:
            config = cls.config_class.from_dict(config_values)
        _input_embedding(backbone_model, config)
        stacks = [backbone_model]
        if getattr(getattr(backbone_model, "config", None), "is_encoder_decoder", False):
            stacks = [backbone_model.get_encoder(), backbone_model.get_decoder()]
        paths = [_path_to(backbone_model, stack) for stack in stacks]
        return [Target(path, path, stack) for path, stack in zip(paths, stacks)]

    def prepare(self, observations: Mapping[str, Observation]) -> None:
        """Find the decoder of an encoder-decoder (it gets the cross-attention mask layer)."""
        backbone = self.backbone_model
        is_encoder_decoder = getattr(getattr(backbone, "config", None), "is_encoder_decoder", False)
        self.decoder_path = _path_to(backbone, backbone.get_decoder()) if is_encoder_decoder else None

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> DeltaLayer:
        if path == self.decoder_path:
            return CrossPromptMaskLayer(self.config.soft_token_num, module)
        # the prompt takes positions 0..n-1: a model with a fixed number of positions needs room for the input
        positions = getattr(getattr(self.backbone_model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and not isinstance(positions, bool):
            self.config.check_below("soft_token_num", positions, "max_position_embeddings")
        params = _parameter_names(module)
        if not {"input_ids", "inputs_embeds", "attention_mask"} <= params:
            raise UnsupportedModuleError(
                f"SoftPromptModel prepends the prompt where the token ids enter, so it needs a model whose forward "
                f"takes input_ids, inputs_embeds and attention_mask; {type(module).__name__} takes "
                f"({', '.join(sorted(params))})."
            )
        return SoftPromptLayer(self.config, _input_embedding(self.backbone_model, self.config), module)


def _parameter_names(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _path_to(root: nn.Module, module: nn.Module) -> str:
    return next(path for path, candidate in root.named_modules() if candidate is module)


def _input_embedding(backbone: nn.Module, config: DeltaConfig) -> nn.Module:
    """The token embedding the prompt lives beside: addressed, by role, or the model's own."""
    try:
        targets = resolve_config(backbone, config, SoftPromptModel.default_modified_modules, owner="SoftPromptModel")
    except OpenDeltaError:
        if config.modified_modules is not None:
            raise
        getter = getattr(backbone, "get_input_embeddings", None)
        found = getter() if callable(getter) else None
        if not isinstance(found, nn.Embedding):
            raise UnsupportedModuleError(
                f"SoftPromptModel needs the model's token embedding, but {type(backbone).__name__} has no "
                "'embed' role and no get_input_embeddings(); name it, e.g. modified_modules=['embed_tokens']."
            ) from None
        return found
    # tied stacks (T5's shared, BART's encoder/decoder tables) count once
    embeddings = {id(getattr(t.module, "weight", t.module)): t.module for t in targets}
    paths = [t.path for t in targets]
    if len(embeddings) != 1:
        raise UnsupportedModuleError(
            f"SoftPromptModel needs exactly one token embedding, but modified_modules name {len(embeddings)} "
            f"different modules ({', '.join(paths)}); name one."
        )
    embedding = next(iter(embeddings.values()))
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedModuleError(
            f"SoftPromptModel needs a token embedding (nn.Embedding), but {paths[0]!r} is a "
            f"{type(embedding).__name__}; name the input embedding, e.g. 'embed_tokens' or 'word_embeddings'."
        )
    return embedding
