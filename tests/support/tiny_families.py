"""Tiny models of every family the delta methods are tested on, built once and copied per test.

Each family names, in its own module names, the places a method family acts on: ``out`` (the
attention output and feed-forward down projections), ``kv`` (key and value projections),
``down`` (the feed-forward down projection), ``blocks`` (modules that take and return a hidden
state), and ``norms``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

HIDDEN = 32
# tiny ops run faster on one thread than on a pool fighting other processes for two cores
torch.set_num_threads(1)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    positions: dict[str, list[str]]
    inputs: Callable[[], dict[str, Any]] = field(repr=False)
    plain: bool = False  # not a transformers model: runtime init needs dummy_inputs


def _ids() -> dict[str, Any]:
    return {"input_ids": torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 4]])}


def _seq2seq() -> dict[str, Any]:
    ids = _ids()["input_ids"]
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}


def _pixels() -> dict[str, Any]:
    return {"pixel_values": torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)}


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=99, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=37, add_pooling_layer=False), add_pooling_layer=False)


def _roberta():
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(RobertaConfig(vocab_size=99, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=37), add_pooling_layer=False)


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=99, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=16))


def _t5():
    from transformers import T5Config, T5Model

    return T5Model(T5Config(vocab_size=99, d_model=HIDDEN, d_ff=37, d_kv=16, num_layers=1, num_decoder_layers=1,
                            num_heads=2))


def _bart():
    from transformers import BartConfig, BartModel

    return BartModel(BartConfig(vocab_size=99, d_model=HIDDEN, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37,
                                decoder_ffn_dim=37, max_position_embeddings=16))


def _opt():
    from transformers import OPTConfig, OPTModel

    return OPTModel(OPTConfig(vocab_size=99, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                              ffn_dim=37, word_embed_proj_dim=HIDDEN, max_position_embeddings=16))


def _llama():
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=99, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=37, max_position_embeddings=16))


def _vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                              image_size=8, patch_size=4), add_pooling_layer=False)


class PlainBlock(nn.Module):
    """A pre-norm residual feed-forward block, to stand for any user-written nn.Module."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 37), nn.GELU(), nn.Linear(37, HIDDEN))
        self.proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h + self.mlp(self.norm(h)))


class PlainModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(PlainBlock(), PlainBlock())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.blocks(h)


def _plain_inputs() -> dict[str, Any]:
    return {"h": torch.linspace(-2, 2, 2 * 5 * HIDDEN).reshape(2, 5, HIDDEN)}


_BERT_POSITIONS = {
    "out": ["attention.output.dense", r"[r]layer\.\d+\.output\.dense"],
    "kv": ["attention.self.key", "attention.self.value"],
    "down": [r"[r]layer\.\d+\.output\.dense"],
    "blocks": ["attention", "intermediate.dense->output.dense"],  # a span: BERT keeps its FFN as two modules
    "norms": ["LayerNorm"],
}
_DECODER_POSITIONS = {
    "out": ["self_attn.out_proj", "fc2"],
    "kv": ["self_attn.k_proj", "self_attn.v_proj"],
    "down": ["fc2"],
    "blocks": ["self_attn", "fc1->fc2"],  # a span: the FFN is fc1, activation, fc2 in the layer
    "norms": ["self_attn_layer_norm", "final_layer_norm"],
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("bert", _bert, _BERT_POSITIONS, _ids),
        Family("roberta", _roberta, _BERT_POSITIONS, _ids),
        Family("gpt2", _gpt2, {"out": ["attn.c_proj", "mlp.c_proj"], "kv": ["attn.c_attn"], "down": ["mlp.c_proj"],
                               "blocks": ["attn", "mlp"], "norms": ["ln_1", "ln_2"]}, _ids),
        Family("t5", _t5, {"out": ["SelfAttention.o", "DenseReluDense.wo"], "kv": ["SelfAttention.k", "SelfAttention.v"],
                           "down": ["DenseReluDense.wo"], "blocks": ["SelfAttention", "DenseReluDense"],
                           "norms": ["layer_norm"]}, _seq2seq),
        Family("bart", _bart, _DECODER_POSITIONS, _seq2seq),
        Family("opt", _opt, _DECODER_POSITIONS, _ids),
        Family("llama", _llama, {"out": ["o_proj", "down_proj"], "kv": ["k_proj", "v_proj"], "down": ["down_proj"],
                                 "blocks": ["self_attn", "mlp"], "norms": ["input_layernorm", "post_attention_layernorm"]},
               _ids),
        Family("vit", _vit, {"out": ["o_proj", "fc2"], "kv": ["k_proj", "v_proj"], "down": ["fc2"],
                             "blocks": ["attention", "mlp"], "norms": ["layernorm_before", "layernorm_after"]}, _pixels),
        Family("plain", PlainModel, {"out": ["proj", "mlp.2"], "kv": ["mlp.0"], "down": ["mlp.2"],
                                     "blocks": [r"[r]blocks\.\d+"], "norms": ["norm"]}, _plain_inputs, plain=True),
    ]
}


@functools.cache
def _pristine(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name].build().eval()


def fresh(name: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A new copy of the family's tiny model: same weights every time."""
    model = copy.deepcopy(_pristine(name))
    return model if dtype is None else model.to(dtype)


def hidden(model: nn.Module, family: Family, **inputs: Any) -> torch.Tensor:
    """The model's main output tensor on the family's fixed inputs."""
    out = model(**(family.inputs() | inputs))
    return out if isinstance(out, torch.Tensor) else out[0]
