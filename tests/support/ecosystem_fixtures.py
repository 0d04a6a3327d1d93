"""Tiny models (built from configs) shared by the ecosystem tests: Trainer, compile, PEFT, distributed."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

TINY_BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=2,
)


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    """A 2-layer, hidden-32 BERT classifier with weights fixed by `seed`, in eval mode."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**TINY_BERT, **overrides})).eval()


def tiny_batch(n: int = 4, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and labels for `tiny_bert`."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 99, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def randomize_deltas(delta, seed: int = 2) -> None:
    """Give every delta tensor non-zero values, so a delta visibly changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
