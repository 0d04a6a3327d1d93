"""PEFT's prefix tuning both ways: a prefix with position_offset=True is PEFT's, outputs equal in either direction."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from support.numerics import assert_within_noise, float32_noise
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from opendelta import AutoDeltaModel, IncompatibleCheckpointError, PeftFormatError, PrefixModel

TOKENS = 3


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    """A LLaMA with grouped-query attention (4 heads, 2 key/value heads) and rotary positions."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    """A GPT-2: learned position embeddings, Conv1D projections."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _noise(model) -> float:
    """The bare model's own float32 noise on these inputs (batched vs alone): the tolerance for equal outputs."""
    return float32_noise(model, lambda m, _: m(**_inputs()).logits)


def _peft_prefix(build, projection: bool = False):
    """A PEFT prefix-tuning model with random prefix values (through its projection MLP if `projection`)."""
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS, prefix_projection=projection,
                                     encoder_hidden_size=24)
    tuned = peft.get_peft_model(build(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return tuned.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_peft_prefix_folder_loads_with_equal_outputs_and_generations(tmp_path, family):
    tuned = _peft_prefix(BUILDERS[family])
    tuned.save_pretrained(tmp_path)
    want = _logits(tuned, _inputs())
    model = BUILDERS[family]()
    delta = AutoDeltaModel.from_finetuned(tmp_path, model)
    assert isinstance(delta, PrefixModel) and delta.config.position_offset and not delta.config.reparameterize
    assert_within_noise(_logits(model, _inputs()), want, _noise(BUILDERS[family]()))
    prompt = _inputs()["input_ids"][:1]
    with torch.no_grad():
        theirs = tuned.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
        ours = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, theirs)


def test_a_peft_prefix_trained_through_its_projection_loads_with_equal_outputs(tmp_path):
    tuned = _peft_prefix(tiny_llama, projection=True)
    want = _logits(tuned, _inputs())
    tuned.save_pretrained(tmp_path)  # PEFT saves the projection's output, the prefix itself
    model = tiny_llama()
    AutoDeltaModel.from_finetuned(tmp_path, model)
    assert_within_noise(_logits(model, _inputs()), want, _noise(tiny_llama()))


@pytest.mark.parametrize(("family", "reparameterize"), [("llama", False), ("llama", True), ("gpt2", True)])
def test_a_prefix_with_position_offset_saved_as_peft_loads_in_peft_with_equal_outputs(tmp_path, family, reparameterize):
    build = BUILDERS[family]
    model = build()
    delta = PrefixModel(model, prefix_token_num=TOKENS, reparameterize=reparameterize, embed_dim=8, mid_dim=8,
                        position_offset=True)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    want = _logits(model, _inputs())
    delta.save_finetuned(tmp_path, format="peft")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["task_type"] == "CAUSAL_LM"
    if family == "llama":  # grouped-query attention: PEFT's token_dim counts the key/value heads
        assert saved["num_attention_heads"] == 2 and saved["token_dim"] == 16
    tuned = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    assert_within_noise(_logits(tuned, _inputs()), want, _noise(build()))


def test_the_position_offset_changes_outputs_and_the_checkpoint_records_it(tmp_path):
    model = tiny_llama()
    bare = _logits(model, _inputs())
    delta = PrefixModel(model, prefix_token_num=TOKENS, reparameterize=False, position_offset=True, name="shifted")
    shifted = _logits(model, _inputs())
    delta.save_finetuned(tmp_path)
    delta.detach()
    assert torch.equal(_logits(model, _inputs()), bare)  # detaching removes the position shift too
    plain = PrefixModel(model, prefix_token_num=TOKENS, reparameterize=False, name="plain")
    with torch.no_grad():
        for path, layer in delta.layers.items():
            if path:
                plain.layers[path].prefix.copy_(layer.prefix)
    assert not torch.equal(_logits(model, _inputs()), shifted)  # the default keeps positions from 0
    plain.detach()
    again = PrefixModel.from_finetuned(tmp_path, model)
    assert again.config.position_offset
    assert torch.equal(_logits(model, _inputs()), shifted)


def test_a_prefix_on_some_layers_only_is_refused_as_peft(tmp_path):
    delta = PrefixModel(tiny_llama(), modified_modules=["layers.0.self_attn"], prefix_token_num=2, position_offset=True)
    with pytest.raises(PeftFormatError, match="all 2 attention layers"):
        delta.save_finetuned(tmp_path, format="peft")


def test_a_peft_prefix_for_another_depth_is_refused_and_the_model_is_unchanged(tmp_path):
    _peft_prefix(tiny_llama).save_pretrained(tmp_path)
    model = tiny_llama(layers=3)
    before = _logits(model, _inputs())
    with pytest.raises(IncompatibleCheckpointError, match="2 attention layers"):
        AutoDeltaModel.from_finetuned(tmp_path, model)
    assert torch.equal(_logits(model, _inputs()), before)


def test_a_prefix_with_position_offset_refuses_a_mixed_batch_and_leaves_the_model_as_it_was():
    from opendelta import MixedBatchError, mixed_batch

    model = tiny_llama()
    shifted = PrefixModel(model, prefix_token_num=TOKENS, position_offset=True, name="shifted")
    other = PrefixModel(model, prefix_token_num=TOKENS, position_offset=True, name="other")
    want = _logits(model, _inputs())
    with pytest.raises(MixedBatchError, match="position_offset"):
        with mixed_batch([shifted, other], rows=[0, 1]):
            _logits(model, _inputs())
    assert torch.equal(_logits(model, _inputs()), want)
