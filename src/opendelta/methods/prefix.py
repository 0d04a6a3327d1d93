"""Prefix tuning (Li & Liang, 2021): learned key/value vectors in front of every attention's keys and values.

How the prefix enters the data flow, without the ``past_key_values`` API (which BERT-style
encoders no longer accept under transformers 5): every transformers-5 attention module hands its
fresh keys and values, already split into heads and rotated, to ``cache.update(k, v, layer_idx)``
and attends over what that returns. A *before* delta on the attention module passes it a
:class:`PrefixedCache` instead of its cache: the view forwards ``update`` to the real cache (if
any) and puts the prefix in front of what comes back, and the attention mask is padded with
"attend" entries for the prefix on the key axis. So

* the real cache never holds the prefix: each call adds it once, in front of the cached keys,
  and cached decoding gives the same tokens as recomputing everything;
* prefix keys carry no rotary rotation (they join after it) and real tokens keep their positions;
  to the attention module they look like ``prefix_token_num`` entries already in its cache (T5's
  relative position bias therefore treats them as the positions just before the first token);
* a padded row is still masked where it was, and prefixes are visible to every query.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opendelta.config import DeltaConfig
from opendelta.delta_base import DeltaBase
from opendelta.errors import DeltaConfigError, MixedBatchError, UnsupportedModuleError
from opendelta.routing import DeltaLayer, as_keywords, combined_order, positional_names
from opendelta.runtime_init import Observation, observe

#: how transformers names an attention module's KV cache, its mask, and a cross-attention's source
CACHE_ARGS = ("cache", "past_key_values", "past_key_value")
MASK_ARGS = ("attention_mask", "mask")
CROSS_ARGS = ("key_value_states", "encoder_hidden_states")


@dataclass
class PrefixConfig(DeltaConfig):
    prefix_token_num: int = 6
    reparameterize: bool = True
    embed_dim: int = 512
    mid_dim: int = 512

    def validate(self) -> None:
        for name in ("prefix_token_num", "embed_dim", "mid_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DeltaConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.reparameterize, bool):
            raise DeltaConfigError(f"reparameterize must be True or False, got {self.reparameterize!r}")


@dataclass(frozen=True)
class KeyValueObservation(Observation):
    """An attention module's observation plus the shape of one head's keys: (key/value heads, head dim)."""

    kv_heads: int = 0
    head_dim: int = 0


class PrefixedCache:
    """What an attention module sees as its cache: the real one (or none), with the prefix in front.

    ``update`` stores the new keys/values in the real cache only, then returns the prefix followed
    by everything cached; ``get_seq_length`` counts the prefix entries. Any other attribute is the
    real cache's.
    """

    def __init__(self, inner: Any, layer: PrefixLayer):
        self.inner = inner
        self.layer = layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.inner is not None:
            target = getattr(self.inner, "self_attention_cache", self.inner)  # an encoder-decoder cache
            key_states, value_states = target.update(key_states, value_states, layer_idx, *args, **kwargs)
        keys, values = self.layer.key_values(key_states)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        past = self.inner.get_seq_length(layer_idx) if self.inner is not None else 0
        return past + self.layer.prefix_token_num

    def __getattr__(self, name: str) -> Any:
        if self.inner is None:
            raise AttributeError(f"the prefix cache view has no real cache behind it to give {name!r}")
        return getattr(self.inner, name)


class PrefixLayer(DeltaLayer):
    """Keys and values ``[MLP(E); ...]`` (or direct parameters) for one attention module.

    With reparameterization: E (prefix_token_num x embed_dim) -> Linear(embed_dim, mid_dim) -> tanh
    -> Linear(mid_dim, 2 x kv_heads x head_dim); each layer has its own, so layers detach alone.
    """

    route = "before"

    def __init__(self, config: PrefixConfig, binding: _CallBinding, observation: KeyValueObservation):
        super().__init__()
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
        self._binding = binding

    def forward(self) -> torch.Tensor:
        """The prefix as (prefix_token_num, 2 x kv_heads x head_dim): keys then values."""
        if hasattr(self, "prefix"):
            return self.prefix
        return self.reparameterization(self.prefix_embedding)

    def key_values(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values shaped like `like` (batch, kv_heads, seq, head_dim) on the seq axis."""
        flat = self().to(like.dtype)
        heads = flat.view(self.prefix_token_num, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        shape = (like.shape[0], self.kv_heads, self.prefix_token_num, self.head_dim)
        return heads[0].unsqueeze(0).expand(shape), heads[1].unsqueeze(0).expand(shape)

    def route_call(self, args: tuple, kwargs: dict, input_name: str | None) -> tuple[tuple, dict]:
        binding = self._binding
        hidden, kwargs = binding.keyword_arguments(args, kwargs)
        if any(kwargs.get(name) is not None for name in CROSS_ARGS):
            raise UnsupportedModuleError(
                f"PrefixModel acts on self-attention, but {binding.host} was called as cross-attention; "
                "address the self-attention modules (the default role 'attn')."
            )
        cache = next((kwargs.pop(name) for name in CACHE_ARGS if kwargs.get(name) is not None), None)
        for name in CACHE_ARGS:
            kwargs.pop(name, None)
        mask_name = binding.mask_name
        kwargs[mask_name] = self._extend_mask(kwargs.get(mask_name), hidden, cache, kwargs.get("is_causal"))
        kwargs[binding.cache_name] = PrefixedCache(cache, self)
        return (hidden,), kwargs

    def _extend_mask(self, mask: Any, hidden: torch.Tensor, cache: Any, is_causal: bool | None) -> Any:
        n = self.prefix_token_num
        if isinstance(mask, torch.Tensor) and mask.dim() in (2, 4):  # (batch, keys) or (batch, 1, queries, keys)
            attend = mask.new_ones(*mask.shape[:-1], n) if mask.dtype in (torch.bool, torch.long, torch.int) else mask.new_zeros(*mask.shape[:-1], n)
            return torch.cat([attend, mask], dim=-1)
        if mask is not None:
            raise UnsupportedModuleError(
                f"PrefixModel cannot extend a {type(mask).__name__} attention mask in {self._binding.host}; "
                "load the model with attn_implementation='sdpa' or 'eager'."
            )
        queries = hidden.shape[-2]
        causal = self._binding.is_causal if is_causal is None else is_causal
        if not causal or queries == 1:
            return None  # every query sees every key, the prefix included
        # no mask means "plain causal": spell it out, since the kernels' implicit causal mask is top-left aligned
        past = cache.get_seq_length(self._binding.layer_idx) if cache is not None else 0
        keys = torch.arange(past + queries, device=hidden.device)
        queries_at = torch.arange(past, past + queries, device=hidden.device)
        blocked = torch.finfo(hidden.dtype).min
        real = torch.where(keys[None, :] <= queries_at[:, None], 0.0, blocked).to(hidden.dtype)
        full = torch.cat([real.new_zeros(queries, n), real], dim=-1)
        return full[None, None]


    @classmethod
    def combine_rows(cls, parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int) -> _RowPrefixes:
        lengths = {(layer.prefix_token_num, layer.kv_heads, layer.head_dim) for layer, _ in parts}  # type: ignore[attr-defined]
        if len(lengths) != 1 or not all(isinstance(layer, PrefixLayer) for layer, _ in parts):
            raise MixedBatchError(
                f"prefix deltas of one mixed batch must have the same prefix_token_num on {parts[0][0]._binding.host}, "  # type: ignore[attr-defined]
                f"got {sorted(n for n, _, _ in lengths)}; mix prefixes of one length, or run them in separate batches."
            )
        return _RowPrefixes(parts, batch_size)


class _RowPrefixes:
    """Several prefix deltas on one attention module in a mixed batch: each row gets its delta's prefix."""

    route_call = PrefixLayer.route_call
    _extend_mask = PrefixLayer._extend_mask

    def __init__(self, parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int):
        first = parts[0][0]
        assert isinstance(first, PrefixLayer)
        self.parts = parts
        self.batch_size = batch_size
        self.prefix_token_num = first.prefix_token_num
        self._binding = first._binding
        self.order = combined_order(parts, batch_size, "a prefix")

    def key_values(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.shape[0] != self.batch_size:
            raise MixedBatchError(
                f"this mixed batch routes {self.batch_size} rows, but {self._binding.host} got a batch of "
                f"{like.shape[0]}; pass one row index per batch row (no beam search or num_return_sequences > 1)"
            )
        pairs = [layer.key_values(like[: rows.numel()]) for layer, rows in self.parts]  # type: ignore[attr-defined]
        keys = torch.cat([k for k, _ in pairs]).index_select(0, self.order)
        values = torch.cat([v for _, v in pairs]).index_select(0, self.order)
        return keys, values


@dataclass
class _CallBinding:
    """How one attention module is called: its parameter names, cache/mask names, layer index, causality."""

    host: str
    positional: tuple[str, ...]
    cache_name: str
    mask_name: str
    layer_idx: int
    is_causal: bool

    def keyword_arguments(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
        """The hidden state, and every other argument by keyword."""
        kwargs = as_keywords(self.positional, args, kwargs)
        return kwargs.pop(self.positional[0]), kwargs


def _call_binding(path: str, host: nn.Module) -> _CallBinding:
    name = f"{path!r} ({type(host).__name__})"
    try:
        params = inspect.signature(host.forward).parameters
    except (TypeError, ValueError):
        params = {}
    positional = positional_names(host)
    cache_name = next((n for n in CACHE_ARGS if n in params), None)
    mask_name = next((n for n in MASK_ARGS if n in params), None)
    if not positional or cache_name is None or mask_name is None:
        raise UnsupportedModuleError(
            f"PrefixModel needs a self-attention module whose forward takes a KV cache ({' / '.join(CACHE_ARGS)}) "
            f"and an attention mask ({' / '.join(MASK_ARGS)}), but {name} takes ({', '.join(params)}); "
            "address the attention blocks (role 'attn'), e.g. 'self_attn' or 'attention'."
        )
    layer_idx = next((m.layer_idx for m in host.modules() if isinstance(getattr(m, "layer_idx", None), int)), 0)
    causal = next((m.is_causal for m in host.modules() if isinstance(getattr(m, "is_causal", None), bool)), True)
    return _CallBinding(name, positional, cache_name, mask_name, layer_idx, causal)


class _KeyShapeProbe:
    """A cache view for the dummy pass: records the key shape the attention module hands over.

    It passes everything on to the cache it wraps (another delta's view, or the real cache), so
    measuring does not disturb deltas already attached.
    """

    def __init__(self) -> None:
        self.inner: Any = None
        self.shape: tuple[int, ...] | None = None
        self.cross = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.shape = tuple(key_states.shape)
        if self.inner is None or self.cross:
            return key_states, value_states
        target = getattr(self.inner, "self_attention_cache", self.inner)
        return target.update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.get_seq_length(layer_idx) if self.inner is not None else 0


class PrefixModel(DeltaBase):
    """Prefix tuning on every addressed self-attention module.

    Arguments: ``prefix_token_num=6, reparameterize=True, embed_dim=512, mid_dim=512``; default
    positions: the self-attention blocks (role ``attn``).
    """

    config_class = PrefixConfig
    delta_type = "prefix"
    default_modified_modules = ("attn",)
    needs_runtime_init = True

    def runtime_observe(self, backbone: nn.Module, paths: Sequence[str], dummy_inputs: Any) -> dict[str, Observation]:
        modules = dict(backbone.named_modules())
        self._bindings = {p: _call_binding(p, modules[p]) for p in paths}  # raises for a module that is no attention
        bindings = self._bindings
        probes = {p: _KeyShapeProbe() for p in paths}

        def hand_probe(path: str):
            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                hidden, kwargs = bindings[path].keyword_arguments(args, kwargs)
                probe = probes[path]
                probe.cross = probe.cross or any(kwargs.get(name) is not None for name in CROSS_ARGS)
                probe.inner = next((kwargs[name] for name in CACHE_ARGS if kwargs.get(name) is not None), None)
                kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_ARGS}
                return (hidden,), {**kwargs, bindings[path].cache_name: probe}

            return pre_hook

        seen = observe(backbone, paths, dummy_inputs, pre_hooks={p: hand_probe(p) for p in paths})
        found: dict[str, Observation] = {}
        for path in paths:
            if probes[path].cross:
                raise UnsupportedModuleError(
                    f"PrefixModel acts on self-attention, but {bindings[path].host} is cross-attention; "
                    "address the self-attention modules (the default role 'attn')."
                )
            shape = probes[path].shape
            if shape is None or len(shape) != 4:
                raise UnsupportedModuleError(
                    f"PrefixModel needs {bindings[path].host} to hand its keys and values to its KV cache "
                    "(cache.update, as every transformers>=5 attention does), but the dummy pass saw none; "
                    "address the self-attention modules instead."
                )
            base = seen[path]
            found[path] = KeyValueObservation(
                base.input_shape, base.output_shape, base.dtype, base.device, kv_heads=shape[1], head_dim=shape[3]
            )
        return found

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> PrefixLayer:
        assert isinstance(observation, KeyValueObservation)
        return PrefixLayer(self.config, self._bindings[path], observation)
