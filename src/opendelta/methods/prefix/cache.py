"""What a prefixed attention module sees as its KV cache: the real one with the prefix in front, or a probe."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from opendelta.methods.prefix.model import PrefixCall


class PrefixedCache:
    """What an attention module sees as its cache: the real one (or none), with the prefix in front.

    ``update`` stores the new keys/values in the real cache only, then returns the prefix followed
    by everything cached; ``get_seq_length`` counts the prefix entries. Any other attribute is the
    real cache's.
    """

    def __init__(self, inner: Any, layer: PrefixCall):
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


class KeyShapeProbe:
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
