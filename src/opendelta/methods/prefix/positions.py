"""PEFT's prefix positions: the real tokens start after the prefix (``position_offset=True``).

PEFT hands a prefix to the model as a KV cache of ``prefix_token_num`` entries, so the model numbers
the real tokens from there: position ids (RoPE, learned position embeddings) start at the prefix
length. opendelta's prefix, by default, keeps them at ``0..``. With ``position_offset=True`` a
*before* delta on the model's own call adds the prefix length to the position ids, computing them
as the model would (from ``cache_position``, else from the cache's length) where none are passed,
which is exactly what the model computes with PEFT's prefix in its cache.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from opendelta.errors import MixedBatchError, UnsupportedModuleError
from opendelta.layer import COMBINED, DeltaLayer, as_keywords, positional_names

CACHE_ARGS = ("past_key_values", "cache")
INPUT_ARGS = ("input_ids", "inputs_embeds")


class PositionOffsetLayer(DeltaLayer):
    """Shifts a model call's position ids by `offset` (the prefix length); no parameters."""

    route = "before"
    mixed_rows = COMBINED

    def __init__(self, offset: int, model: nn.Module):
        super().__init__()
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "position_ids" not in params or not any(name in params for name in INPUT_ARGS):
            raise UnsupportedModuleError(
                f"position_offset=True shifts the position ids of the model's call, but {type(model).__name__}.forward "
                f"takes ({', '.join(params)}), without position_ids and input_ids/inputs_embeds; use "
                "position_offset=False (positions unshifted)."
            )
        self.offset = offset
        self.positional = positional_names(model)

    def route_call(self, args: tuple, kwargs: dict, input_name: str | None) -> tuple[tuple, dict]:
        kwargs = as_keywords(self.positional, args, kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:
            tokens = next((kwargs[name] for name in INPUT_ARGS if kwargs.get(name) is not None), None)
            if tokens is None:
                return (), kwargs
            positions = kwargs.get("cache_position")
            if positions is None:  # as the model numbers them: after what its cache holds
                cache = next((kwargs[name] for name in CACHE_ARGS if kwargs.get(name) is not None), None)
                past = int(cache.get_seq_length()) if cache is not None else 0
                positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)
            positions = positions.unsqueeze(0)
        kwargs["position_ids"] = positions + self.offset
        return (), kwargs

    @classmethod
    def combine_rows(cls, parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int) -> DeltaLayer:
        raise MixedBatchError(
            "a prefix with position_offset=True shifts the positions of every row of a call, so it cannot share a "
            "mixed batch; run its rows in a batch of their own."
        )
