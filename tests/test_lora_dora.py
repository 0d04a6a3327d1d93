"""DoRA (``LoraModel(..., use_dora=True)``): its equation, exact lifecycle, checkpoints, mixed batches and PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from support.ecosystem_fixtures import randomize_deltas, tiny_batch
from support.ecosystem_fixtures import tiny_bert as tiny_bert_classifier
from support.lifecycle import assert_exact_lifecycle
from support.numerics import assert_within_noise, float32_noise
from support.rows import assert_mixed_batch_is_each_row_alone
from torch import nn

from opendelta import AutoDeltaModel, LoraModel

from conftest import tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
#: linear layers on every family (GPT-2's are Conv1D)
PLACES = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "output.dense"]}
IDS = torch.randint(1, 99, (4, 7), generator=torch.Generator().manual_seed(3))


def out(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def dora(model: nn.Module, family: str, **kwargs) -> LoraModel:
    return LoraModel(model, modified_modules=PLACES[family], use_dora=True, lora_r=4, lora_alpha=8, **kwargs)


def dora_reference(linear: nn.Linear, layer, x: torch.Tensor) -> torch.Tensor:
    """The paper's DoRA output, computed the plain way: the new weight formed, normed and applied."""
    merged = linear.weight + layer.scaling * layer.lora_B @ layer.lora_A
    weight = layer.magnitude.unsqueeze(1) * merged / torch.linalg.norm(merged, dim=1, keepdim=True)
    return F.linear(x, weight, linear.bias)


def test_dora_equation_on_a_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    delta = LoraModel(model, modified_modules=["0"], use_dora=True, lora_r=2, lora_alpha=4)
    randomize_deltas(delta)
    x = torch.randn(5, 8)
    got = model(x)
    double = copy.deepcopy(model).double()
    want = dora_reference(double[0], double[0].lora, x.double())
    assert_within_noise(got, want, float32_noise(model, lambda m, _: m(x.to(m[0].weight.dtype))))


def test_dora_equation_on_gpt2_conv1d():
    model = tiny_gpt2()
    delta = LoraModel(model, modified_modules=["h.0.attn.c_attn"], use_dora=True, lora_r=2)
    randomize_deltas(delta)
    conv = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 5, 32)
    as_linear = nn.Linear(32, 96).double()
    with torch.no_grad():
        as_linear.weight.copy_(conv.weight.t())
        as_linear.bias.copy_(conv.bias)
    want = dora_reference(as_linear, copy.deepcopy(conv.lora).double(), x.double())
    assert_within_noise(conv(x), want, float32_noise(conv, lambda m, _: m(x.to(m.weight.dtype))))


@pytest.mark.parametrize("family", BUILDERS)
def test_fresh_dora_changes_nothing_and_magnitude_is_the_weight_norm(family):
    model = BUILDERS[family]()
    before = out(model)
    delta = dora(model, family)
    assert torch.equal(out(model), before)
    for path, layer in delta.layers.items():
        weight = model.get_submodule(path).weight
        rows = weight if weight.shape[0] == layer.lora_B.shape[0] else weight.t()
        torch.testing.assert_close(layer.magnitude, torch.linalg.norm(rows, dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", BUILDERS)
def test_dora_trains_only_its_parameters(family):
    model = BUILDERS[family]().train()
    delta = dora(model, family)
    randomize_deltas(delta)
    delta.freeze_module(exclude=["deltas"])
    out(model).square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(k in n for k in ("lora_A", "lora_B", "magnitude")) for n in trained)
    assert sum(n.endswith("magnitude") for n in trained) == len(delta.layers)


@pytest.mark.parametrize("family", BUILDERS)
def test_dora_detach_merge_unmerge_are_bit_exact(family):
    def attach(model: nn.Module) -> LoraModel:
        delta = dora(model, family)
        randomize_deltas(delta)
        return delta

    assert_exact_lifecycle(BUILDERS[family](), attach, out)


@pytest.mark.parametrize("family", BUILDERS)
def test_dora_save_and_reload_is_exact(family, tmp_path):
    model = BUILDERS[family]()
    delta = dora(model, family)
    randomize_deltas(delta)
    tuned = out(model)
    delta.save_finetuned(tmp_path)
    other = BUILDERS[family]()
    loaded = AutoDeltaModel.from_finetuned(tmp_path, other)
    assert loaded.config.use_dora
    assert torch.equal(out(other), tuned)


@pytest.mark.parametrize("family", BUILDERS)
def test_dora_mixed_batch_equals_each_row_alone(family):
    def attach(model: nn.Module) -> list[LoraModel]:
        deltas = [dora(model, family, name=f"task{i}") for i in range(2)]
        for i, d in enumerate(deltas):
            randomize_deltas(d, seed=10 + i)
        return deltas

    assert_mixed_batch_is_each_row_alone(BUILDERS[family](), attach, [0, 1, -1, 0], out, IDS)


def test_weight_norm_follows_in_place_changes_and_moves_of_the_base_weight():
    """||W||^2 is kept between steps, but a changed or moved weight is seen at once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    delta = LoraModel(model, modified_modules=["0"], use_dora=True, lora_r=2)
    randomize_deltas(delta)
    layer = delta.layers["0"]
    x = torch.randn(3, 8)

    def fresh_norm() -> torch.Tensor:
        merged = model[0].weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        return torch.linalg.norm(merged, dim=1)

    assert torch.allclose(layer.weight_norm(model[0]).double(), fresh_norm(), rtol=1e-5)
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # the version counter changes
    assert torch.allclose(layer.weight_norm(model[0]).double(), fresh_norm(), rtol=1e-5)
    model.double()  # the storage changes
    assert layer.weight_norm(model[0]).dtype == torch.float32
    assert torch.allclose(layer.weight_norm(model[0]).double(), fresh_norm(), rtol=1e-5)
    assert model(x.double()).dtype == torch.float64


def test_a_deep_copy_reads_its_own_weights():
    """The engine hands each call its module, so a copy's DoRA norms the copy's weight, not the original's."""
    model = tiny_llama()
    delta = dora(model, "llama")
    randomize_deltas(delta)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
    expected = copy.deepcopy(copied)  # a copy made after the change: its cache starts empty
    assert torch.equal(out(copied), out(expected))
    assert not torch.equal(out(copied), out(model))


def test_dropout_rescales_the_dropped_out_input_through_the_weight():
    """With dropout in training, the magnitude rescales W applied to the dropped-out input (as PEFT does)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).train()
    delta = LoraModel(model, modified_modules=["0"], use_dora=True, lora_r=2, lora_dropout=0.5)
    randomize_deltas(delta)
    layer, linear = delta.layers["0"], model[0]
    x = torch.randn(4, 8)
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5)
    with torch.no_grad():
        k = layer.magnitude / layer.weight_norm(linear)
        want = F.linear(x, linear.weight, linear.bias) + (k - 1) * F.linear(dropped, linear.weight) + k * layer.scaling * F.linear(
            F.linear(dropped, layer.lora_A), layer.lora_B
        )
    torch.testing.assert_close(got, want)


def test_a_dora_layer_has_no_module_free_forward():
    model = nn.Sequential(nn.Linear(8, 6))
    delta = LoraModel(model, modified_modules=["0"], use_dora=True)
    with pytest.raises(TypeError, match="route_parallel"):
        delta.layers["0"](torch.randn(2, 8))


# ------------------------------------------------------------------ PEFT, both ways, PEFT as the judge


def _inputs() -> dict[str, torch.Tensor]:
    batch = tiny_batch()
    batch.pop("labels")
    return batch


def test_dora_saved_as_peft_loads_in_peft_with_equal_outputs(tmp_path):
    model = tiny_bert_classifier()
    delta = LoraModel(model, modified_modules=["query", "value"], use_dora=True, lora_r=4, lora_alpha=8)
    randomize_deltas(delta)
    expected = model(**_inputs()).logits
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    assert loaded.peft_config["default"].use_dora
    got = loaded(**_inputs()).logits
    assert_within_noise(got, expected, float32_noise(loaded, lambda m, _: m(**_inputs()).logits))
    assert not torch.equal(got, tiny_bert_classifier()(**_inputs()).logits)


def test_dora_on_conv1d_saved_as_peft_loads_in_peft_with_equal_outputs(tmp_path):
    model = tiny_gpt2()
    delta = LoraModel(model, modified_modules=["c_attn", "mlp.c_proj"], use_dora=True, lora_r=4)
    randomize_deltas(delta)
    expected = out(model)
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert_within_noise(out(loaded), expected, float32_noise(loaded, lambda m, _: out(m)))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_peft_dora_folder_loads_with_equal_outputs(family, tmp_path):
    targets = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj", "down_proj"]}[family]
    wrapped = peft.get_peft_model(
        BUILDERS[family](), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    expected = out(wrapped)
    wrapped.save_pretrained(tmp_path)
    model = BUILDERS[family]()
    delta = AutoDeltaModel.from_finetuned(tmp_path, model)
    assert delta.config.use_dora and all(hasattr(layer, "magnitude") for layer in delta.layers.values())
    assert_within_noise(out(model), expected, float32_noise(model, lambda m, _: out(m)))
