"""Tiny models for the ports of the original OpenDelta's examples: the same transformers classes the
originals load with ``from_pretrained``, built from small configs (the only change the ports make)."""

from __future__ import annotations

import torch
import transformers as tf
from torch import nn

H = 32


def _seeded(build):
    def wrapper(*args, **kwargs):
        torch.manual_seed(0)
        return build(*args, **kwargs).eval()

    wrapper.__name__ = build.__name__
    return wrapper


@_seeded
def t5(d_model: int = H, layers: int = 2) -> nn.Module:
    """Stands in for ``AutoModelForSeq2SeqLM.from_pretrained("t5-large")`` (24 layers like t5-large
    with ``layers=24``, where a script addresses decoder layers by index; generate() needs the
    encoder and decoder to have as many layers)."""
    return tf.T5ForConditionalGeneration(tf.T5Config(d_model=d_model, d_kv=8, d_ff=37, num_layers=layers, num_decoder_layers=layers,
                                                     num_heads=4, vocab_size=99, decoder_start_token_id=0))


@_seeded
def bart_classifier() -> nn.Module:
    """Stands in for ``AutoModelForSequenceClassification.from_pretrained("facebook/bart-base")``."""
    return tf.BartForSequenceClassification(tf.BartConfig(vocab_size=99, d_model=H, encoder_layers=2, decoder_layers=2,
                                                          encoder_attention_heads=2, decoder_attention_heads=2,
                                                          encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64))


@_seeded
def roberta_classifier() -> nn.Module:
    """Stands in for ``AutoModelForSequenceClassification.from_pretrained("roberta-base")``."""
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(vocab_size=99, hidden_size=H, num_hidden_layers=2,
                                                                num_attention_heads=2, intermediate_size=37))


@_seeded
def bert_masked_lm() -> nn.Module:
    """Stands in for ``BertForMaskedLM.from_pretrained("bert-base-cased")``."""
    return tf.BertForMaskedLM(tf.BertConfig(vocab_size=99, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=37))


@_seeded
def bert(hidden: int = H) -> nn.Module:
    """Stands in for ``AutoModel.from_pretrained("bert-base-cased")`` (hidden 64 where Compacter's
    default reduction factor 16 and 4 hypercomplex divisions need it)."""
    return tf.BertModel(tf.BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=37))


IDS = torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 4]])


def seq2seq_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]}


def train_a_little(model: nn.Module, inputs: dict, steps: int = 2) -> None:
    """A few optimizer steps on the trainable parameters, so deltas differ from their initial state."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        out = model(**inputs)
        loss = sum(t.float().pow(2).mean() for t in out.values() if isinstance(t, torch.Tensor) and t.is_floating_point())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def outputs(model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return [t for t in out.values() if isinstance(t, torch.Tensor)]
