"""PEFT format: opendelta LoRA <-> PEFT LoRA folders, verified by PEFT itself."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from support.numerics import assert_within_noise, float32_noise
from transformers import GPT2Config, GPT2Model

from opendelta import (
    AutoDeltaModel,
    IncompatibleCheckpointError,
    LoraModel,
    PeftFormatError,
)


def _inputs() -> dict[str, torch.Tensor]:
    batch = tiny_batch()
    batch.pop("labels")
    return batch


def _peft_lora(model, **kwargs):
    lora = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    for name, p in lora.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.1)
    return lora


def test_saved_peft_folder_loads_in_peft_with_equal_outputs(tmp_path):
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4, lora_alpha=8)
    randomize_deltas(delta)
    expected = model(**_inputs()).logits
    delta.save_finetuned(tmp_path, format="peft")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert_within_noise(loaded(**_inputs()).logits, expected, float32_noise(loaded, lambda m, _: m(**_inputs()).logits))


def test_saved_peft_folder_keeps_per_module_rank_alpha_rslora_and_unfrozen_head(tmp_path):
    model = tiny_bert()
    delta = LoraModel(
        model,
        modified_modules=["query", "value"],
        lora_r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"layer.1.attention.self.query": 2},
        alpha_pattern={"value": 3.0},
    )
    randomize_deltas(delta)
    delta.freeze_module(exclude=["deltas", "classifier"])
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    expected = model(**_inputs()).logits
    delta.save_finetuned(tmp_path, format="peft")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    assert config["rank_pattern"] == {r"bert\.encoder\.layer\.1\.attention\.self\.query": 2}
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert_within_noise(loaded(**_inputs()).logits, expected, float32_noise(loaded, lambda m, _: m(**_inputs()).logits))


def test_peft_lora_folder_loads_with_equal_outputs(tmp_path):
    lora = _peft_lora(
        tiny_bert(),
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "intermediate.dense"],
        rank_pattern={"layer.0.attention.self.value": 2},
        alpha_pattern={"intermediate.dense": 5},
        use_rslora=True,
        modules_to_save=["classifier"],
    )
    with torch.no_grad():
        lora.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    expected = lora(**_inputs()).logits
    lora.save_pretrained(tmp_path)

    model = tiny_bert()
    delta = AutoDeltaModel.from_finetuned(tmp_path, model)
    assert isinstance(delta, LoraModel)
    assert delta.layers["bert.encoder.layer.0.attention.self.value"].lora_A.shape == (2, 32)
    assert_within_noise(model(**_inputs()).logits, expected, float32_noise(model, lambda m, _: m(**_inputs()).logits))


def test_peft_conv1d_lora_with_fan_in_fan_out_loads_with_equal_outputs(tmp_path):
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(0)
    lora = _peft_lora(GPT2Model(config).eval(), r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = lora(input_ids=ids).last_hidden_state
    lora.save_pretrained(tmp_path)

    torch.manual_seed(0)
    model = GPT2Model(config).eval()
    LoraModel.from_finetuned(tmp_path, model)
    assert_within_noise(model(input_ids=ids).last_hidden_state, expected, float32_noise(model, lambda m, _: m(input_ids=ids).last_hidden_state))


def test_opendelta_gpt2_conv1d_lora_loads_in_peft_with_equal_outputs(tmp_path):
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = GPT2Model(config).eval()
    delta = LoraModel(model, modified_modules=["c_attn"])
    randomize_deltas(delta)
    ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=ids).last_hidden_state
    delta.save_finetuned(tmp_path, format="peft")

    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(GPT2Model(config).eval(), tmp_path)
    assert_within_noise(loaded(input_ids=ids).last_hidden_state, expected, float32_noise(loaded, lambda m, _: m(input_ids=ids).last_hidden_state))


def test_peft_folder_of_another_method_is_refused_naming_it(tmp_path):
    peft.get_peft_model(tiny_bert(), peft.HRAConfig(r=2, target_modules=["query", "value"])).save_pretrained(tmp_path)
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftFormatError, match="PEFT 'HRA' adapter"):
        AutoDeltaModel.from_finetuned(tmp_path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_peft_lora_variant_opendelta_lacks_is_refused_naming_the_option(tmp_path):
    _peft_lora(tiny_bert(), r=2, target_modules=["query"], lora_bias=True).save_pretrained(tmp_path)
    with pytest.raises(PeftFormatError, match="lora_bias"):
        AutoDeltaModel.from_finetuned(tmp_path, tiny_bert())


def test_peft_checkpoint_for_another_architecture_is_refused_naming_the_modules(tmp_path):
    _peft_lora(tiny_bert(), r=2, target_modules=["query"]).save_pretrained(tmp_path)
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    with pytest.raises(IncompatibleCheckpointError, match="BertForSequenceClassification.*attention.self.query"):
        AutoDeltaModel.from_finetuned(tmp_path, GPT2Model(config))


def test_peft_checkpoint_with_other_shapes_is_refused_naming_them(tmp_path):
    _peft_lora(tiny_bert(), r=2, target_modules=["query"]).save_pretrained(tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match=r"checkpoint \(2, 32\) vs backbone \(2, 48\)"):
        AutoDeltaModel.from_finetuned(tmp_path, tiny_bert(hidden_size=48))


def test_peft_format_is_refused_for_a_partly_trained_module(tmp_path):
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "classifier.bias"])
    with pytest.raises(PeftFormatError, match="only part of module 'classifier'"):
        delta.save_finetuned(tmp_path, format="peft")
    assert not any(tmp_path.iterdir())
