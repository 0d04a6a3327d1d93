"""Mixed precision: deltas take the dtype of the weight they act on and compute in it (no fp32 upcast)."""

from __future__ import annotations

import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert

from opendelta import LoraModel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deltas_on_a_half_precision_backbone_are_created_and_run_in_its_dtype(dtype):
    model = tiny_bert().to(dtype)
    delta = LoraModel(model, modified_modules=["query", "value"])
    randomize_deltas(delta)
    seen = []
    for path in delta.layers:  # what flows into and out of each LoRA-modified linear layer
        model.get_submodule(path).register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))

    logits = model(**{k: v for k, v in tiny_batch().items() if k != "labels"}).logits

    assert {p.dtype for p in delta.delta_parameters()} == {dtype}
    assert set(seen) == {(dtype, dtype)} and len(seen) == 4
    assert logits.dtype == dtype


def test_bf16_training_step_gives_finite_bf16_gradients_to_the_deltas_only():
    model = tiny_bert().to(torch.bfloat16).train()
    delta = LoraModel(model, modified_modules=["query", "value"])
    delta.freeze_module(exclude=["deltas"])
    randomize_deltas(delta)
    optimizer = torch.optim.AdamW(delta.delta_parameters(), lr=1e-2)
    before = [p.detach().clone() for p in delta.delta_parameters()]

    model(**tiny_batch()).loss.backward()
    optimizer.step()

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(before) == 8
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    assert any(not torch.equal(a, b) for a, b in zip(before, delta.delta_parameters()))


def test_bf16_checkpoint_keeps_bf16_and_reloads_exactly(tmp_path):
    model = tiny_bert().to(torch.bfloat16)
    delta = LoraModel(model)
    randomize_deltas(delta)
    inputs = {k: v for k, v in tiny_batch().items() if k != "labels"}
    expected = model(**inputs).logits
    delta.save_finetuned(tmp_path)

    fresh = tiny_bert().to(torch.bfloat16)
    loaded = LoraModel.from_finetuned(tmp_path, fresh)
    assert {p.dtype for p in loaded.delta_parameters()} == {torch.bfloat16}
    assert torch.equal(fresh(**inputs).logits, expected)


def test_autocast_over_an_fp32_backbone_keeps_fp32_delta_weights():
    model = tiny_bert().train()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**tiny_batch()).loss
    loss.backward()
    assert {p.dtype for p in delta.delta_parameters()} == {torch.float32}
    assert {p.grad.dtype for p in delta.delta_parameters()} == {torch.float32}
