"""Compacter's PHM options: factorised and shared rules, shared blocks, and the two ways of
applying the Kronecker sum (kronecker_prod)."""

from __future__ import annotations

import json

import pytest
import torch
from support.numerics import assert_within_noise, float32_noise
from support.families import MATRIX as FAMILIES, fresh, hidden
from torch import nn

from opendelta import CompacterModel, DeltaConfigError, UnsupportedModuleError
from opendelta.checkpoint import read_checkpoint
from opendelta.methods.compacter import PHMLinear

BERT = FAMILIES["bert"]
N = 4  # hypercomplex_division
HID, BOT = 32, 8  # tiny BERT's hidden size, and its bottleneck with reduction_factor=4
ADAPTERS = 4  # attn.o and ffn.down in two layers
OPTIONS = {
    "plain": {},
    "shared_rule": {"shared_phm_rule": True},
    "factorized_rule": {"factorized_phm_rule": True},
    "shared_factorized_rule": {"shared_phm_rule": True, "factorized_phm_rule": True},
    "shared_W": {"shared_W_phm": True},
    "shared_W_unfactorized": {"shared_W_phm": True, "factorized_phm": False},
    "everything_shared": {"shared_W_phm": True, "shared_phm_rule": True, "factorized_phm_rule": True},
    "factors_path": {"kronecker_prod": False},
}


def perturb(delta, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator).to(p.dtype))


def compacter(model: nn.Module, **options) -> CompacterModel:
    return CompacterModel(model, reduction_factor=4, **options)


def expected_count(shared_phm_rule=False, factorized_phm_rule=False, shared_W_phm=False, factorized_phm=True,
                   **_) -> int:
    """Delta parameters of Compacter on tiny BERT, from the option's definition."""
    rule = 2 * N * N if factorized_phm_rule else N ** 3  # per PHM layer: A, or its u_i and v_i
    p_down, q_down = HID // N, BOT // N
    blocks_down = N * (p_down + q_down) if factorized_phm else N * p_down * q_down  # rank 1
    blocks_up = blocks_down  # the up blocks are the transposed shapes
    biases = BOT + HID
    rules = rule if shared_phm_rule else 2 * ADAPTERS * rule
    blocks = blocks_down + blocks_up if shared_W_phm else ADAPTERS * (blocks_down + blocks_up)
    return rules + blocks + ADAPTERS * biases


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_has_the_parameter_count_its_definition_gives(option: str) -> None:
    delta = compacter(fresh("bert"), **OPTIONS[option])
    assert delta.parameter_counts()["delta"] == expected_count(**OPTIONS[option])


def test_shared_phm_rule_is_one_tensor_in_every_phm_layer_of_the_delta_model() -> None:
    delta = compacter(fresh("bert"), shared_phm_rule=True)
    rules = {id(getattr(layer, side).phm_rule) for layer in delta.layers.values() for side in ("down", "up")}
    assert len(rules) == 1


def test_shared_w_phm_shares_down_blocks_among_downs_and_up_blocks_among_ups() -> None:
    delta = compacter(fresh("bert"), shared_W_phm=True)
    layers = list(delta.layers.values())
    assert all(layer.down.W_left is layers[0].down.W_left and layer.up.W_right is layers[0].up.W_right
               for layer in layers)
    assert layers[0].down.W_left is not layers[0].up.W_left
    assert all(layer.down.phm_rule is not layers[0].down.phm_rule for layer in layers[1:])


def test_factorized_phm_rule_makes_each_rule_a_rank_one_outer_product() -> None:
    delta = compacter(fresh("bert"), factorized_phm_rule=True)
    down: PHMLinear = delta.layers["encoder.layer.0.attention.output.dense"].down
    assert down.phm_rule_left.shape == (N, N, 1) and down.phm_rule_right.shape == (N, 1, N)
    assert not hasattr(down, "phm_rule")
    for i in range(N):
        assert torch.equal(down.rule()[i], torch.outer(down.phm_rule_left[i, :, 0], down.phm_rule_right[i, 0]))


@pytest.mark.parametrize("factorized_phm", [True, False], ids=["factorized_blocks", "full_blocks"])
@pytest.mark.parametrize("factorized_phm_rule", [False, True], ids=["full_rule", "factorized_rule"])
def test_materialised_weight_and_factor_path_compute_the_same_map(factorized_phm: bool,
                                                                   factorized_phm_rule: bool) -> None:
    model = nn.Sequential(nn.Linear(16, 16)).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    delta = CompacterModel(model, modified_modules=["0"], reduction_factor=2, phm_rank=3,
                           factorized_phm=factorized_phm, factorized_phm_rule=factorized_phm_rule, dummy_inputs=(x,))
    perturb(delta)
    for phm in (delta.layers["0"].down, delta.layers["0"].up):
        kron = sum(torch.kron(phm.rule()[i], phm.blocks()[i]) for i in range(N))
        assert torch.allclose(phm.weight(), kron, rtol=0, atol=1e-15)
        h = torch.randn(3, 5, kron.shape[0], dtype=torch.float64)
        phm.materialise = True
        materialised = phm(h)
        phm.materialise = False
        assert torch.allclose(phm(h), materialised, rtol=1e-12, atol=1e-14)
        assert torch.allclose(materialised, h @ kron + phm.bias, rtol=1e-12, atol=1e-14)


def test_kronecker_prod_false_selects_the_factor_path_and_reproduces_the_default_output() -> None:
    outputs, noises = [], []
    for kronecker_prod in (None, False):
        model = fresh("bert")
        torch.manual_seed(3)
        delta = compacter(model, kronecker_prod=kronecker_prod)
        assert all(layer.down.materialise is (kronecker_prod is None) for layer in delta.layers.values())
        perturb(delta)
        outputs.append(hidden(model, BERT))
        noises.append(float32_noise(model, lambda m, _: hidden(m, BERT)))  # each path's own rounding here
    assert_within_noise(outputs[1], outputs[0], *noises)


@pytest.mark.parametrize("option", OPTIONS)
def test_gradients_reach_every_parameter_once_perturbed(option: str) -> None:
    model = fresh("bert").train()
    delta = compacter(model, **OPTIONS[option])
    perturb(delta)
    delta.freeze_module()
    hidden(model, BERT).pow(2).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {id(p) for p in delta.delta_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("option", OPTIONS)
def test_detach_restores_the_backbone_bit_for_bit_and_attach_the_tuned_output(option: str) -> None:
    model = fresh("bert")
    original = hidden(model, BERT)
    delta = compacter(model, **OPTIONS[option])
    perturb(delta)
    tuned = hidden(model, BERT)
    delta.detach()
    assert torch.equal(hidden(model, BERT), original)
    assert model.state_dict().keys() == fresh("bert").state_dict().keys()
    delta.attach()
    assert torch.equal(hidden(model, BERT), tuned)


@pytest.mark.parametrize("option", OPTIONS)
def test_save_then_load_reproduces_the_output_and_keeps_shared_tensors_shared(option: str, tmp_path) -> None:
    model = fresh("bert")
    delta = compacter(model, **OPTIONS[option])
    perturb(delta)
    tuned = hidden(model, BERT)
    delta.save_finetuned(tmp_path)
    other = fresh("bert")
    loaded = CompacterModel.from_finetuned(tmp_path, other)
    assert torch.equal(hidden(other, BERT), tuned)
    assert loaded.parameter_counts()["delta"] == delta.parameter_counts()["delta"]
    saved = read_checkpoint(tmp_path).tensors
    assert sum(t.numel() for t in saved.values()) == delta.parameter_counts()["delta"]


def test_a_shared_tensor_is_saved_once_and_its_other_keys_point_at_it(tmp_path) -> None:
    delta = compacter(fresh("bert"), shared_phm_rule=True)
    delta.save_finetuned(tmp_path)
    saved = read_checkpoint(tmp_path).tensors
    meta = json.loads((tmp_path / "delta_config.json").read_text())
    rule_keys = [k for k in saved if k.endswith("phm_rule")]
    assert rule_keys == ["delta.encoder.layer.0.attention.output.dense.down.phm_rule"]
    assert set(meta["shared_tensors"].values()) == set(rule_keys)
    assert len(meta["shared_tensors"]) == 2 * ADAPTERS - 1


def test_shared_blocks_on_adapters_of_different_sizes_raise_naming_both_modules() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 32))
    with pytest.raises(UnsupportedModuleError, match="shared_W_phm") as info:
        CompacterModel(model, modified_modules=["0", "1"], reduction_factor=2, shared_W_phm=True,
                       dummy_inputs=(torch.randn(2, 16),))
    assert "'0'" in str(info.value) and "'1'" in str(info.value)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("bad", [
    {"kronecker_prod": "batched"},
    {"kronecker_prod": 1},
    {"shared_W_phm": "yes"},
    {"factorized_phm_rule": None},
    {"shared_phm_rule": 1},
    {"phm_init_range": 0.0},
    {"phm_rank": 0},
])
def test_invalid_option_values_raise_a_config_error_naming_the_option(bad: dict) -> None:
    with pytest.raises(DeltaConfigError, match=next(iter(bad))):
        compacter(fresh("bert"), **bad)
