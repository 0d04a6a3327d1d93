"""PEFT format for LoRA beyond linear layers: embeddings, convolutions, MultiheadAttention and
``target_parameters`` (fused MoE experts), both ways, verified by PEFT itself."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas
from support.numerics import assert_within_noise
from test_lora_layer_kinds import CASES, ConvNet, Encoder
from torch import nn

from opendelta import AutoDeltaModel, LoraModel, PeftFormatError

#: kind -> PEFT's LoraConfig arguments addressing the same layers as CASES[kind].places
PEFT_PLACES = {
    "embedding": {"target_modules": ["embed_tokens"]},
    "conv": {"target_modules": ["conv1", "conv2", "conv3"]},
    "experts": {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
}


def _randomized_peft(model: nn.Module, **kwargs) -> peft.PeftModel:
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, **kwargs))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lora


@pytest.mark.parametrize("kind", PEFT_PLACES)
def test_saved_as_peft_loads_in_peft_with_equal_outputs(kind, tmp_path):
    case = CASES[kind]
    model = case.build()
    delta = LoraModel(model, lora_r=2, lora_alpha=4, **case.places)
    randomize_deltas(delta)
    expected = case.out(model)
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(case.build(), tmp_path)
    assert_within_noise(case.out(loaded), expected, case.noise(model))


@pytest.mark.parametrize("kind", PEFT_PLACES)
def test_a_peft_folder_loads_with_equal_outputs(kind, tmp_path):
    case = CASES[kind]
    theirs = _randomized_peft(case.build(), **PEFT_PLACES[kind])
    expected = case.out(theirs)
    theirs.save_pretrained(tmp_path)
    model = case.build()
    delta = AutoDeltaModel.from_finetuned(tmp_path, model)
    assert isinstance(delta, LoraModel)
    assert_within_noise(case.out(model), expected, case.noise(model))


def test_the_experts_role_is_saved_as_peft_target_parameters(tmp_path):
    case = CASES["experts"]
    model = case.build()
    delta = LoraModel(model, modified_modules=["experts"], common_structure=True, lora_r=2, lora_alpha=4)
    randomize_deltas(delta)
    expected = case.out(model)
    delta.save_finetuned(tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == []
    assert config["target_parameters"] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    ]
    loaded = peft.PeftModel.from_pretrained(case.build(), tmp_path)
    assert_within_noise(case.out(loaded), expected, case.noise(model))


# PEFT 0.21.2's MultiheadAttention LoRA adds the out_proj delta twice in every forward and merge
# (W + 2 s B A: huggingface/peft#3774, open). opendelta writes and reads the factors of W + s B A, so
# in_proj round-trips to equal outputs and out_proj differs by exactly PEFT's second delta.


def _encoder_lora(model: nn.Module) -> LoraModel:
    delta = LoraModel(model, modified_modules=["layer.self_attn"], lora_r=2, lora_alpha=4)
    randomize_deltas(delta)
    return delta


def test_attention_lora_saved_as_peft_gives_equal_outputs_on_in_proj(tmp_path):
    # train mode (dropout 0): in eval PEFT's LoRA is skipped altogether, since TransformerEncoderLayer's
    # fused fast path reads in_proj_weight itself when the attention module has no hooks
    model = Encoder().train()
    delta = _encoder_lora(model)
    with torch.no_grad():
        delta.layers["layer.self_attn"].lora_B["1"].zero_()  # no out_proj change
    expected = model(CASES["attention"].inputs)
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(Encoder(), tmp_path).train()  # from_pretrained sets eval mode
    assert_within_noise(loaded(CASES["attention"].inputs), expected, CASES["attention"].noise(model))


def test_peft_applies_the_attention_out_proj_delta_twice(tmp_path):
    model = Encoder().train()
    delta = _encoder_lora(model)
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(Encoder(), tmp_path).train()  # from_pretrained sets eval mode
    with torch.no_grad():
        delta.layers["layer.self_attn"].lora_B["1"].mul_(2)
    assert_within_noise(loaded(CASES["attention"].inputs), model(CASES["attention"].inputs), CASES["attention"].noise(model))


def test_a_peft_attention_folder_loads_with_equal_outputs_on_in_proj(tmp_path):
    theirs = _randomized_peft(Encoder().train(), target_modules=["self_attn"])
    with torch.no_grad():
        theirs.base_model.model.layer.self_attn.base_layer.out_proj.lora_B["default"].weight.zero_()
    expected = theirs(CASES["attention"].inputs)
    theirs.save_pretrained(tmp_path)
    model = Encoder().train()
    delta = AutoDeltaModel.from_finetuned(tmp_path, model)
    assert delta.layers["layer.self_attn"].parameter_names == ("in_proj_weight", "out_proj.weight")
    assert_within_noise(model(CASES["attention"].inputs), expected, CASES["attention"].noise(model))


def test_a_dilated_convolution_cannot_be_saved_as_peft(tmp_path):
    model = nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2))
    delta = LoraModel(model, modified_modules=["0"], dummy_inputs=torch.randn(1, 2, 9))
    with pytest.raises(PeftFormatError, match="dilat"):
        delta.save_finetuned(tmp_path, format="peft")
    assert not any(tmp_path.iterdir())


def test_conv_peft_round_trip_keeps_the_kernels(tmp_path):
    model = ConvNet()
    delta = LoraModel(model, modified_modules=["conv2"], lora_r=2)
    delta.save_finetuned(tmp_path, format="peft")
    back = AutoDeltaModel.from_finetuned(tmp_path, ConvNet())
    assert back.layers["conv2"].lora_A.shape == (2, 4, 3, 3)
    assert back.layers["conv2"].lora_B.shape == (5, 2, 1, 1)


def test_a_query_only_attention_lora_crosses_to_peft_and_back_with_equal_outputs(tmp_path):
    """PEFT's LoRA takes in_proj_weight whole: the query-only B is written padded with zero rows for the key and
    value thirds, and out_proj gets zero factors, so PEFT 0.21.2 (which doubles out_proj's delta) computes the same."""
    model = Encoder().train()
    delta = LoraModel(model, modified_modules=["layer.self_attn"], lora_r=2, lora_alpha=4, attention_projections=["q"])
    randomize_deltas(delta)
    expected = model(CASES["attention"].inputs)
    noise = CASES["attention"].noise(model)
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(Encoder(), tmp_path).train()  # from_pretrained sets eval mode
    assert_within_noise(loaded(CASES["attention"].inputs), expected, noise)
    back = Encoder().train()
    AutoDeltaModel.from_finetuned(tmp_path, back)  # read as a LoRA on the whole weights, zero elsewhere
    assert_within_noise(back(CASES["attention"].inputs), expected, noise)
