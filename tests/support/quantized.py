"""A tiny LLaMA saved once and loaded through transformers' BitsAndBytesConfig (4-bit NF4 or 8-bit), on CPU,
and the dense reference every quantized-backbone test trains against."""

from __future__ import annotations

import torch
from torch import nn

from opendelta.quantized import dequantized_weight, is_quantized

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


def dequantized_into(dense: nn.Module, quantized: nn.Module) -> nn.Module:
    """`dense` (an unquantized copy of `quantized`'s architecture) with each layer that is quantized in
    `quantized` replaced by an nn.Linear holding its dequantized weight; returns `dense`."""
    for name, module in list(quantized.named_modules()):
        if is_quantized(module):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dequantized_weight(module))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, linear)
    return dense
