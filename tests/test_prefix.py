"""PrefixModel: key/value prefixes on every supported family, through the cache view and mask extension."""

from __future__ import annotations

import pytest
import torch
from support.numerics import assert_changed, assert_within_noise, float32_noise, random_direction
from support.prompt_cases import PREFIX_GENERATORS, PREFIX_NAMES, build, padded_pair, padding_noise, position_ids, run, token_ids

from opendelta import LoraModel, PrefixModel
from opendelta.errors import DeltaConfigError, RuntimeInitError, UnsupportedModuleError
from opendelta.structure import resolve_roles

SMALL = dict(prefix_token_num=3, embed_dim=16, mid_dim=16)


def prefixed(name: str, attn: str = "sdpa", **args) -> tuple[torch.nn.Module, PrefixModel]:
    model = build(name, attn)
    return model, PrefixModel(model, **{**SMALL, **args})


@pytest.mark.parametrize("name", PREFIX_NAMES)
def test_default_positions_are_the_self_attention_blocks(name):
    model, delta = prefixed(name)
    assert list(delta.layers) == resolve_roles(model, ["attn"])


@pytest.mark.parametrize("name", PREFIX_NAMES)
def test_perturbing_the_prefix_changes_the_output(name):
    model, delta = prefixed(name)
    ids = token_ids()
    before = run(model, ids)
    with torch.no_grad():
        embedding = next(iter(delta.layers.values())).prefix_embedding
        embedding.add_(random_direction(embedding))
    assert_changed(run(model, ids), before)


@pytest.mark.parametrize("name", PREFIX_NAMES)
def test_gradients_reach_every_prefix_parameter_and_nothing_else(name):
    model, delta = prefixed(name)
    delta.freeze_module(exclude=["deltas"])
    run(model, token_ids()).float().pow(2).mean().backward()
    delta_ids = {id(p) for p in delta.delta_parameters()}
    for pname, param in model.named_parameters():
        if id(param) in delta_ids:
            assert param.grad is not None and param.grad.abs().sum() > 0, pname
        else:
            assert not param.requires_grad and param.grad is None, pname


def module_state(model: torch.nn.Module) -> dict:
    """Every module's hooks and the identity of every object in its __dict__ (its config included)."""
    return {
        p: (dict(m._forward_pre_hooks), dict(m._forward_hooks), {k: id(v) for k, v in vars(m).items()})
        for p, m in model.named_modules()
    }


@pytest.mark.parametrize("name", PREFIX_NAMES)
def test_detach_restores_the_backbone_exactly(name):
    model = build(name)
    ids = token_ids()
    original = run(model, ids)
    state = module_state(model)
    PrefixModel(model, **SMALL).detach()
    assert torch.equal(run(model, ids), original)
    assert module_state(model) == state


@pytest.mark.parametrize("name", PREFIX_NAMES)
def test_reattach_reproduces_the_tuned_output(name):
    model, delta = prefixed(name)
    ids = token_ids()
    tuned = run(model, ids)
    delta.detach()
    delta.attach()
    assert torch.equal(run(model, ids), tuned)


@pytest.mark.parametrize("name", PREFIX_NAMES)
def test_save_then_load_on_a_fresh_backbone_reproduces(name, tmp_path):
    model, delta = prefixed(name)
    ids = token_ids()
    tuned = run(model, ids)
    delta.save_finetuned(tmp_path / "ckpt")
    fresh = build(name)
    loaded = PrefixModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert list(loaded.layers) == list(delta.layers)
    assert torch.equal(run(fresh, ids), tuned)


#: GPT-Neo's local layers window the prefix with the keys (see test_gpt_neo_local_layers_...): its global layers only
PADDING_CASES = [pytest.param(n, {}, id=n) for n in PREFIX_NAMES if n != "GPT-Neo"] + [
    pytest.param("GPT-Neo", {"attention_layers": ["global", "global"]}, id="GPT-Neo-global")
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name,overrides", PADDING_CASES)
def test_a_row_does_not_depend_on_how_the_batch_is_padded(name, overrides, attn):
    model = build(name, attn, **overrides)
    ids = token_ids()
    noise = padding_noise(model, name, ids)
    PrefixModel(model, **SMALL)
    mask, real, alone_ids, alone_real = padded_pair(name, ids)
    extra = {"position_ids": position_ids(mask)} if real.start else {}
    batch = run(model, ids, mask, **extra)
    alone = run(model, alone_ids)
    assert_within_noise(batch[0, real], alone[0, alone_real], *noise)


@pytest.mark.parametrize("name", PREFIX_NAMES)
def test_padded_positions_stay_masked(name):
    model, _ = prefixed(name)
    ids = token_ids()
    mask, real, _, _ = padded_pair(name, ids)
    extra = {"position_ids": position_ids(mask)} if real.start else {}
    other = ids.clone()
    other[0][mask[0] == 0] = 5  # different tokens where the row is padded
    torch.testing.assert_close(run(model, ids, mask, **extra)[0, real], run(model, other, mask, **extra)[0, real])


@pytest.mark.parametrize("name", PREFIX_GENERATORS)
def test_generate_gives_the_same_tokens_with_and_without_the_kv_cache(name):
    model, _ = prefixed(name)
    ids = token_ids()
    mask, _, _, _ = padded_pair(name, ids)
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
    recomputed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("name", [n for n in PREFIX_NAMES if n not in ("GPT-Neo", "BLOOM")])  # those two: eager only
def test_sdpa_and_eager_give_the_same_prefixed_output(name):
    ids = token_ids()
    mask, _, _, _ = padded_pair(name, ids)
    sdpa, _ = prefixed(name, "sdpa")
    eager, _ = prefixed(name, "eager")
    # how far rounding moves the eager path from its float64 result here bounds what ordering may change
    noise = float32_noise(eager, lambda m, _: run(m, ids, mask))
    assert_within_noise(run(sdpa, ids, mask), run(eager, ids, mask), noise)


@pytest.mark.parametrize("name", ["DistilBERT", "ALBERT", "ModernBERT"])
def test_attentions_without_a_cache_use_the_prefix_attention_function_only_while_attached(name):
    model = build(name)
    configs = {p: m.config for p, m in model.named_modules() if "config" in vars(m)}
    delta = PrefixModel(model, **SMALL)
    for path in delta.layers:
        assert model.get_submodule(path).config._attn_implementation == "opendelta_prefix"
    assert model.config._attn_implementation == "sdpa"  # the model's own config is never touched
    delta.detach()
    assert all(model.get_submodule(p).config is c for p, c in configs.items())


def test_two_prefixes_on_an_attention_without_a_cache_stack_switch_and_detach_alone():
    model = build("DistilBERT")
    ids = token_ids()
    original, state = run(model, ids), module_state(model)
    first = PrefixModel(model, **SMALL)
    one = run(model, ids)
    second = PrefixModel(model, **SMALL)
    both = run(model, ids)
    assert_changed(both, one)
    first.detach()
    alone = run(model, ids)
    second.switch(first)  # the same modules: the prefix attention stays in place between the two
    assert torch.equal(run(model, ids), one)
    first.switch(second)
    assert torch.equal(run(model, ids), alone)
    second.detach()
    assert torch.equal(run(model, ids), original)
    assert module_state(model) == state


def test_a_deep_copy_of_a_prefixed_encoder_without_a_cache_computes_the_same_on_its_own_config():
    import copy

    model = build("DistilBERT")
    PrefixModel(model, **SMALL)
    ids = token_ids()
    twin = copy.deepcopy(model)
    assert torch.equal(run(twin, ids), run(model, ids))
    assert twin.transformer.layer[0].attention.config.real_config is twin.config


def test_gpt_neo_local_layers_window_the_prefix_as_the_nearest_past_keys():
    # a local layer masks keys further back than window_size with its own buffer, which counts the prefix
    # among the keys: so, as with a prefix in past_key_values, only the first window_size - 1 positions see it
    model = build("GPT-Neo", attention_layers=["local"], num_layers=1, window_size=4)
    delta = PrefixModel(model, **SMALL)
    ids = token_ids()
    before = run(model, ids)
    with torch.no_grad():
        embedding = next(iter(delta.layers.values())).prefix_embedding
        embedding.add_(random_direction(embedding))
    after = run(model, ids)
    assert [torch.equal(before[:, t], after[:, t]) for t in range(7)] == [False] * 3 + [True] * 4


@pytest.mark.parametrize(
    "overrides",
    [{"alibi": True}, {"new_decoder_architecture": True, "num_kv_heads": 2}, {"multi_query": True}],
    ids=["alibi", "new-decoder-architecture", "multi-query"],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_falcon_variants_keep_padding_invariance_and_cached_generation(overrides, attn):
    model = build("Falcon", attn, **overrides)
    ids = token_ids()
    noise = padding_noise(model, "Falcon", ids)
    PrefixModel(model, **SMALL)
    mask, real, alone_ids, alone_real = padded_pair("Falcon", ids)
    batch = run(model, ids, mask, position_ids=position_ids(mask))
    assert_within_noise(batch[0, real], run(model, alone_ids)[0, alone_real], *noise)
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(**settings, use_cache=True), model.generate(**settings, use_cache=False))


def test_a_failed_attach_leaves_the_attention_configs_as_they_were():
    model = build("DistilBERT")
    configs = {p: m.config for p, m in model.named_modules() if "config" in vars(m)}
    with pytest.raises(RuntimeInitError):
        PrefixModel(model, dummy_inputs={"input_ids": torch.full((1, 99), 5)}, **SMALL)  # longer than the positions
    assert all(model.get_submodule(p).config is c for p, c in configs.items())


@pytest.mark.parametrize("name", ["DeBERTa", "DeBERTa-v2", "MPNet"])
def test_relative_position_attentions_are_refused_with_why(name):
    model = build(name)
    with pytest.raises(UnsupportedModuleError, match="relative-position attention"):
        PrefixModel(model, **SMALL)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_the_cache_never_holds_the_prefix():
    model, _ = prefixed("LLaMA")
    out = model(input_ids=token_ids(length=5), use_cache=True)
    assert out.cache.get_seq_length() == 5


def test_prefix_keys_take_the_kv_head_count_under_grouped_query_attention():
    model, delta = prefixed("LLaMA")
    layer = next(iter(delta.layers.values()))
    assert (layer.kv_heads, layer.head_dim) == (model.config.num_key_value_heads, model.config.head_dim)
    assert layer().shape == (3, 2 * model.config.num_key_value_heads * model.config.head_dim)


def test_direct_parameters_without_reparameterization():
    model, delta = prefixed("GPT-2", reparameterize=False)
    layer = next(iter(delta.layers.values()))
    assert [n for n, _ in layer.named_parameters()] == ["prefix"]
    assert layer.prefix.shape == (3, 2 * model.config.n_embd)
    ids = token_ids()
    before = run(model, ids)
    with torch.no_grad():
        layer.prefix.add_(random_direction(layer.prefix))
    assert_changed(run(model, ids), before)


def test_partial_layers_leave_the_others_untouched():
    model = build("BERT")
    delta = PrefixModel(model, modified_modules=["layer.1.attention"], **SMALL)
    assert list(delta.layers) == ["encoder.layer.1.attention"]
    assert run(model, token_ids()).shape == (2, 7, 32)


def test_a_non_attention_module_is_refused_with_what_prefix_needs():
    model = build("BERT")
    with pytest.raises(UnsupportedModuleError, match=r"KV cache.*attention.self.query.*Linear"):
        PrefixModel(model, modified_modules=["attention.self.query"], **SMALL)
    assert not any(n for n, _ in model.named_modules() if n.endswith("prefix"))


def test_cross_attention_is_refused():
    model = build("T5")
    with pytest.raises(UnsupportedModuleError, match="cross-attention"):
        PrefixModel(model, modified_modules=["EncDecAttention"], **SMALL)


@pytest.mark.parametrize("bad", [{"prefix_token_num": 0}, {"mid_dim": -1}, {"embed_dim": 1.5}, {"reparameterize": "yes"}])
def test_bad_arguments_are_config_errors(bad):
    with pytest.raises(DeltaConfigError):
        PrefixModel(build("BERT"), **bad)


@pytest.mark.parametrize("policy", ["float32", "weight"])
def test_parameters_take_the_policy_dtype_and_the_output_the_backbone_dtype(policy):
    model = build("LLaMA").to(torch.bfloat16)
    delta = PrefixModel(model, **SMALL, delta_dtype=policy)
    assert {p.dtype for p in delta.delta_parameters()} == {torch.float32 if policy == "float32" else torch.bfloat16}
    assert run(model, token_ids()).dtype == torch.bfloat16


def test_prefix_and_lora_on_one_backbone_detach_alone_in_any_order():
    model = build("GPT-2")
    ids = token_ids()
    original = run(model, ids)
    prefix = PrefixModel(model, **SMALL)
    with_prefix = run(model, ids)
    lora = LoraModel(model, modified_modules=["c_attn"])
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_B.normal_()
    both = run(model, ids)
    prefix.detach()
    assert_changed(run(model, ids), original)
    lora.detach()
    assert torch.equal(run(model, ids), original)
    prefix.attach()
    assert torch.equal(run(model, ids), with_prefix)
    lora.attach()
    assert torch.equal(run(model, ids), both)


def test_two_prefixes_on_the_same_attention_stack_and_detach_alone():
    model = build("LLaMA")
    ids = token_ids()
    first = PrefixModel(model, **SMALL)
    one = run(model, ids)
    second = PrefixModel(model, **SMALL)
    assert second.name == "prefix_1"
    assert_changed(run(model, ids), one)
    cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False))
    second.detach()
    assert torch.equal(run(model, ids), one)
    first.detach()


@pytest.mark.real
def test_real_minilm_prefix_training_lowers_the_loss():
    from support.real_minilm import minilm_and_batch, train_steps

    model, batch, labels = minilm_and_batch()
    delta = PrefixModel(model)
    delta.freeze_module(exclude=["deltas"])
    losses = train_steps(model, delta.delta_parameters(), batch, labels, lr=1e-3)
    assert losses[-1] < 0.8 * losses[0]


def test_works_on_bert_for_sequence_classification_which_peft_refuses():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    model = BertForSequenceClassification(config).eval()
    delta = PrefixModel(model, **SMALL)
    delta.freeze_module(exclude=["deltas", "classifier"])
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None for p in delta.delta_parameters())
