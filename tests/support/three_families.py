"""Tiny LLaMA, GPT-2 and BERT (tests/support/families.py) with fixed token ids, for the per-method tests of
OFT, AdaLoRA, LoRA+ and trainable tokens: their outputs, PEFT round trips and mixed batches."""

from __future__ import annotations

import torch
from support.families import fresh
from support.numerics import float32_noise
from torch import nn

#: the three families every such test runs on, and linear layers on each (GPT-2's are Conv1D)
FAMILIES = ("llama", "gpt2", "bert")
LINEARS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "output.dense"]}
IDS = torch.randint(1, 99, (4, 7), generator=torch.Generator().manual_seed(3))


def out(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """The model's main output (logits, or BERT's last hidden state) on `ids`, without gradient."""
    with torch.no_grad():
        result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result[0]


def noise(model: nn.Module) -> float:
    """The bare model's float32 rounding on IDS (see support.numerics): the scale of a PEFT round trip's tolerance."""
    return float32_noise(model, lambda m, _: out(m))


def perturb_trainable(model: nn.Module, seed: int = 5, std: float = 0.3) -> None:
    """Random non-zero values in every trainable tensor of a PEFT model (its adapter), so the adapter changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


__all__ = ["FAMILIES", "IDS", "LINEARS", "fresh", "noise", "out", "perturb_trainable"]
