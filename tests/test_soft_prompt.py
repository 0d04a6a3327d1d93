"""SoftPromptModel: learned embeddings in front of the input, with everything along the sequence following."""

from __future__ import annotations

import json

import pytest
import torch
from support.numerics import assert_changed, assert_within_noise, random_direction
from support.prompt_cases import DECODERS, GENERATORS, NAMES, build, padded_pair, padding_noise, position_ids, run, token_ids
from torch import nn

from opendelta import LoraModel, PrefixModel, SoftPromptModel
from opendelta.errors import DeltaConfigError, UnsupportedModuleError

N = 4


def prompted(name: str, **args) -> tuple[nn.Module, SoftPromptModel]:
    model = build(name)
    return model, SoftPromptModel(model, **{"soft_token_num": N, **args})


def encoder_decoder(name: str) -> bool:
    return name in ("T5", "BART")


@pytest.mark.parametrize("name", NAMES)
def test_the_prompt_is_prepended_to_the_sequence(name):
    model, delta = prompted(name)
    out = run(model, token_ids())
    assert out.shape[1] == (4 if encoder_decoder(name) else 7 + N)
    hosts = ["encoder", "decoder"] if encoder_decoder(name) else [""]
    assert [p.split(".")[-1] for p in delta.layers] == hosts


@pytest.mark.parametrize("name", NAMES)
def test_token_init_copies_vocabulary_embeddings(name):
    model, delta = prompted(name)
    prompt = next(iter(delta.layers.values())).soft_embeds
    table = model.get_input_embeddings()
    rows = table(torch.arange(table.weight.shape[0]))
    assert all(any(torch.equal(row, r) for r in rows) for row in prompt)


def test_without_token_init_the_prompt_is_uniform_in_the_init_range():
    model, delta = prompted("BERT", token_init=False, init_range=0.1)
    prompt = delta.layers[""].soft_embeds
    assert prompt.shape == (N, 32) and prompt.abs().max() <= 0.1


@pytest.mark.parametrize("name", NAMES)
def test_perturbing_the_prompt_changes_the_output(name):
    model, delta = prompted(name)
    ids = token_ids()
    before = run(model, ids)
    with torch.no_grad():
        prompt = next(iter(delta.layers.values())).soft_embeds
        prompt.add_(random_direction(prompt))
    assert_changed(run(model, ids), before)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_prompt_and_nothing_else(name):
    model, delta = prompted(name)
    delta.freeze_module(exclude=["deltas"])
    run(model, token_ids()).pow(2).mean().backward()
    prompt = next(iter(delta.layers.values())).soft_embeds
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p is prompt
    ]
    assert all(p.grad is None for p in model.parameters() if p is not prompt)


@pytest.mark.parametrize("name", NAMES)
def test_detach_restores_exactly_and_reattach_reproduces(name):
    model = build(name)
    ids = token_ids()
    original = run(model, ids)
    delta = SoftPromptModel(model, soft_token_num=N)
    tuned = run(model, ids)
    delta.detach()
    assert torch.equal(run(model, ids), original)
    assert not any(isinstance(m, nn.Module) and getattr(m, "is_delta_module", False) for m in model.modules())
    delta.attach()
    assert torch.equal(run(model, ids), tuned)


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_on_a_fresh_backbone_reproduces(name, tmp_path):
    model, delta = prompted(name)
    ids = token_ids()
    tuned = run(model, ids)
    delta.save_finetuned(tmp_path / "ckpt")
    fresh = build(name)
    SoftPromptModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert torch.equal(run(fresh, ids), tuned)


def test_checkpoint_keys_of_a_prompt_on_the_root_module_have_no_empty_path(tmp_path):
    from safetensors.torch import load_file

    model, delta = prompted(NAMES[0])
    assert "" in delta.layers  # the prompt acts on the whole model
    delta.save_finetuned(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "delta_config.json").read_text())
    weights = tmp_path / "ckpt" / meta["weights"]["file"]
    keys = sorted(load_file(weights))
    assert keys and all(k.startswith("delta.") and ".." not in k for k in keys)
    fresh = build(NAMES[0])
    SoftPromptModel.from_finetuned(tmp_path / "ckpt", fresh)
    ids = token_ids()
    assert torch.equal(run(fresh, ids), run(model, ids))


@pytest.mark.parametrize("name", NAMES)
def test_a_row_does_not_depend_on_how_the_batch_is_padded(name):
    model = build(name)
    ids = token_ids()
    noise = padding_noise(model, name, ids)
    SoftPromptModel(model, soft_token_num=N)
    mask, real, alone_ids, alone_real = padded_pair(name, ids)
    extra = {"position_ids": position_ids(mask)} if real.start else {}
    batch = run(model, ids, mask, **extra)
    alone = run(model, alone_ids)
    shift = 0 if encoder_decoder(name) else N  # outputs hold the prompt positions first
    batch_real = slice(real.start + shift, real.stop + shift)
    alone_real = slice(alone_real.start + shift, alone_real.stop + shift)
    assert_within_noise(batch[0, batch_real], alone[0, alone_real], *noise)


@pytest.mark.parametrize("name", NAMES)
def test_padded_positions_stay_masked(name):
    model, _ = prompted(name)
    ids = token_ids()
    mask, real, _, _ = padded_pair(name, ids)
    extra = {"position_ids": position_ids(mask)} if real.start else {}
    other = ids.clone()
    other[0][mask[0] == 0] = 5
    shift = 0 if encoder_decoder(name) else N
    rows = slice(real.start + shift, real.stop + shift)
    torch.testing.assert_close(run(model, ids, mask, **extra)[0, rows], run(model, other, mask, **extra)[0, rows])


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_causal_lm_labels_get_minus_100_for_the_prompt(name):
    model, _ = prompted(name)
    ids = token_ids()
    out = model(input_ids=ids, labels=ids)
    # the last prompt position predicts the first token; prompt positions themselves are never targets
    expected = nn.functional.cross_entropy(out.logits[:, N - 1 : -1].reshape(-1, 99), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_token_type_ids_get_zeros_for_the_prompt():
    model, _ = prompted("BERT")
    ids = token_ids()
    types = torch.ones_like(ids)
    with_types = model(input_ids=ids, token_type_ids=types).last_hidden_state
    assert with_types.shape == (2, 7 + N, 32)
    assert_changed(with_types, model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("name", GENERATORS)
def test_generate_gives_the_same_tokens_with_and_without_the_kv_cache(name):
    model, _ = prompted(name)
    ids = token_ids()
    mask, _, _, _ = padded_pair(name, ids)
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
    recomputed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_the_prompt_enters_the_cache_once():
    model, _ = prompted("LLaMA")
    out = model(input_ids=token_ids(length=5), use_cache=True)
    assert out.cache.get_seq_length() == 5 + N
    step = model(input_ids=token_ids(length=1), cache=out.cache, attention_mask=torch.ones(2, 6, dtype=torch.long))
    assert step.logits.shape[1] == 1 and step.cache.get_seq_length() == 6 + N


def test_a_module_that_is_no_embedding_is_refused():
    model = build("BERT")
    with pytest.raises(UnsupportedModuleError, match="attention.self.query.*Linear"):
        SoftPromptModel(model, modified_modules=["encoder.layer.0.attention.self.query"])


def test_a_model_without_input_embeddings_says_so():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedModuleError, match="token embedding"):
        SoftPromptModel(model, soft_token_num=N)


@pytest.mark.parametrize("bad", [{"soft_token_num": 0}, {"init_range": 0}, {"token_init": 1}])
def test_bad_arguments_are_config_errors(bad):
    with pytest.raises(DeltaConfigError):
        SoftPromptModel(build("BERT"), **bad)


@pytest.mark.parametrize("policy", ["float32", "weight"])
def test_the_prompt_takes_the_policy_dtype_and_the_output_the_backbone_dtype(policy):
    model = build("GPT-2").to(torch.bfloat16)
    delta = SoftPromptModel(model, soft_token_num=N, delta_dtype=policy)
    assert delta.layers[""].soft_embeds.dtype == (torch.float32 if policy == "float32" else torch.bfloat16)
    assert run(model, token_ids()).dtype == torch.bfloat16


def test_soft_prompt_prefix_and_lora_on_one_backbone_detach_alone():
    model = build("GPT-2")
    ids = token_ids()
    original = run(model, ids)
    prompt = SoftPromptModel(model, soft_token_num=N)
    prefix = PrefixModel(model, prefix_token_num=3, embed_dim=16, mid_dim=16)
    lora = LoraModel(model, modified_modules=["c_attn"])
    cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False))
    prompt.detach()
    assert run(model, ids).shape[1] == 7
    prefix.detach()
    lora.detach()
    assert torch.equal(run(model, ids), original)


@pytest.mark.real
def test_real_minilm_soft_prompt_training_lowers_the_loss():
    from support.real_minilm import minilm_and_batch, train_steps

    model, batch, labels = minilm_and_batch()
    delta = SoftPromptModel(model, soft_token_num=20)
    delta.freeze_module(exclude=["deltas"])
    # 16 steps: over 10 prompt initialisations the loss ratio was 0.14-0.36 after 16 steps, but 0.63-0.81
    # after 8, where a random initialisation (the per-test seed) sat at the 0.8 bound
    losses = train_steps(model, delta.delta_parameters(), batch, labels, lr=3e-2, steps=16)
    assert losses[-1] < 0.8 * losses[0]
