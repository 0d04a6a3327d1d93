"""A prefix's keys in the attention mask and in additive biases over the key axis."""

from __future__ import annotations

from typing import Any

import torch

from opendelta.errors import UnsupportedModuleError
from opendelta.layer import prepend

#: additive biases over the key axis that an attention (or its attention function) receives
BIAS_ARGS = ("alibi", "position_bias")
#: mask dtypes that mean "true = attend"; any other (float) mask is additive
KEEP_MASK_DTYPES = (torch.bool, torch.long, torch.int)


def extend_mask(mask: Any, n: int, hidden: torch.Tensor, past: int, causal: bool, host: str) -> Any:
    """An attention mask over `n` prefix keys followed by the real ones: the prefix is visible to every query.

    `mask` is (batch, keys) or (batch | 1, heads | 1, queries, keys), boolean / integer (true = attend)
    or additive float, or None; `past` real keys come before the `hidden.shape[-2]` queries.
    """
    if isinstance(mask, torch.Tensor) and mask.dim() in (2, 4):
        return prepend(mask, n, 1 if mask.dtype in KEEP_MASK_DTYPES else 0)
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
    # filled in `dtype` itself: a float64 minimum does not fit the float32 a Python scalar would make
    real = torch.zeros(queries, past + queries, dtype=dtype, device=hidden.device)
    real.masked_fill_(keys[None, :] > queries_at[:, None], torch.finfo(dtype).min)
    return prepend(real, n, 0)[None, None]


def extend_bias(bias: torch.Tensor, n: int, keys: int) -> torch.Tensor:
    """An additive bias whose last axis is the `keys` real keys, with 0 for `n` prefix keys in front.

    A bias already sized for the prefix (T5 hands the first layer's position bias on) is returned as is.
    """
    if not isinstance(bias, torch.Tensor) or bias.shape[-1] != keys:
        return bias
    return prepend(bias, n, 0)
