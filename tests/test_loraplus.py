"""LoRA+: create_loraplus_optimizer groups parameters exactly as PEFT's helper does, at the same learning rates."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from support.three_families import LINEARS, fresh

from opendelta import DeltaConfigError, LoraModel, create_loraplus_optimizer

LR, RATIO = 1e-3, 16.0


def canonical(name: str) -> str:
    """One spelling for a parameter of PEFT's model and of ours: the module path and the tensor's role."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.modules_to_save\.default", "", name)
    name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name)
    name = re.sub(r"\.(lora_embedding_[AB])\.default$", r".\1", name)
    name = name.replace(".lora_magnitude_vector.default.weight", ".magnitude")
    return name.replace(".lora.lora_", ".lora_").replace(".lora.magnitude", ".magnitude")


def groups_by_lr(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[tuple[float, float, list[str]]]:
    return [(g["lr"], g["weight_decay"], sorted(canonical(names[id(p)]) for p in g["params"])) for g in optimizer.param_groups]


@pytest.mark.parametrize("family, use_dora", [("bert", False), ("gpt2", True), ("llama", True)])
def test_groups_and_learning_rates_equal_pefts_on_the_same_model(family, use_dora):
    heads = {"bert": ["pooler.dense", "embeddings.LayerNorm"], "gpt2": ["ln_f"], "llama": ["model.norm"]}[family]
    theirs = peft.get_peft_model(
        fresh(family), peft.LoraConfig(target_modules=LINEARS[family], use_dora=use_dora, modules_to_save=heads, r=4)
    )
    model = fresh(family)
    delta = LoraModel(model, modified_modules=LINEARS[family], use_dora=use_dora, lora_r=4)
    delta.freeze_module(exclude=["deltas", *heads])
    kwargs = {"lr": LR, "loraplus_lr_ratio": RATIO, "loraplus_weight_decay": 0.01}
    want = groups_by_lr(peft_loraplus(theirs, torch.optim.AdamW, **kwargs), {id(p): n for n, p in theirs.named_parameters()})
    got = groups_by_lr(create_loraplus_optimizer(delta, torch.optim.AdamW, **kwargs), {id(p): n for n, p in model.named_parameters()})
    assert got == want
    assert got[2][0] == LR * RATIO and got[2][2]  # the B factors learn ratio times faster


def test_lora_on_the_embeddings_goes_to_the_embedding_group_as_in_peft():
    targets = ["q_proj", "embed_tokens"]
    theirs = peft.get_peft_model(fresh("llama"), peft.LoraConfig(target_modules=targets, r=4))
    model = fresh("llama")
    LoraModel(model, modified_modules=targets, lora_r=4).freeze_module()
    kwargs = {"lr": LR, "loraplus_lr_ratio": RATIO, "loraplus_lr_embedding": 1e-5}
    want = groups_by_lr(peft_loraplus(theirs, torch.optim.SGD, **kwargs), {id(p): n for n, p in theirs.named_parameters()})
    got = groups_by_lr(create_loraplus_optimizer(model, torch.optim.SGD, **kwargs), {id(p): n for n, p in model.named_parameters()})
    assert got == want and got[1][0] == 1e-5 and len(got[1][2]) == 2


def test_a_plain_model_with_a_delta_attached_gives_the_same_groups():
    model = fresh("llama")
    delta = LoraModel(model, modified_modules=["q_proj"])
    delta.freeze_module()
    from_delta = create_loraplus_optimizer(delta, torch.optim.SGD, lr=LR, loraplus_lr_ratio=RATIO)
    from_model = create_loraplus_optimizer(model, torch.optim.SGD, lr=LR, loraplus_lr_ratio=RATIO)
    assert [[id(p) for p in g["params"]] for g in from_delta.param_groups] == [[id(p) for p in g["params"]] for g in from_model.param_groups]


@pytest.mark.parametrize("bad", [{"lr": 0}, {"loraplus_lr_ratio": float("nan")}, {"loraplus_weight_decay": -1.0}])
def test_bad_rates_are_config_errors(bad):
    delta = LoraModel(fresh("llama"), modified_modules=["q_proj"])
    with pytest.raises(DeltaConfigError):
        create_loraplus_optimizer(delta, torch.optim.SGD, **{"lr": LR, "loraplus_lr_ratio": RATIO, **bad})


def test_nothing_trainable_is_a_config_error():
    model = fresh("llama").requires_grad_(False)
    with pytest.raises(DeltaConfigError, match="no trainable"):
        create_loraplus_optimizer(model, torch.optim.SGD, lr=LR, loraplus_lr_ratio=RATIO)
