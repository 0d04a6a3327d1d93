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

Attentions with no cache (ViT, DistilBERT, ALBERT, ModernBERT, ... under transformers 5) hand
their keys and values to the attention function that ``config._attn_implementation`` names,
passing on their ``**kwargs``. For those, the attention module gets a config view whose
``_attn_implementation`` names :func:`prefixed_attention` (registered once with transformers'
``AttentionInterface``; the rest of the config is the real one), and the *before* delta adds
itself to the call's keyword arguments. The function puts the prefix in front of the keys and
values, extends the mask (and any additive bias over the keys), and calls the real
implementation. Detaching gives the module its own config object back.

An additive bias that an attention receives over its key axis (BLOOM's and Falcon's ``alibi``,
a ``position_bias`` handed to the attention function) gets ``0`` for the prefix entries: for
ALiBi that is the value of the first real token, so the prefix is placed at the start of the
text (where a prefix is) whatever the padding, and the real tokens' biases are unchanged.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opendelta.addressing import is_delta_module
from opendelta.config import DeltaConfig, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import MixedBatchError, UnsupportedModuleError
from opendelta.routing import DeltaLayer, as_keywords, combined_order, positional_names
from opendelta.runtime_init import Observation, observe

#: how transformers names an attention module's KV cache, its mask, and a cross-attention's source
CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
MASK_ARGS = ("attention_mask", "mask")
CROSS_ARGS = ("key_value_states", "encoder_hidden_states")
#: additive biases over the key axis that an attention (or its attention function) receives
BIAS_ARGS = ("alibi", "position_bias")
#: the attention function a prefixed module without a cache uses, and the keyword that carries its prefixes
ATTENTION_NAME = "opendelta_prefix"
PREFIXES_ARG = "opendelta_prefixes"


@dataclass
class PrefixConfig(DeltaConfig):
    prefix_token_num: int = size(6)
    reparameterize: bool = True
    embed_dim: int = size(512)
    mid_dim: int = size(512)


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
        if binding.cache_name is None:  # no cache: the attention function adds the prefix (prefixed_attention)
            kwargs[PREFIXES_ARG] = (*kwargs.get(PREFIXES_ARG, ()), self)
            return (hidden,), kwargs
        cache = next((kwargs.pop(name) for name in CACHE_ARGS if kwargs.get(name) is not None), None)
        for name in CACHE_ARGS:
            kwargs.pop(name, None)
        past = cache.get_seq_length(binding.layer_idx) if cache is not None else 0
        keys = past + hidden.shape[-2]
        mask_name = binding.mask_name
        kwargs[mask_name] = extend_mask(
            kwargs.get(mask_name), self.prefix_token_num, hidden, past, self._causal(kwargs.get("is_causal")), binding.host
        )
        for name in BIAS_ARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = extend_bias(kwargs[name], self.prefix_token_num, keys)
        kwargs[binding.cache_name] = PrefixedCache(cache, self)
        return (hidden,), kwargs

    def _causal(self, is_causal: bool | None) -> bool:
        return self._binding.is_causal if is_causal is None else bool(is_causal)

    def on_add(self, module: nn.Module) -> None:
        _view_configs([module.get_submodule(path) for path in self._binding.callers])

    def on_remove(self, module: nn.Module) -> None:
        if not any(isinstance(child, PrefixLayer) for child in module._modules.values()):  # the last prefix here
            _restore_configs([module.get_submodule(path) for path in self._binding.callers])

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
    _causal = PrefixLayer._causal

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


def extend_mask(mask: Any, n: int, hidden: torch.Tensor, past: int, causal: bool, host: str) -> Any:
    """An attention mask over `n` prefix keys followed by the real ones: the prefix is visible to every query.

    `mask` is (batch, keys) or (batch | 1, heads | 1, queries, keys), boolean / integer (true = attend)
    or additive float, or None; `past` real keys come before the `hidden.shape[-2]` queries.
    """
    if isinstance(mask, torch.Tensor) and mask.dim() in (2, 4):
        attend = mask.new_ones(*mask.shape[:-1], n) if mask.dtype in (torch.bool, torch.long, torch.int) else mask.new_zeros(*mask.shape[:-1], n)
        return torch.cat([attend, mask], dim=-1)
    if mask is not None:
        raise UnsupportedModuleError(
            f"PrefixModel cannot extend a {type(mask).__name__} attention mask in {host}; "
            "load the model with attn_implementation='sdpa' or 'eager'."
        )
    queries = hidden.shape[-2]
    if not causal or queries == 1:
        return None  # every query sees every key, the prefix included
    # no mask means "plain causal": spell it out, since the kernels' implicit causal mask is top-left aligned
    keys = torch.arange(past + queries, device=hidden.device)
    queries_at = torch.arange(past, past + queries, device=hidden.device)
    dtype = hidden.dtype if hidden.is_floating_point() else torch.float32
    real = torch.where(keys[None, :] <= queries_at[:, None], 0.0, torch.finfo(dtype).min).to(dtype)
    return torch.cat([real.new_zeros(queries, n), real], dim=-1)[None, None]


def extend_bias(bias: torch.Tensor, n: int, keys: int) -> torch.Tensor:
    """An additive bias whose last axis is the `keys` real keys, with 0 for `n` prefix keys in front.

    A bias already sized for the prefix (T5 hands the first layer's position bias on) is returned as is.
    """
    if not isinstance(bias, torch.Tensor) or bias.shape[-1] != keys:
        return bias
    return torch.cat([bias.new_zeros(*bias.shape[:-1], n), bias], dim=-1)


@dataclass
class _CallBinding:
    """How one attention module is called: its parameter names, cache/mask names, layer index, causality.

    With no cache (``cache_name`` None) the prefix enters through :func:`prefixed_attention`, which
    the modules at `callers` (paths below the attention module, "" for itself) call.
    """

    host: str
    positional: tuple[str, ...]
    cache_name: str | None
    mask_name: str | None
    layer_idx: int
    is_causal: bool
    callers: tuple[str, ...] = ()

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
    passes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not positional or (cache_name is None or mask_name is None) and not (passes_kwargs and _configs_below(host)):
        raise UnsupportedModuleError(
            f"PrefixModel needs a self-attention module whose forward takes a KV cache ({' / '.join(CACHE_ARGS)}) "
            f"and an attention mask ({' / '.join(MASK_ARGS)}), or passes its keyword arguments to transformers' "
            f"attention function, but {name} takes ({', '.join(params)}); "
            "address the attention blocks (role 'attn'), e.g. 'self_attn' or 'attention'. (Attentions that compute "
            "their scores themselves for as many keys as queries, such as DeBERTa's and MPNet's relative-position "
            "attention, cannot take prefix keys; use another method there.)"
        )
    if mask_name is None:
        cache_name = None
    layer_idx = next(
        (v for m in host.modules() for v in (getattr(m, "layer_idx", None), getattr(m, "layer_id", None)) if isinstance(v, int)), 0
    )
    causal = next((m.is_causal for m in host.modules() if isinstance(getattr(m, "is_causal", None), bool)), True)
    return _CallBinding(name, positional, cache_name, mask_name, layer_idx, causal)


class _KeyShapeProbe:
    """A cache view (or, without a cache, a prefix provider) for the dummy pass: records the key shape
    the attention module hands over, and adds nothing.

    As a cache view it passes everything on to the cache it wraps (another delta's view, or the
    real cache), so measuring does not disturb deltas already attached.
    """

    prefix_token_num = 0

    def __init__(self) -> None:
        self.inner: Any = None
        self.shape: tuple[int, ...] | None = None
        self.cross = False
        self.callers: list[nn.Module] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.shape = tuple(key_states.shape)
        if self.inner is None or self.cross:
            return key_states, value_states
        target = getattr(self.inner, "self_attention_cache", self.inner)
        return target.update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.get_seq_length(layer_idx) if self.inner is not None else 0

    def key_values(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.shape = tuple(like.shape)
        return like[..., :0, :], like[..., :0, :]


# ----------------------------------------------------------------------------- attentions without a cache


class AttentionConfigView:
    """A module's config as a prefixed attention module sees it: ``_attn_implementation`` names
    :func:`prefixed_attention`; every other attribute, read or written, is the real config's."""

    _attn_implementation = ATTENTION_NAME

    def __init__(self, config: Any):
        object.__setattr__(self, "real_config", config)

    def __getattr__(self, name: str) -> Any:
        real = self.__dict__.get("real_config")
        if real is None or name.startswith("__"):  # copy / pickle protocols are the view's own
            raise AttributeError(name)
        return getattr(real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.real_config, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.real_config, name)

    def __repr__(self) -> str:
        return f"AttentionConfigView({self.real_config!r})"


def _configs_below(host: nn.Module) -> list[nn.Module]:
    """The modules in `host` (itself included, delta layers excluded) whose own ``config`` picks an attention function."""
    found = []
    for module in host.modules():
        if is_delta_module(module):
            continue
        config = module.__dict__.get("config")
        if isinstance(config, AttentionConfigView) or isinstance(getattr(config, "_attn_implementation", None), str):
            found.append(module)
    return found


def _view_configs(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """Give each module a config view (where it has none yet); returns those that got one."""
    changed = []
    for module in modules:
        config = module.__dict__["config"]
        if not isinstance(config, AttentionConfigView):
            module.__dict__["config"] = AttentionConfigView(config)
            changed.append(module)
    return changed


def _restore_configs(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        view = module.__dict__.get("config")
        if isinstance(view, AttentionConfigView):
            module.__dict__["config"] = view.real_config


def _real_attention(module: nn.Module, view: AttentionConfigView) -> Any:
    """The attention function the real config names; "eager" is the model file's own."""
    from transformers import AttentionInterface

    implementation = view.real_config._attn_implementation
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if implementation in (None, "eager"):
        if eager is None:
            raise UnsupportedModuleError(
                f"PrefixModel found no eager_attention_forward next to {type(module).__name__}; "
                "load the model with attn_implementation='sdpa'."
            )
        return eager
    if implementation == ATTENTION_NAME:
        raise UnsupportedModuleError(
            f"attn_implementation {ATTENTION_NAME!r} is PrefixModel's own; load the model with 'sdpa' or 'eager'."
        )
    return AttentionInterface().get_interface(implementation, eager)


def prefixed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    """The attention function of a prefixed module without a cache: the prefixes the call carries
    (keyword ``opendelta_prefixes``) go in front of the keys and values, then the real function runs."""
    view = module.__dict__.get("config")
    if not isinstance(view, AttentionConfigView):
        raise UnsupportedModuleError(
            f"attn_implementation {ATTENTION_NAME!r} is PrefixModel's own; load the model with 'sdpa' or 'eager'."
        )
    attention = _real_attention(module, view)
    prefixes = kwargs.pop(PREFIXES_ARG, ())
    if not prefixes:
        return attention(module, query, key, value, attention_mask, **kwargs)
    if any(kwargs.get(name) is not None for name in ("cu_seq_lens_q", "cu_seq_lens_k")):
        raise UnsupportedModuleError(
            f"PrefixModel cannot add keys to padding-free (packed) attention in {type(module).__name__}; "
            "pass padded batches with an attention mask."
        )
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)
    for prefix in prefixes:  # in composition order, each in front of what is there, as the cache views stack
        if isinstance(prefix, _KeyShapeProbe):
            prefix.callers.append(module)
        prefix_keys, prefix_values = prefix.key_values(key)
        n = prefix.prefix_token_num
        attention_mask = extend_mask(attention_mask, n, query, key.shape[-2] - query.shape[-2], causal, type(module).__name__)
        for name in BIAS_ARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = extend_bias(kwargs[name], n, key.shape[-2])
        key = torch.cat([prefix_keys.to(key.dtype), key], dim=-2)
        value = torch.cat([prefix_values.to(value.dtype), value], dim=-2)
    return attention(module, query, key, value, attention_mask, **kwargs)


_registered = False


def _register_attention() -> None:
    """Register :func:`prefixed_attention` with transformers once (its public AttentionInterface)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, prefixed_attention)
        _registered = True


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
                binding = bindings[path]
                hidden, kwargs = binding.keyword_arguments(args, kwargs)
                probe = probes[path]
                probe.cross = probe.cross or any(kwargs.get(name) is not None for name in CROSS_ARGS)
                if binding.cache_name is None:
                    return (hidden,), {**kwargs, PREFIXES_ARG: (*kwargs.get(PREFIXES_ARG, ()), probe)}
                probe.inner = next((kwargs[name] for name in CACHE_ARGS if kwargs.get(name) is not None), None)
                kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_ARGS}
                return (hidden,), {**kwargs, binding.cache_name: probe}

            return pre_hook

        viewed: list[nn.Module] = []
        if any(b.cache_name is None for b in bindings.values()):
            _register_attention()
        try:
            for path, binding in bindings.items():
                if binding.cache_name is None:
                    viewed += _view_configs(_configs_below(modules[path]))
            seen = observe(backbone, paths, dummy_inputs, pre_hooks={p: hand_probe(p) for p in paths})
        finally:
            _restore_configs(viewed)
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
                base.input_shape, base.output_shape, base.dtype, base.device, kv_heads=probe.shape[1], head_dim=probe.shape[3]
            )
        return found

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> PrefixLayer:
        assert isinstance(observation, KeyValueObservation)
        return PrefixLayer(self.config, self._bindings[path], observation)
