"""The precision policy (opendelta.precision): deltas beside a float16/bfloat16 backbone are kept in
float32 and compute in it, while the backbone's hidden states keep its dtype; ``delta_dtype="weight"``
keeps them in the backbone's dtype. On a float32 backbone nothing changes."""

from __future__ import annotations

import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from support.families import fresh
from support.methods import METHODS

from opendelta import AutoDeltaConfig, AutoDeltaModel, LoraModel
from opendelta.errors import DeltaConfigError

IDS = torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 4]])
HALF = [torch.bfloat16, torch.float16]


def _delta(model, delta_type, **extra):
    config = AutoDeltaConfig.from_dict({"delta_type": delta_type, **METHODS[delta_type].small, **extra})
    return AutoDeltaModel.from_config(config, backbone_model=model)


def _seen_dtypes(model, paths):
    """Record the dtypes flowing into and out of the modules at `paths` (a list filled by forwards)."""
    seen = []
    for path in paths:
        model.get_submodule(path).register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    return seen


@pytest.mark.parametrize("dtype", HALF)
def test_deltas_on_a_half_precision_backbone_are_float32_and_the_hidden_states_keep_the_backbone_dtype(dtype):
    model = tiny_bert().to(dtype)
    delta = LoraModel(model, modified_modules=["query", "value"])
    randomize_deltas(delta)
    seen = _seen_dtypes(model, delta.layers)

    logits = model(**{k: v for k, v in tiny_batch().items() if k != "labels"}).logits

    assert {p.dtype for p in delta.delta_parameters()} == {torch.float32}
    assert set(seen) == {(dtype, dtype)} and len(seen) == 4
    assert logits.dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
def test_delta_dtype_weight_keeps_the_deltas_in_the_backbone_dtype(dtype):
    model = tiny_bert().to(dtype)
    delta = LoraModel(model, modified_modules=["query", "value"], delta_dtype="weight")
    randomize_deltas(delta)
    seen = _seen_dtypes(model, delta.layers)

    logits = model(**{k: v for k, v in tiny_batch().items() if k != "labels"}).logits

    assert {p.dtype for p in delta.delta_parameters()} == {dtype}
    assert set(seen) == {(dtype, dtype)} and logits.dtype == dtype


def test_an_unknown_delta_dtype_is_a_config_error_naming_the_choices():
    with pytest.raises(DeltaConfigError, match="delta_dtype") as info:
        LoraModel(tiny_bert(), delta_dtype="float64")
    assert "weight" in str(info.value)


def test_a_float32_backbone_is_untouched_by_the_policy():
    model = tiny_bert()
    delta = LoraModel(model)
    assert {p.dtype for p in delta.delta_parameters()} == {torch.float32}
    assert not any(layer.in_own_precision for layer in delta.layers.values())


@pytest.mark.parametrize("delta_type", sorted(METHODS))
def test_every_method_trains_on_a_float16_llama_with_grad_scaler_and_detaches_exactly(delta_type):
    model = fresh("llama", torch.float16).train()
    bare = model(input_ids=IDS).logits
    delta = _delta(model, delta_type)
    delta.freeze_module(exclude=["deltas"])
    if METHODS[delta_type].fresh_is_identity:  # a fresh delta computed in float32 and cast back changes nothing
        assert torch.equal(model(input_ids=IDS).logits, bare)
    params = delta.delta_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")

    for _ in range(2):
        optimizer.zero_grad()
        scaler.scale(model(input_ids=IDS, labels=IDS).loss).backward()
        scaler.step(optimizer)  # unscaling float16 gradients would raise ValueError
        scaler.update()

    assert {p.dtype for p in params} == {torch.float32}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert all(p.grad is None for p in model.parameters() if not any(p is q for q in params))
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    assert model(input_ids=IDS).logits.dtype == torch.float16
    delta.detach()
    assert torch.equal(model(input_ids=IDS).logits, bare)


def test_bf16_autocast_on_a_bf16_backbone_trains_float32_deltas():
    model = fresh("llama", torch.bfloat16).train()
    delta = _delta(model, "lora")
    delta.freeze_module(exclude=["deltas"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert {p.grad.dtype for p in delta.delta_parameters()} == {torch.float32}
    assert all(torch.isfinite(p.grad).all() for p in delta.delta_parameters())


def test_autocast_over_an_fp32_backbone_keeps_fp32_delta_weights():
    model = tiny_bert().train()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**tiny_batch()).loss
    loss.backward()
    assert {p.dtype for p in delta.delta_parameters()} == {torch.float32}
    assert {p.grad.dtype for p in delta.delta_parameters()} == {torch.float32}


@pytest.mark.parametrize(("delta_dtype", "saved"), [("float32", torch.float32), ("weight", torch.bfloat16)])
def test_deltas_on_a_bf16_backbone_save_in_their_delta_dtype_and_reload_exactly(delta_dtype, saved, tmp_path):
    model = tiny_bert().to(torch.bfloat16)
    delta = LoraModel(model, delta_dtype=delta_dtype)
    randomize_deltas(delta)
    inputs = {k: v for k, v in tiny_batch().items() if k != "labels"}
    expected = model(**inputs).logits
    delta.save_finetuned(tmp_path)

    fresh_model = tiny_bert().to(torch.bfloat16)
    loaded = LoraModel.from_finetuned(tmp_path, fresh_model)
    assert {p.dtype for p in loaded.delta_parameters()} == {saved}
    assert torch.equal(fresh_model(**inputs).logits, expected)


def test_deltas_follow_a_later_half_cast_of_the_model_and_still_run():
    model = tiny_bert()
    delta = LoraModel(model)
    randomize_deltas(delta)
    model.half()  # the layers are the model's children: they go to float16 with it
    logits = model(**{k: v for k, v in tiny_batch().items() if k != "labels"}).logits
    assert {p.dtype for p in delta.delta_parameters()} == {torch.float16} and logits.dtype == torch.float16
