"""LoRA: the equation, zero-init exactness, placement on four families, what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opendelta import LoraModel, UnsupportedModuleError

from conftest import FACTORIES, PlainNet, hidden, inputs_for, perturb, tiny_gpt2

X = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))


def test_lora_equation_on_a_linear():
    net = PlainNet()
    ref = net.encoder[0](X)
    delta = LoraModel(net, modified_modules=["encoder.0"], lora_r=4, lora_alpha=8)
    layer = delta.layers["encoder.0"]
    perturb(delta)
    expected = ref + (8 / 4) * (X @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(net.encoder[0](X), expected, atol=1e-6)


def test_lora_equation_on_gpt2_conv1d():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    h = torch.randn(2, 3, 32)
    ref = conv(h)
    delta = LoraModel(model, modified_modules=["h.0.attn.c_attn"], lora_r=2, lora_alpha=4)
    layer = delta.layers["transformer.h.0.attn.c_attn"]
    assert layer.lora_A.shape == (2, 32) and layer.lora_B.shape == (96, 2)
    perturb(delta)
    assert torch.allclose(conv(h), ref + 2 * (h @ layer.lora_A.T @ layer.lora_B.T), atol=1e-6)


def test_zero_initialised_lora_changes_nothing(family):
    model = FACTORIES[family]()
    inputs = inputs_for(family)
    ref = hidden(model, inputs)
    LoraModel(model)
    assert torch.equal(hidden(model, inputs), ref)


DEFAULT_POSITIONS = {
    "bert": ["encoder.layer.{i}.attention.self.query", "encoder.layer.{i}.attention.self.value"],
    "gpt2": ["transformer.h.{i}.attn.c_attn"],
    "t5": [
        "encoder.block.{i}.layer.0.SelfAttention.q",
        "encoder.block.{i}.layer.0.SelfAttention.v",
        "decoder.block.{i}.layer.0.SelfAttention.q",
        "decoder.block.{i}.layer.0.SelfAttention.v",
    ],  # self-attention only: cross-attention is the role xattn.q / xattn.v
    "llama": ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.v_proj"],
}


def test_default_positions_are_attention_query_and_value(family):
    model = FACTORIES[family]()
    expected = {p.format(i=i) for p in DEFAULT_POSITIONS[family] for i in range(2)}
    assert set(LoraModel.plan(model)) == expected
    assert set(LoraModel(model).layers) == expected


def test_lora_trains_only_its_parameters_after_freezing(family):
    model = FACTORIES[family]()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas"])
    hidden(model, inputs_for(family)).sum().backward()
    for name, p in model.named_parameters():
        is_delta = ".lora." in name
        assert p.requires_grad == is_delta, name
        if is_delta:
            assert p.grad is not None, name  # lora_A gets a zero gradient while B is zero; it exists
        else:
            assert p.grad is None, name
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in delta.layers.values())


@pytest.mark.parametrize("policy", ["float32", "weight"])
def test_lora_params_take_the_policy_dtype_and_the_output_the_backbone_dtype(policy):
    model = FACTORIES["llama"]().to(torch.bfloat16)
    delta = LoraModel(model, delta_dtype=policy)
    assert {p.dtype for p in delta.delta_parameters()} == {torch.float32 if policy == "float32" else torch.bfloat16}
    perturb(delta)
    out = hidden(model, inputs_for("llama"))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_dropout_applies_only_in_training():
    net = PlainNet()
    delta = LoraModel(net, modified_modules=["encoder.0"], lora_dropout=0.5)
    perturb(delta)
    net.eval()
    assert torch.equal(net(X), net(X))
    net.train()
    torch.manual_seed(0)
    a = net(X)
    assert not torch.equal(a, net(X))


def test_lora_refuses_a_layer_norm_with_a_typed_error_and_leaves_the_model_alone():
    net = PlainNet()
    ref = net(X)
    with pytest.raises(UnsupportedModuleError, match="'norm'.*LayerNorm"):
        LoraModel(net, modified_modules=["encoder.0", "norm"])
    assert all(not m._forward_hooks for m in net.modules())
    assert not any("lora" in n for n, _ in net.named_parameters())
    assert torch.equal(net(X), ref)


def test_lora_bad_arguments_are_config_errors():
    from opendelta import DeltaConfigError

    with pytest.raises(DeltaConfigError, match="lora_r"):
        LoraModel(PlainNet(), modified_modules=["encoder.0"], lora_r=0)
    with pytest.raises(DeltaConfigError, match="lora_rank.*lora_r"):
        LoraModel(PlainNet(), modified_modules=["encoder.0"], lora_rank=4)


def test_exclude_modules_is_honoured():
    model = FACTORIES["bert"]()
    delta = LoraModel(model, modified_modules=["query", "value"], exclude_modules=["layer.1"])
    assert set(delta.layers) == {"encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"}


def test_input_is_not_copied_when_dropout_is_zero(monkeypatch):
    holder = nn.Sequential(nn.Linear(8, 8))
    LoraModel(holder, modified_modules=["0"])
    captured = []
    original = F.linear

    def spy(x, w, b=None):
        captured.append(x)
        return original(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    x = torch.randn(2, 8)
    holder(x)
    # base linear, then LoRA's A projection: both read the very input tensor
    assert len(captured) == 2 and captured[0] is x and captured[1] is x
