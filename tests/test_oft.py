"""OFT: the rotation and its options as PEFT computes them, exact merge/unmerge, PEFT's format both ways
(mixed batches: tests/test_multitask.py runs every method of the table on LLaMA, GPT-2 and BERT)."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas
from support.numerics import assert_changed, assert_within_noise
from support.three_families import FAMILIES, IDS, LINEARS, fresh, noise, out, perturb_trainable

from opendelta import AutoDeltaModel, DeltaConfigError, OftModel, PeftFormatError, UnsupportedModuleError

#: option sets PEFT's OFT has, each checked against PEFT (block size 8: four blocks on hidden 32)
VARIANTS = {
    "neumann": {"oft_block_size": 8},
    "exact_cayley": {"oft_block_size": 8, "use_cayley_neumann": False},
    "block_share": {"oft_block_size": 8, "block_share": True},
    "r_blocks": {"r": 2, "oft_block_size": 0, "num_cayley_neumann_terms": 7},
    "coft": {"oft_block_size": 8, "coft": True, "eps": 0.05},
}


def oft(model, family: str, **kwargs) -> OftModel:
    return OftModel(model, modified_modules=LINEARS[family], **{"oft_block_size": 8, **kwargs})


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_oft_changes_nothing_and_a_trained_one_detaches_bit_for_bit(family):
    model = fresh(family)
    original = out(model)
    delta = oft(model, family)
    assert torch.equal(out(model), original)
    randomize_deltas(delta)
    assert_changed(out(model), original)
    delta.detach()
    assert torch.equal(out(model), original)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_folds_the_rotation_into_the_weight_and_unmerge_restores_it_bit_for_bit(family):
    model = fresh(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    delta = oft(model, family)
    randomize_deltas(delta)
    tuned = out(model)
    delta.merge()
    assert_within_noise(out(model), tuned, noise(model))
    delta.unmerge()
    assert torch.equal(out(model), tuned)
    delta.detach()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_exact_cayley_rotations_are_orthogonal():
    delta = oft(fresh("llama"), "llama", use_cayley_neumann=False)
    randomize_deltas(delta)
    for layer in delta.layers.values():
        r = layer.matrix().double()
        assert torch.allclose(r @ r.T, torch.eye(r.shape[0], dtype=torch.float64), atol=1e-5)


def test_coft_keeps_each_block_within_its_radius():
    delta = oft(fresh("llama"), "llama", coft=True, eps=1e-3)
    randomize_deltas(delta)  # far outside the radius
    out(delta.backbone_model)
    for layer in delta.layers.values():
        norms = torch.linalg.matrix_norm(layer.skew(layer.oft_R))
        assert (norms <= 1e-3 / layer.count**0.5 * (1 + 1e-5)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_rotations(family):
    model = fresh(family).train()
    delta = oft(model, family)
    randomize_deltas(delta)
    delta.freeze_module()
    model(input_ids=IDS)[0].float().pow(2).sum().backward()
    ids = {id(p) for p in delta.delta_parameters()}
    assert all((p.grad is not None) == (id(p) in ids) for p in model.parameters())



#: every variant on LLaMA, the default one on BERT too (a post-norm encoder)
PEFT_CASES = [*(("llama", v) for v in VARIANTS), ("bert", "neumann")]


@pytest.mark.parametrize("family, variant", PEFT_CASES)
def test_saved_as_peft_loads_in_peft_with_equal_outputs(family, variant, tmp_path):
    model = fresh(family)
    delta = oft(model, family, **VARIANTS[variant])
    randomize_deltas(delta)
    expected = out(model)
    delta.save_finetuned(tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "OFT"
    loaded = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    assert_within_noise(out(loaded), expected, noise(model))
    delta.detach()
    assert_changed(expected, out(model))


@pytest.mark.parametrize("family, variant", [c for c in PEFT_CASES if c[1] != "coft"])
def test_a_peft_oft_folder_loads_with_equal_outputs(family, variant, tmp_path):
    options = {k: v for k, v in VARIANTS[variant].items()}
    made = peft.get_peft_model(fresh(family), peft.OFTConfig(target_modules=LINEARS[family], **options))
    perturb_trainable(made, std=0.1)
    made.eval()
    expected = out(made)
    made.save_pretrained(tmp_path)
    model = fresh(family)
    delta = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert isinstance(delta, OftModel) and delta.config.block_share == options.get("block_share", False)
    assert_within_noise(out(model), expected, noise(model))
    assert_changed(expected, out(fresh(family)))


def test_peft_format_refuses_gpt2_conv1d_which_peft_oft_does_not_take(tmp_path):
    delta = oft(fresh("gpt2"), "gpt2")
    with pytest.raises(PeftFormatError, match="Conv1D"):
        delta.save_finetuned(tmp_path, format="peft")


def test_block_size_that_does_not_divide_the_input_is_adjusted_as_peft_does():
    with pytest.warns(UserWarning, match="using 8"):
        delta = OftModel(fresh("llama"), modified_modules=["q_proj"], oft_block_size=7)
    assert {layer.block for layer in delta.layers.values()} == {8}


@pytest.mark.parametrize(
    "args, match",
    [
        ({"r": 4, "oft_block_size": 8}, "exactly one of r"),
        ({"r": 0, "oft_block_size": 0}, "exactly one of r"),
        ({"module_dropout": 0.1}, "module_dropout"),
        ({"eps": 0}, "eps"),
        ({"num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms"),
    ],
)
def test_bad_options_are_config_errors_and_leave_the_model_unchanged(args, match):
    model = fresh("llama")
    with pytest.raises(DeltaConfigError, match=match):
        OftModel(model, modified_modules=["q_proj"], **args)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_non_linear_module_is_refused():
    with warnings.catch_warnings(), pytest.raises(UnsupportedModuleError, match="linear"):
        OftModel(fresh("llama"), modified_modules=["input_layernorm"])  # embeddings and convolutions are taken
