"""Prefixes for attentions without a cache: transformers' attention function, reached through a config view.

Such an attention module hands its keys and values to the function ``config._attn_implementation``
names, passing on its ``**kwargs``. A prefixed module gets an :class:`AttentionConfigView` whose
``_attn_implementation`` names :func:`prefixed_attention` (registered once with transformers'
``AttentionInterface``), and its prefix layers ride along in the call's keyword arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from opendelta.addressing import is_delta_module
from opendelta.errors import UnsupportedModuleError
from opendelta.methods.prefix.cache import KeyShapeProbe
from opendelta.methods.prefix.masks import BIAS_ARGS, extend_bias, extend_mask

#: the attention function a prefixed module without a cache uses, and the keyword that carries its prefixes
ATTENTION_NAME = "opendelta_prefix"
PREFIXES_ARG = "opendelta_prefixes"


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


def configs_below(host: nn.Module) -> list[nn.Module]:
    """The modules in `host` (itself included, delta layers excluded) whose own ``config`` picks an attention function."""
    found = []
    for module in host.modules():
        if is_delta_module(module):
            continue
        config = module.__dict__.get("config")
        if isinstance(config, AttentionConfigView) or isinstance(getattr(config, "_attn_implementation", None), str):
            found.append(module)
    return found


def view_configs(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """Give each module a config view (where it has none yet); returns those that got one."""
    changed = []
    for module in modules:
        config = module.__dict__["config"]
        if not isinstance(config, AttentionConfigView):
            module.__dict__["config"] = AttentionConfigView(config)
            changed.append(module)
    return changed


def restore_configs(modules: Sequence[nn.Module]) -> None:
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
        if isinstance(prefix, KeyShapeProbe):
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


def register_attention() -> None:
    """Register :func:`prefixed_attention` with transformers once (its public AttentionInterface)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, prefixed_attention)
        _registered = True
