"""Trainable tokens: only the chosen embedding rows train and are saved; tied heads see them; exact detach and
merge/unmerge; PEFT's TRAINABLE_TOKENS format both ways (mixed batches: tests/test_multitask.py)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.numerics import assert_changed, assert_within_noise
from support.three_families import FAMILIES, IDS, fresh, noise, out, perturb_trainable

from opendelta import (
    AutoDeltaModel,
    DeltaConfigError,
    LoraModel,
    MergeError,
    TrainableTokensModel,
    UnsupportedModuleError,
)

#: three token ids that occur in IDS, and one that does not
TOKENS = sorted(set(IDS.flatten().tolist()))[:3] + [min(set(range(1, 99)) - set(IDS.flatten().tolist()))]
EMBEDDING = {"llama": "model.embed_tokens", "gpt2": "transformer.wte", "bert": "embeddings.word_embeddings"}


def tokens(model, **kwargs) -> TrainableTokensModel:
    return TrainableTokensModel(model, token_indices=TOKENS, **kwargs)


def train_rows(delta: TrainableTokensModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_delta_changes_nothing_and_detach_restores_bit_for_bit(family):
    model = fresh(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    original = out(model)
    delta = tokens(model)
    assert torch.equal(out(model), original)
    train_rows(delta)
    assert_changed(out(model), original)
    delta.detach()
    assert torch.equal(out(model), original)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_chosen_rows_get_gradients(family):
    model = fresh(family).train()
    delta = tokens(model)
    delta.freeze_module()
    model(input_ids=IDS)[0].float().pow(2).sum().backward()
    (rows,) = delta.delta_parameters()
    assert rows.shape == (len(TOKENS), 32)
    assert rows.grad[:-1].abs().sum(1).gt(0).all()
    # the last token is not in the batch: only a head tied to the embedding (GPT-2's) gives its row a gradient
    tied = len(delta.layers) > 1
    assert bool(rows.grad[-1].any()) == tied
    assert all(p.grad is None for p in model.parameters() if p is not rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_rows_are_saved_and_reload_exactly(family, tmp_path):
    model = fresh(family)
    delta = tokens(model)
    train_rows(delta)
    tuned = out(model)
    delta.save_finetuned(tmp_path)
    (saved,) = [f for f in tmp_path.iterdir() if f.suffix == ".safetensors"]
    assert [tuple(t.shape) for t in load_file(saved).values()] == [(len(TOKENS), 32)]
    other = fresh(family)
    AutoDeltaModel.from_finetuned(tmp_path, backbone_model=other)
    assert torch.equal(out(other), tuned)


def test_a_tied_lm_head_sees_the_trained_rows():
    model = fresh("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    delta = tokens(model)
    assert set(delta.layers) == {"transformer.wte", "lm_head"}
    train_rows(delta)
    (rows,) = delta.delta_parameters()
    hidden = model.transformer(input_ids=IDS)[0].detach()
    with torch.no_grad():
        logits = model.lm_head(hidden)
        expected = hidden @ model.transformer.wte.weight.index_copy(0, torch.tensor(TOKENS), rows).T
    assert_within_noise(logits, expected, noise(model))
    with pytest.raises(MergeError, match="tied"):
        delta.merge()


def test_merge_writes_the_rows_and_unmerge_restores_the_embedding_bit_for_bit():
    model = fresh("llama")
    before = model.model.embed_tokens.weight.clone()
    delta = tokens(model)
    train_rows(delta)
    tuned = out(model)
    delta.merge()
    assert torch.equal(out(model), tuned)
    delta.unmerge()
    assert torch.equal(model.model.embed_tokens.weight, before) and torch.equal(out(model), tuned)



@pytest.mark.parametrize("family", FAMILIES)
def test_peft_format_both_ways_gives_equal_outputs(family, tmp_path):
    model = fresh(family)
    delta = tokens(model)
    train_rows(delta)
    expected = out(model)
    delta.save_finetuned(tmp_path / "ours", format="peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == TOKENS
    assert_within_noise(out(peft.PeftModel.from_pretrained(fresh(family), tmp_path / "ours")), expected, noise(model))

    made = peft.get_peft_model(fresh(family), peft.TrainableTokensConfig(token_indices=TOKENS, target_modules=[EMBEDDING[family]]))
    perturb_trainable(made)
    want = out(made.eval())
    made.save_pretrained(tmp_path / "theirs")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "theirs", backbone_model=fresh(family))
    assert isinstance(loaded, TrainableTokensModel)
    assert_within_noise(out(loaded.backbone_model), want, noise(model))
    assert_changed(want, out(fresh(family)))


@pytest.mark.parametrize(
    "args, error, match",
    [
        ({}, DeltaConfigError, "needs token_indices"),
        ({"token_indices": [3, 3]}, DeltaConfigError, "repeats"),
        ({"token_indices": [500]}, DeltaConfigError, "beyond"),
        ({"token_indices": [1], "modified_modules": ["q_proj"]}, UnsupportedModuleError, "nn.Embedding"),
    ],
)
def test_bad_inputs_are_typed_errors_and_leave_the_model_unchanged(args, error, match):
    model = fresh("llama")
    original = out(model)
    with pytest.raises(error, match=match):
        TrainableTokensModel(model, **args)
    assert torch.equal(out(model), original)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------- LoRA's trainable_token_indices (PEFT's LoRA option)

LORA_PLACES = {"llama": ["q_proj"], "gpt2": ["c_attn"]}


@pytest.mark.parametrize("family", LORA_PLACES)
def test_lora_with_trainable_token_indices_crosses_to_peft_and_back(family, tmp_path):
    """One LoRA delta trains the factors and the rows (and a tied GPT-2 head follows them), saved as PEFT's LoRA
    with trainable_token_indices, and such a PEFT folder loads into one LoRA delta; detach and reload are exact."""
    model = fresh(family)
    bare = out(model)
    delta = LoraModel(model, modified_modules=LORA_PLACES[family], lora_r=2, lora_alpha=4, trainable_token_indices=TOKENS)
    assert torch.equal(out(model), bare)  # the rows start as the embedding's, B at zero
    train_rows(delta)
    expected = out(model)
    delta.save_finetuned(tmp_path / "own")
    again = fresh(family)
    AutoDeltaModel.from_finetuned(tmp_path / "own", again)
    assert torch.equal(out(again), expected)
    delta.save_finetuned(tmp_path / "ours", format="peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == TOKENS
    assert_within_noise(out(peft.PeftModel.from_pretrained(fresh(family), tmp_path / "ours")), expected, noise(model))
    delta.detach()
    assert torch.equal(out(model), bare)

    made = peft.get_peft_model(
        fresh(family), peft.LoraConfig(r=2, lora_alpha=4, target_modules=LORA_PLACES[family], trainable_token_indices=TOKENS)
    )
    perturb_trainable(made)
    want = out(made.eval())
    made.save_pretrained(tmp_path / "theirs")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "theirs", backbone_model=fresh(family))
    assert isinstance(loaded, LoraModel) and loaded.config.trainable_token_indices == TOKENS
    assert_within_noise(out(loaded.backbone_model), want, noise(model))
    assert_changed(want, out(fresh(family)))


def test_lora_on_the_embedding_and_its_trainable_tokens_is_refused():
    model = fresh("llama")
    with pytest.raises(UnsupportedModuleError, match="trainable_token_indices"):
        LoraModel(model, modified_modules=["embed_tokens", "q_proj"], trainable_token_indices=[1])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
