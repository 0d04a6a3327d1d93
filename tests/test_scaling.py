"""Per-delta scaling at run time: ``h + s * m(h)``, exact at 1.0, per row in mixed batches."""

from __future__ import annotations

import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from support.numerics import assert_changed, assert_within_noise, batching_noise, float32_noise

from opendelta import (
    AdapterModel,
    BitFitModel,
    DeltaConfigError,
    IA3Model,
    LifecycleError,
    LoraModel,
    MixedBatchError,
    PrefixModel,
    SoftPromptModel,
    UnsupportedModuleError,
    mixed_batch,
)

ADDITIVE = [
    pytest.param(lambda m: LoraModel(m, modified_modules=["query", "value"], lora_r=4), id="lora"),
    pytest.param(lambda m: AdapterModel(m, modified_modules=["attention.output.dense"]), id="adapter"),
    pytest.param(lambda m: IA3Model(m, modified_modules=["key", "output.dense"], feedforward_modules=["layer.0.output.dense"]), id="ia3"),
    pytest.param(lambda m: BitFitModel(m, modified_modules=["query", "LayerNorm"]), id="bitfit"),
]


def _inputs(rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    batch = tiny_batch()
    batch.pop("labels")
    return {k: v[rows] for k, v in batch.items()}


def _logits(model, rows: slice = slice(None)) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(rows)).logits


@pytest.mark.parametrize("make", ADDITIVE)
def test_scale_one_is_the_trained_delta_and_scale_zero_the_bare_backbone_bit_for_bit(make):
    model = tiny_bert()
    bare = _logits(model)
    delta = make(model)
    randomize_deltas(delta)
    tuned = _logits(model)
    with delta.scale(1.0):
        assert torch.equal(_logits(model), tuned)
    with delta.scale(0.0):
        assert torch.equal(_logits(model), bare)  # h + 0 * m(h) is h exactly
    assert torch.equal(_logits(model), tuned)
    assert delta.scale_factor == 1.0


def test_a_lora_at_scale_half_equals_the_lora_with_half_its_update():
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    randomize_deltas(delta)
    full = _logits(model)
    with delta.scale(0.5):
        halved = _logits(model)
    with torch.no_grad():
        for layer in delta.layers.values():
            layer.lora_B.mul_(0.5)  # exact: a power of two
    assert_within_noise(halved, _logits(model), float32_noise(model, lambda m, r: m(**_inputs(r)).logits))
    assert_changed(halved, full)


def test_the_scale_persists_until_its_handle_is_removed_once_or_twice():
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], lora_r=4)
    randomize_deltas(delta)
    tuned = _logits(model)
    handle = delta.scale(3.0)
    assert delta.scale_factor == 3.0
    assert_changed(_logits(model), tuned)
    handle.remove()
    handle.remove()
    assert torch.equal(_logits(model), tuned)


def test_merge_refuses_a_scaled_delta_and_scale_refuses_a_merged_one():
    delta = LoraModel(tiny_bert(), modified_modules=["query"], lora_r=4)
    with delta.scale(0.5):
        with pytest.raises(LifecycleError, match="scale"):
            delta.merge()
    delta.merge()
    with pytest.raises(LifecycleError, match="unmerge"):
        delta.scale(0.5)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda m: PrefixModel(m, prefix_token_num=2), id="prefix"),
        pytest.param(lambda m: SoftPromptModel(m, soft_token_num=2), id="soft_prompt"),
    ],
)
def test_deltas_that_rewrite_the_call_cannot_be_scaled(make):
    delta = make(tiny_bert())
    with pytest.raises(UnsupportedModuleError, match="nothing to scale"):
        delta.scale(0.5)
    assert delta.scale_factor == 1.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", True])
def test_a_scale_that_is_not_a_finite_number_is_refused(value):
    delta = LoraModel(tiny_bert(), modified_modules=["query"], lora_r=4)
    with pytest.raises(DeltaConfigError, match="finite number"):
        delta.scale(value)


def test_mixed_batch_scales_each_row_as_that_row_alone():
    model = tiny_bert()
    a = LoraModel(model, modified_modules=["query", "value"], lora_r=4, name="a")
    b = AdapterModel(model, modified_modules=["attention.output.dense"], name="b")
    randomize_deltas(a, seed=1)
    randomize_deltas(b, seed=2)
    rows, scales = [0, 0, 1, -1], [1.0, 0.5, 2.0, 1.0]
    with mixed_batch([a, b], rows, scales=scales):
        mixed = _logits(model)
    noise = batching_noise(model, lambda m, r: m(**_inputs(r)).logits, len(rows))
    deltas = [a, b]
    for d in deltas:
        d.detach()
    for i, (r, s) in enumerate(zip(rows, scales)):
        if r >= 0:
            deltas[r].attach()
            with deltas[r].scale(s):
                alone = _logits(model, slice(i, i + 1))
            deltas[r].detach()
        else:
            alone = _logits(model, slice(i, i + 1))
        assert_within_noise(mixed[i : i + 1], alone, noise)


def test_mixed_batch_rows_at_scale_one_are_exact_and_bad_scales_are_refused():
    model = tiny_bert()
    a = LoraModel(model, modified_modules=["query"], lora_r=4, name="a")
    randomize_deltas(a)
    with mixed_batch([a], [0, 0, 0, 0]):
        plain = _logits(model)
    with mixed_batch([a], [0, 0, 0, 0], scales=[1.0] * 4):
        assert torch.equal(_logits(model), plain)
    with pytest.raises(MixedBatchError, match="finite numbers"):
        with mixed_batch([a], [0, 0, 0, 0], scales=[1.0, 2.0]):
            pass
    p = PrefixModel(model, prefix_token_num=2, name="p")
    with pytest.raises(MixedBatchError, match="nothing to scale|no change to scale"):
        with mixed_batch([a, p], [1, 1, 1, 1], scales=[0.5] * 4):
            pass
