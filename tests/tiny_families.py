"""Tiny models of every family opendelta maps, built from configs (no downloads).

One entry per family: the transformers ``model_type``, the model class to build, and the config
values that make it tiny (hidden 32, 2 layers, 4 heads, vocab 99). Shared by the family sweep,
the structure tests and ``scripts/coverage_table.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# the usual size knobs, set only where a config has the attribute
SIZES: dict[str, Any] = dict(
    vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
    n_embd=32, n_layer=2, n_head=4, n_positions=64, ffn_dim=64, word_embed_proj_dim=32,
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64,
    image_size=32, patch_size=8,
)


@dataclass(frozen=True)
class Family:
    name: str  #: display name in the coverage table
    model_type: str
    model_class: str  #: a class of the transformers package
    overrides: dict[str, Any] = field(default_factory=dict)
    sizes: bool = True  #: apply SIZES where the config has the attribute

    def config(self):
        from transformers import AutoConfig

        config = AutoConfig.for_model(self.model_type)
        if self.sizes:
            for key, value in SIZES.items():
                if hasattr(config, key):
                    setattr(config, key, value)
        for key, value in self.overrides.items():
            setattr(config, key, value)
        return config

    def build(self, seed: int = 0) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        return getattr(transformers, self.model_class)(self.config()).eval()


FAMILIES: list[Family] = [
    Family("BERT", "bert", "BertModel"),
    Family("RoBERTa", "roberta", "RobertaForMaskedLM"),
    Family("GPT-2", "gpt2", "GPT2LMHeadModel"),
    Family("T5", "t5", "T5ForConditionalGeneration"),
    Family("BART", "bart", "BartForConditionalGeneration"),
    Family("OPT", "opt", "OPTForCausalLM"),
    Family("LLaMA", "llama", "LlamaForCausalLM"),
    Family("ViT", "vit", "ViTForImageClassification", {"num_labels": 3}),
]

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
