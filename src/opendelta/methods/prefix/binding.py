"""How one attention module is called: where its cache, mask and hidden state are, and who calls the attention function."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from opendelta.errors import UnsupportedModuleError
from opendelta.layer import as_keywords, positional_names
from opendelta.methods.prefix.attention import PREFIXES_ARG, configs_below
from opendelta.methods.prefix.cache import KeyShapeProbe

#: how transformers names an attention module's KV cache, its mask, and a cross-attention's source
CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
MASK_ARGS = ("attention_mask", "mask")
CROSS_ARGS = ("key_value_states", "encoder_hidden_states")


@dataclass
class CallBinding:
    """How one attention module is called: its parameter names, cache/mask names, layer index, causality.

    With no cache (``cache_name`` None) the prefix enters through :func:`~opendelta.methods.prefix.attention.prefixed_attention`, which
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

    def probe_hook(self, probe: KeyShapeProbe) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict]]:
        """A forward pre-hook for the dummy pass: hands `probe` to the attention module as its cache
        (without a cache, to its attention function as a prefix), and notes a cross-attention call."""

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden, kwargs = self.keyword_arguments(args, kwargs)
            probe.cross = probe.cross or any(kwargs.get(name) is not None for name in CROSS_ARGS)
            if self.cache_name is None:
                return (hidden,), {**kwargs, PREFIXES_ARG: (*kwargs.get(PREFIXES_ARG, ()), probe)}
            probe.inner = next((kwargs[name] for name in CACHE_ARGS if kwargs.get(name) is not None), None)
            kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_ARGS}
            return (hidden,), {**kwargs, self.cache_name: probe}

        return pre_hook


def call_binding(path: str, host: nn.Module) -> CallBinding:
    name = f"{path!r} ({type(host).__name__})"
    try:
        params = inspect.signature(host.forward).parameters
    except (TypeError, ValueError):
        params = {}
    positional = positional_names(host)
    cache_name = next((n for n in CACHE_ARGS if n in params), None)
    mask_name = next((n for n in MASK_ARGS if n in params), None)
    passes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not positional or (cache_name is None or mask_name is None) and not (passes_kwargs and configs_below(host)):
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
    return CallBinding(name, positional, cache_name, mask_name, layer_idx, causal)
