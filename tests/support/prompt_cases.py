"""Tiny models and inputs shared by the prefix and soft-prompt tests (sequence-level deltas)."""

from __future__ import annotations

import torch
from torch import nn

from support.families import BY_NAME
from support.numerics import float32_noise, max_abs_diff

#: every family the sequence-level methods support, by display name (tests/support/families.py)
NAMES = ["BERT", "RoBERTa", "GPT-2", "T5", "BART", "OPT", "LLaMA"]
DECODERS = {"GPT-2", "OPT", "LLaMA", "GPT-Neo", "GPT-NeoX", "BLOOM", "Falcon"}
GENERATORS = ["GPT-2", "OPT", "LLaMA", "T5", "BART"]
#: families only prefix tuning is tested on here: attentions with no cache, and caches named layer_past
PREFIX_NAMES = [*NAMES, "DistilBERT", "ALBERT", "ModernBERT", "GPT-Neo", "GPT-NeoX", "BLOOM", "Falcon"]
PREFIX_GENERATORS = [*GENERATORS, "GPT-Neo", "GPT-NeoX", "BLOOM", "Falcon"]


def build(name: str, attn: str = "sdpa", seed: int = 0, **overrides) -> nn.Module:
    import transformers

    family = BY_NAME[name]
    cls = getattr(transformers, family.model_class)
    config = family.config()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn if attn == "eager" or cls._supports_sdpa else "eager"  # GPT-Neo, BLOOM: eager only
    torch.manual_seed(seed)
    model = cls(config).eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = 0
        if config.is_encoder_decoder:
            model.generation_config.decoder_start_token_id = 0
    return model


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, **extra) -> torch.Tensor:
    """The model's main output (logits or last hidden state); encoder-decoders decode the first 4 ids."""
    kwargs = dict(input_ids=ids, attention_mask=mask, **extra)
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids[:, :4]
    return model(**kwargs)[0]


def padded_pair(name: str, ids: torch.Tensor, pad: int = 2) -> tuple[torch.Tensor, slice, torch.Tensor, slice]:
    """Row 0 with `pad` padded positions (left for decoders, right otherwise): (mask, real positions in the
    batch, ids of the row alone, the same positions in the alone output). Encoder-decoders compare the
    decoder positions, which do not move."""
    length = ids.shape[1]
    mask = torch.ones_like(ids)
    if name in DECODERS:
        mask[0, :pad] = 0
        return mask, slice(pad, length), ids[:1, pad:], slice(0, length - pad)
    mask[0, length - pad:] = 0
    if BY_NAME[name].model_type in ("t5", "bart"):
        return mask, slice(0, 4), ids[:1, : length - pad], slice(0, 4)
    return mask, slice(0, length - pad), ids[:1, : length - pad], slice(0, length - pad)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() makes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def padding_noise(model: nn.Module, name: str, ids: torch.Tensor) -> tuple[float, float]:
    """The model's own rounding in the padding comparison of `padded_pair`, measured before a delta is added:
    row 0 padded in the batch vs alone, and the row alone in float32 vs float64."""
    mask, real, alone_ids, alone_real = padded_pair(name, ids)
    extra = {"position_ids": position_ids(mask)} if real.start else {}  # left padding: positions skip it
    with torch.no_grad():
        batch = run(model, ids, mask, **extra)[0, real]
        alone = run(model, alone_ids)[0, alone_real]
    return max_abs_diff(batch, alone), float32_noise(model, lambda m, _: run(m, alone_ids))
