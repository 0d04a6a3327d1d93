"""PEFT format beyond LoRA: IA3, soft prompt (PEFT prompt tuning), prefix (PEFT prefix tuning), both directions."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from support.numerics import assert_changed, assert_within_noise, float32_noise
from transformers import LlamaConfig, LlamaForCausalLM

from opendelta import AutoDeltaModel, BitFitModel, CorruptCheckpointError, IA3Model, PeftFormatError, PrefixModel, SoftPromptModel


def _bert_inputs() -> dict[str, torch.Tensor]:
    batch = tiny_batch()
    batch.pop("labels")
    return batch


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer LLaMA with grouped-query attention (4 heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _llama_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 99, (3, 6), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _assert_same_outputs(got_model, want: torch.Tensor, inputs) -> None:
    assert_within_noise(_logits(got_model, inputs), want, float32_noise(got_model, lambda m, _: m(**inputs).logits))


def _randomize_peft(model) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "modules_to_save" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


# ----------------------------------------------------------------- IA3


def test_ia3_saved_as_peft_loads_in_peft_with_equal_outputs(tmp_path):
    model = tiny_bert()
    delta = IA3Model(model, modified_modules=["key", "value", "output.dense"], feedforward_modules=["layer.1.output.dense"])
    randomize_deltas(delta)
    expected = _logits(model, _bert_inputs())
    delta.save_finetuned(tmp_path, format="peft")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["bert.encoder.layer.1.output.dense"]
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    _assert_same_outputs(loaded, expected, _bert_inputs())
    assert_changed(expected, _logits(tiny_bert(), _bert_inputs()))


def test_peft_ia3_folder_loads_with_equal_outputs(tmp_path):
    ia3 = peft.get_peft_model(
        tiny_bert(), peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    )
    _randomize_peft(ia3)
    ia3.eval()
    expected = _logits(ia3, _bert_inputs())
    ia3.save_pretrained(tmp_path)

    model = tiny_bert()
    delta = AutoDeltaModel.from_finetuned(tmp_path, model)
    assert isinstance(delta, IA3Model)
    _assert_same_outputs(model, expected, _bert_inputs())


# ----------------------------------------------------------------- soft prompt = PEFT prompt tuning


@pytest.mark.parametrize(
    ("make", "inputs"), [(tiny_bert, _bert_inputs), (tiny_llama, _llama_inputs)], ids=["bert-seq-cls", "llama-causal-lm"]
)
def test_soft_prompt_saved_as_peft_loads_in_peft_with_equal_outputs(tmp_path, make, inputs):
    model = make()
    delta = SoftPromptModel(model, soft_token_num=3)
    randomize_deltas(delta)
    expected = _logits(model, inputs())
    delta.save_finetuned(tmp_path, format="peft")

    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path)
    _assert_same_outputs(loaded, expected, inputs())


@pytest.mark.parametrize(
    ("make", "inputs", "task"),
    [(tiny_bert, _bert_inputs, "SEQ_CLS"), (tiny_llama, _llama_inputs, "CAUSAL_LM")],
    ids=["bert-seq-cls", "llama-causal-lm"],
)
def test_peft_prompt_tuning_folder_loads_with_equal_outputs(tmp_path, make, inputs, task):
    tuned = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3))
    _randomize_peft(tuned)
    tuned.eval()
    expected = _logits(tuned, inputs())
    tuned.save_pretrained(tmp_path)

    model = make()
    delta = AutoDeltaModel.from_finetuned(tmp_path, model)  # with the classifier PEFT trains by default
    assert isinstance(delta, SoftPromptModel)
    _assert_same_outputs(model, expected, inputs())


# ----------------------------------------------------------------- prefix = PEFT prefix tuning


def test_a_prefix_without_position_offset_cannot_be_saved_as_peft_and_the_error_says_why(tmp_path):
    # PEFT's prefix both ways (position_offset=True): tests/test_peft_prefix.py
    delta = PrefixModel(tiny_llama(), prefix_token_num=2)
    with pytest.raises(PeftFormatError, match="position_offset=True"):
        delta.save_finetuned(tmp_path, format="peft")
    assert not any(tmp_path.iterdir())


def test_soft_prompt_on_an_encoder_decoder_cannot_be_saved_as_peft(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)).eval()
    delta = SoftPromptModel(model, soft_token_num=2)
    with pytest.raises(PeftFormatError, match="encoder-decoder"):
        delta.save_finetuned(tmp_path, format="peft")


# ----------------------------------------------------------------- BitFit = PEFT's BEFT (both ways: tests/test_shipping_matrix.py)


def test_bitfit_on_a_norm_cannot_be_saved_as_peft_beft(tmp_path):
    delta = BitFitModel(tiny_llama(), modified_modules=["q_proj", "input_layernorm"])
    with pytest.raises(PeftFormatError, match="nn.Linear layers only"):
        delta.save_finetuned(tmp_path, format="peft")
    assert not any(tmp_path.iterdir())


def test_a_beft_folder_with_a_misshapen_bias_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    delta = BitFitModel(model, modified_modules=["q_proj"])
    delta.save_finetuned(tmp_path, format="peft")
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v.reshape(-1) for k, v in load_file(weights).items()}, weights)
    with pytest.raises(CorruptCheckpointError, match=r"BEFT stores \(1, out\)"):
        AutoDeltaModel.from_finetuned(tmp_path, tiny_llama(), verify=False)
