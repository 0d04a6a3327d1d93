"""The prefix-tuning method: per attention module, learned keys and values in front of its own.

How the prefix gets there: :mod:`.cache` (attentions with a KV cache), :mod:`.attention`
(attentions that call transformers' attention function), :mod:`.masks` (the mask and biases over
keys), :mod:`.binding` (how each attention module is called).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from opendelta.config import DeltaConfig, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import MixedBatchError, UnsupportedModuleError
from opendelta.layer import COMBINED, DeltaLayer, combined_order
from opendelta.methods.prefix.attention import (
    PREFIXES_ARG,
    configs_below,
    register_attention,
    restore_configs,
    view_configs,
)
from opendelta.methods.prefix.binding import CACHE_ARGS, CROSS_ARGS, CallBinding, call_binding
from opendelta.methods.prefix.cache import KeyShapeProbe, PrefixedCache
from opendelta.methods.prefix.masks import BIAS_ARGS, extend_bias, extend_mask
from opendelta.methods.prefix.positions import PositionOffsetLayer
from opendelta.runtime_init import Observation, observe
from opendelta.targets import Target

#: the path of the model's own call, where position_offset=True shifts the position ids
MODEL_CALL = ""


@dataclass
class PrefixConfig(DeltaConfig):
    prefix_token_num: int = size(6)
    reparameterize: bool = True
    embed_dim: int = size(512)
    mid_dim: int = size(512)
    #: number the real tokens after the prefix, as PEFT's prefix tuning does (see positions.py); off: from 0
    position_offset: bool = False


@dataclass(frozen=True)
class KeyValueObservation(Observation):
    """An attention module's observation plus the shape of one head's keys: (key/value heads, head
    dim), and how the module is called."""

    kv_heads: int = 0
    head_dim: int = 0
    binding: CallBinding | None = field(default=None, compare=False)


class PrefixCall:
    """The call of an attention module with a prefix in front of its keys: for one prefix layer, or
    for several combined in a mixed batch. Subclasses give `binding`, `prefix_token_num` and
    :meth:`key_values`."""

    binding: CallBinding
    prefix_token_num: int

    def key_values(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values shaped like `like` (batch, kv_heads, seq, head_dim) on the seq axis."""
        raise NotImplementedError

    def route_call(self, args: tuple, kwargs: dict, input_name: str | None) -> tuple[tuple, dict]:
        binding = self.binding
        hidden, kwargs = binding.keyword_arguments(args, kwargs)
        if any(kwargs.get(name) is not None for name in CROSS_ARGS):
            raise UnsupportedModuleError(
                f"PrefixModel acts on self-attention, but {binding.host} was called as cross-attention; "
                "address the self-attention modules (the default role 'attn')."
            )
        if binding.cache_name is None:  # no cache: the attention function adds the prefix (prefixed_attention)
            kwargs[PREFIXES_ARG] = (*kwargs.get(PREFIXES_ARG, ()), self)
            return (hidden,), kwargs
        cache = next((kwargs.pop(name) for name in CACHE_ARGS if kwargs.get(name) is not None), None)
        for name in CACHE_ARGS:
            kwargs.pop(name, None)
        past = cache.get_seq_length(binding.layer_idx) if cache is not None else 0
        keys = past + hidden.shape[-2]
        mask_name = binding.mask_name
        is_causal = kwargs.get("is_causal")
        causal = binding.is_causal if is_causal is None else bool(is_causal)
        kwargs[mask_name] = extend_mask(kwargs.get(mask_name), self.prefix_token_num, hidden, past, causal, binding.host)
        for name in BIAS_ARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = extend_bias(kwargs[name], self.prefix_token_num, keys)
        kwargs[binding.cache_name] = PrefixedCache(cache, self)
        return (hidden,), kwargs


class PrefixLayer(PrefixCall, DeltaLayer):
    """Keys and values ``[MLP(E); ...]`` (or direct parameters) for one attention module.

    With reparameterization: E (prefix_token_num x embed_dim) -> Linear(embed_dim, mid_dim) -> tanh
    -> Linear(mid_dim, 2 x kv_heads x head_dim); each layer has its own, so layers detach alone.
    """

    route = "before"
    mixed_rows = COMBINED

    def __init__(self, config: PrefixConfig, observation: KeyValueObservation):
        super().__init__()
        assert observation.binding is not None
        factory = {"dtype": observation.dtype, "device": observation.device}
        self.prefix_token_num = config.prefix_token_num
        self.kv_heads, self.head_dim = observation.kv_heads, observation.head_dim
        width = 2 * self.kv_heads * self.head_dim
        if config.reparameterize:
            self.prefix_embedding = nn.Parameter(torch.randn(config.prefix_token_num, config.embed_dim, **factory))
            self.reparameterization = nn.Sequential(
                nn.Linear(config.embed_dim, config.mid_dim, **factory),
                nn.Tanh(),
                nn.Linear(config.mid_dim, width, **factory),
            )
        else:
            self.prefix = nn.Parameter(torch.randn(config.prefix_token_num, width, **factory))
        self.binding = observation.binding

    def forward(self) -> torch.Tensor:
        """The prefix as (prefix_token_num, 2 x kv_heads x head_dim): keys then values."""
        if hasattr(self, "prefix"):
            return self.prefix
        return self.reparameterization(self.prefix_embedding)

    def key_values(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self().to(like.dtype)
        heads = flat.view(self.prefix_token_num, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        shape = (like.shape[0], self.kv_heads, self.prefix_token_num, self.head_dim)
        return heads[0].unsqueeze(0).expand(shape), heads[1].unsqueeze(0).expand(shape)

    def on_add(self, module: nn.Module) -> None:
        view_configs([module.get_submodule(path) for path in self.binding.callers])

    def on_remove(self, module: nn.Module) -> None:
        if not any(isinstance(child, PrefixLayer) for child in module._modules.values()):  # the last prefix here
            restore_configs([module.get_submodule(path) for path in self.binding.callers])

    @classmethod
    def combine_rows(cls, parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int) -> RowPrefixes:
        lengths = {(layer.prefix_token_num, layer.kv_heads, layer.head_dim) for layer, _ in parts}  # type: ignore[attr-defined]
        if len(lengths) != 1:
            raise MixedBatchError(
                f"prefix deltas of one mixed batch must have the same prefix_token_num on {parts[0][0].binding.host}, "  # type: ignore[attr-defined]
                f"got {sorted(n for n, _, _ in lengths)}; mix prefixes of one length, or run them in separate batches."
            )
        return RowPrefixes(parts, batch_size)  # type: ignore[arg-type]


class RowPrefixes(PrefixCall):
    """Several prefix deltas on one attention module in a mixed batch: each row gets its delta's prefix."""

    def __init__(self, parts: list[tuple[PrefixLayer, torch.Tensor]], batch_size: int):
        self.parts = parts
        self.batch_size = batch_size
        self.prefix_token_num = parts[0][0].prefix_token_num
        self.binding = parts[0][0].binding
        self.order = combined_order(parts, batch_size, "a prefix")  # type: ignore[arg-type]

    def key_values(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.shape[0] != self.batch_size:
            raise MixedBatchError(
                f"this mixed batch routes {self.batch_size} rows, but {self.binding.host} got a batch of "
                f"{like.shape[0]}; pass one row index per batch row (no beam search or num_return_sequences > 1)"
            )
        pairs = [layer.key_values(like[: rows.numel()]) for layer, rows in self.parts]
        keys = torch.cat([k for k, _ in pairs]).index_select(0, self.order)
        values = torch.cat([v for _, v in pairs]).index_select(0, self.order)
        return keys, values


class PrefixModel(DeltaBase):
    """Prefix tuning on every addressed self-attention module.

    Arguments: ``prefix_token_num=6, reparameterize=True, embed_dim=512, mid_dim=512``,
    ``position_offset=False`` (True: the real tokens take positions after the prefix, as in PEFT's
    prefix tuning); default positions: the self-attention blocks (role ``attn``).
    """

    config_class = PrefixConfig
    delta_type = "prefix"
    default_modified_modules = ("attn",)
    needs_runtime_init = True

    @classmethod
    def resolve_targets(cls, backbone_model: nn.Module, config: DeltaConfig | None = None, **config_values: Any) -> list[Target]:
        """The attention modules, and with ``position_offset`` the model's own call (path ``""``)."""
        if config is None:
            config = cls.config_class.from_dict(config_values)
        targets = super().resolve_targets(backbone_model, config)
        if config.position_offset and all(t.path != MODEL_CALL for t in targets):
            targets.append(Target(MODEL_CALL, MODEL_CALL, backbone_model))
        return targets

    @classmethod
    def attention_by_layer(cls, backbone_model: nn.Module) -> dict[int, str]:
        """Layer index -> the path of that layer's self-attention (the default positions), as prefix
        layers index them: how a format that stores prefixes by layer (PEFT's) finds their modules."""
        targets = super().resolve_targets(backbone_model, cls.config_class.from_dict({}))
        return {call_binding(t.path, t.module).layer_idx: t.path for t in targets}

    def runtime_observe(self, backbone: nn.Module, paths: Sequence[str], dummy_inputs: Any) -> dict[str, Observation]:
        if MODEL_CALL in paths:  # the position offset needs no observation; the attention modules do
            found = self.runtime_observe(backbone, [p for p in paths if p != MODEL_CALL], dummy_inputs)
            return {**found, MODEL_CALL: Observation((), (), None, None)}
        modules = dict(backbone.named_modules())
        bindings = {p: call_binding(p, modules[p]) for p in paths}  # raises for a module that is no attention
        probes = {p: KeyShapeProbe() for p in paths}

        viewed: list[nn.Module] = []
        if any(b.cache_name is None for b in bindings.values()):
            register_attention()
        try:
            for path, binding in bindings.items():
                if binding.cache_name is None:
                    viewed += view_configs(configs_below(modules[path]))
            seen = observe(backbone, paths, dummy_inputs, pre_hooks={p: bindings[p].probe_hook(probes[p]) for p in paths})
        finally:
            restore_configs(viewed)
        found: dict[str, Observation] = {}
        for path in paths:
            binding, probe = bindings[path], probes[path]
            if probe.cross:
                raise UnsupportedModuleError(
                    f"PrefixModel acts on self-attention, but {binding.host} is cross-attention; "
                    "address the self-attention modules (the default role 'attn')."
                )
            if probe.shape is None or len(probe.shape) != 4:
                raise UnsupportedModuleError(
                    f"PrefixModel needs {binding.host} to hand its keys and values to its KV cache (cache.update) "
                    "or to transformers' attention function (ALL_ATTENTION_FUNCTIONS, passing its keyword arguments "
                    "on), but the dummy pass saw neither. Attentions that compute their scores themselves, such as "
                    "DeBERTa's and MPNet's relative-position attention (which assumes as many keys as queries), "
                    "cannot take prefix keys; use another method (e.g. lora, soft_prompt) there."
                )
            if binding.cache_name is None:
                names = {id(m): n for n, m in modules[path].named_modules()}
                binding.callers = tuple(dict.fromkeys(names[id(m)] for m in probe.callers if id(m) in names))
            base = seen[path]
            found[path] = KeyValueObservation(
                base.input_shape, base.output_shape, base.dtype, base.device, kv_heads=probe.shape[1], head_dim=probe.shape[3],
                binding=binding,
            )
        return found

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> DeltaLayer:
        if path == MODEL_CALL and self.config.position_offset:
            return PositionOffsetLayer(self.config.prefix_token_num, module)
        assert isinstance(observation, KeyValueObservation)
        return PrefixLayer(self.config, observation)
