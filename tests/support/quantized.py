"""A tiny LLaMA saved once and loaded through transformers' BitsAndBytesConfig (4-bit NF4 or 8-bit), on CPU."""

from __future__ import annotations

import torch
from torch import nn

IDS = torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 4]])


def save_tiny_llama(path) -> str:
    """Write a hidden-64, 2-layer LLaMA (weights fixed by seed 0) to `path`; returns it as a string."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def load_quantized(path: str, bits: int, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model at `path` in 4-bit NF4 (`compute_dtype`) or 8-bit, on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
        if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()
