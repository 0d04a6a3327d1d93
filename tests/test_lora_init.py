"""LoRA's ``init_lora_weights`` (True, False, "gaussian", "pissa", "pissa_niter_K", "olora"), as PEFT defines them."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from support.lifecycle import assert_exact_lifecycle
from support.numerics import assert_within_noise, float32_noise
from support.rows import assert_mixed_batch_is_each_row_alone
from torch import nn

from opendelta import AutoDeltaModel, DeltaConfigError, LoraModel, PeftFormatError

from conftest import tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
PLACES = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "output.dense"]}
DATA_AWARE = ["pissa", "pissa_niter_2", "olora"]
IDS = torch.randint(1, 99, (4, 7), generator=torch.Generator().manual_seed(3))


def out(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def train_a_little(delta: LoraModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def rows_of(model: nn.Module, path: str, layer) -> torch.Tensor:
    """The module's weight as (out, in)."""
    weight = model.get_submodule(path).weight
    return weight if weight.shape[0] == layer.lora_B.shape[0] else weight.t()


@pytest.mark.parametrize("family", BUILDERS)
@pytest.mark.parametrize("init", [True, "gaussian", *DATA_AWARE])
def test_a_fresh_lora_changes_nothing_whatever_its_start(family, init):
    """PiSSA and OLoRA take the principal part out of the weight and put it in the factors; the layer adds
    s (B A - B0 A0) as (B - B0) A + B0 (A - A0), which is exactly zero at the start."""
    model = BUILDERS[family]()
    before = out(model)
    LoraModel(model, modified_modules=PLACES[family], lora_r=4, init_lora_weights=init)
    assert torch.equal(out(model), before)


def test_init_false_starts_both_factors_random_as_peft_does():
    model = tiny_llama()
    before = out(model)
    delta = LoraModel(model, modified_modules=["q_proj"], init_lora_weights=False)
    assert all(layer.lora_B.abs().sum() > 0 for layer in delta.layers.values())
    assert not torch.equal(out(model), before)


def test_gaussian_draws_a_with_standard_deviation_one_over_r():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512))
    layer = LoraModel(model, modified_modules=["0"], lora_r=4, init_lora_weights="gaussian").layers["0"]
    assert abs(layer.lora_A.std().item() - 0.25) < 0.01
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


@pytest.mark.parametrize("family", BUILDERS)
def test_pissa_factors_are_the_principal_singular_part_of_the_weight(family):
    model = BUILDERS[family]()
    delta = LoraModel(model, modified_modules=PLACES[family], lora_r=4, lora_alpha=8, init_lora_weights="pissa")
    for path, layer in delta.layers.items():
        # the reference is the top-4 part of the weight's own float32 SVD (what PiSSA and PEFT compute): a
        # float64 SVD differs from it by float32's SVD error, which depends on the CPU's LAPACK and the singular
        # gaps, so no fixed tolerance against float64 holds on every machine. Splitting s into A and B rounds
        # each term of s B A about 5 times (s / scaling, sqrt, the two scalings of u and vh), each <= eps / 2
        u, s, vh = (t.double() for t in torch.linalg.svd(rows_of(model, path, layer).float(), full_matrices=False))
        principal = (u[:, :4] * s[:4]) @ vh[:4]
        terms = (u[:, :4].abs() * s[:4]) @ vh[:4].abs()
        product = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        assert ((product - principal).abs() <= 3 * torch.finfo(torch.float32).eps * terms).all()
        assert torch.equal(layer.lora_A, layer.lora_A0) and torch.equal(layer.lora_B, layer.lora_B0)


def test_olora_factors_are_the_first_qr_columns_and_rows():
    model = tiny_llama()
    layer = LoraModel(model, modified_modules=["layers.0.self_attn.q_proj"], lora_r=4, init_lora_weights="olora").layers[
        "model.layers.0.self_attn.q_proj"
    ]
    q, r = torch.linalg.qr(model.model.layers[0].self_attn.q_proj.weight.detach())
    torch.testing.assert_close(layer.lora_B, q[:, :4])
    torch.testing.assert_close(layer.lora_A, r[:4])


@pytest.mark.parametrize("family", BUILDERS)
@pytest.mark.parametrize("init", DATA_AWARE)
def test_data_aware_lora_detach_merge_unmerge_are_bit_exact_and_leave_the_weights_alone(family, init):
    def attach(model: nn.Module) -> LoraModel:
        delta = LoraModel(model, modified_modules=PLACES[family], lora_r=4, init_lora_weights=init)
        train_a_little(delta)
        return delta

    assert_exact_lifecycle(BUILDERS[family](), attach, out)  # it also checks the backbone's tensors are untouched


@pytest.mark.parametrize("init", DATA_AWARE)
def test_the_checkpoint_keeps_the_starting_factors_and_reloads_exactly(init, tmp_path):
    """The starting factors are what rebuilds the residual from the original backbone: a reload neither
    recomputes them from the weight (pissa_niter_K is randomised) nor needs anything but the original."""
    model = tiny_llama()
    delta = LoraModel(model, modified_modules=PLACES["llama"], lora_r=4, init_lora_weights=init)
    train_a_little(delta)
    tuned = out(model)
    delta.save_finetuned(tmp_path)
    meta = json.loads((tmp_path / "delta_config.json").read_text()) if (tmp_path / "delta_config.json").exists() else None
    other = tiny_llama()
    torch.manual_seed(12345)  # another random stream: a randomised SVD at load would give other factors
    loaded = AutoDeltaModel.from_finetuned(tmp_path, other)
    assert loaded.config.init_lora_weights == init
    assert torch.equal(out(other), tuned)
    for path, layer in loaded.layers.items():
        assert torch.equal(layer.lora_A0, delta.layers[path].lora_A0)
    assert meta is None or meta.get("delta_type", "lora") == "lora"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_data_aware_lora_in_a_mixed_batch_equals_each_row_alone(init):
    def attach(model: nn.Module) -> list[LoraModel]:
        deltas = [LoraModel(model, modified_modules=PLACES["llama"], lora_r=4, init_lora_weights=init, name=f"t{i}") for i in range(2)]
        for i, d in enumerate(deltas):
            train_a_little(d, seed=i + 5)
        return deltas

    assert_mixed_batch_is_each_row_alone(tiny_llama(), attach, [0, -1, 1, 0], out, IDS)


def test_pissa_with_dora_starts_as_the_identity_and_detaches_exactly():
    model = tiny_llama()
    bare = out(model)
    delta = LoraModel(model, modified_modules=PLACES["llama"], lora_r=4, use_dora=True, init_lora_weights="pissa")
    assert torch.equal(out(model), bare)
    train_a_little(delta)
    assert not torch.equal(out(model), bare)
    delta.detach()
    assert torch.equal(out(model), bare)


@pytest.mark.parametrize("bad", ["pisa", "pissa_niter_", "pissa_niter_x", "loftq", 3, None, 1.0])
def test_unknown_initialisations_are_config_errors(bad):
    with pytest.raises(DeltaConfigError, match="init_lora_weights"):
        LoraModel(tiny_llama(), modified_modules=["q_proj"], init_lora_weights=bad)


def test_a_rank_above_the_weight_is_refused_for_pissa_and_leaves_the_model_alone():
    model = tiny_llama()
    before = out(model)
    with pytest.raises(DeltaConfigError, match="lora_r"):
        LoraModel(model, modified_modules=["k_proj"], lora_r=20, init_lora_weights="pissa")  # k_proj is 16 x 32
    assert torch.equal(out(model), before)
    assert not any("lora" in name for name, _ in model.named_modules())


# ------------------------------------------------------------------ PEFT, PEFT as the judge


def _peft_lora(make, targets, **kwargs):
    return peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kwargs))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_our_starting_factors_and_outputs_equal_peft_ones(family, init):
    if init == "olora" and family == "gpt2":
        pytest.skip("PEFT's OLoRA factors a Conv1D weight as stored (in x out) and then fails in forward")
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[family]
    theirs = _peft_lora(BUILDERS[family], targets, init_lora_weights=init)
    model = BUILDERS[family]()
    delta = LoraModel(model, modified_modules=targets, lora_r=4, lora_alpha=8, init_lora_weights=init)
    params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for path, layer in delta.layers.items():
            lora_A, lora_B = params[f"base_model.model.{path}.lora_A.default.weight"], params[f"base_model.model.{path}.lora_B.default.weight"]
            assert torch.equal(lora_A, layer.lora_A0) and torch.equal(lora_B, layer.lora_B0)
            for mine, their in ((layer.lora_A, lora_A), (layer.lora_B, lora_B)):
                their.add_(0.05 * torch.randn(their.shape, generator=g))
                mine.copy_(their)
    assert_within_noise(out(model), out(theirs), float32_noise(model, lambda m, _: out(m)))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("init", DATA_AWARE)
def test_saved_as_peft_a_data_aware_lora_is_a_rank_2r_lora_peft_loads_with_equal_outputs(family, init, tmp_path):
    model = BUILDERS[family]()
    delta = LoraModel(model, modified_modules=PLACES[family], lora_r=4, lora_alpha=8, init_lora_weights=init, use_rslora=True)
    train_a_little(delta)
    expected = out(model)
    delta.save_finetuned(tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    loaded = peft.PeftModel.from_pretrained(BUILDERS[family](), tmp_path)
    assert_within_noise(out(loaded), expected, float32_noise(loaded, lambda m, _: out(m)))
    back = BUILDERS[family]()
    AutoDeltaModel.from_finetuned(tmp_path, back)  # and PEFT's form loads back into us as a plain rank-2r LoRA
    assert_within_noise(out(back), expected, float32_noise(back, lambda m, _: out(m)))


def test_peft_pissa_converted_by_peft_loads_with_equal_outputs(tmp_path):
    """PEFT's own way out of a rewritten base: save_pretrained(path_initial_model_for_weight_conversion=...)."""
    theirs = _peft_lora(tiny_llama, ["q_proj", "v_proj"], init_lora_weights="pissa")
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = True  # as PEFT's docs do before saving the initial adapter
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    expected = out(theirs)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    model = tiny_llama()
    AutoDeltaModel.from_finetuned(tmp_path / "converted", model)
    assert_within_noise(out(model), expected, float32_noise(model, lambda m, _: out(m)))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_peft_pissa_folder_is_refused_naming_the_conversion(init, tmp_path):
    _peft_lora(tiny_llama, ["q_proj"], init_lora_weights=init).save_pretrained(tmp_path)
    model = tiny_llama()
    before = out(model)
    with pytest.raises(PeftFormatError, match="path_initial_model_for_weight_conversion"):
        AutoDeltaModel.from_finetuned(tmp_path, model)
    assert torch.equal(out(model), before)


def test_pissa_with_dora_saved_as_peft_loads_in_peft_with_equal_outputs(tmp_path):
    model = tiny_llama()
    delta = LoraModel(model, modified_modules=PLACES["llama"], lora_r=4, use_dora=True, init_lora_weights="pissa")
    train_a_little(delta)
    expected = out(model)
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].use_dora and loaded.peft_config["default"].r == 8
    assert_within_noise(out(loaded), expected, float32_noise(loaded, lambda m, _: out(m)))
