"""LoRA started from the weight (``init_lora_weights`` "pissa", "pissa_niter_K", "olora") on a tiny LLaMA
quantized by bitsandbytes (4-bit NF4 and FP4, 8-bit), torchao (int8 weight-only, NF4) and hqq (4-bit).

The starting factors come from the layer's dequantized weight, and, as on a full-precision layer, the layer
adds ``s (B A - B0 A0)`` beside the packed weight and never re-quantizes a residual: a fresh delta changes
nothing bit for bit, detach leaves every packed byte, and a reload rebuilds the same model from the original
backbone and the saved starting factors (merging one: tests/test_quantized_merge.py)."""

from __future__ import annotations

import pytest
import torch
from support.numerics import assert_within_noise, float32_noise
from support.quantized import (
    IDS, assert_same_packed_state, dense_copy, load_kind, load_quantized, packed_state, perturb, save_tiny_llama
)
from torch import nn
from transformers import LlamaForCausalLM

from opendelta import AutoDeltaModel, LoraModel

#: (kind, LoRA options): each start on several kinds, each kind at least once, and DoRA from a PiSSA start
CASES = [
    ("bnb_4bit", {"init_lora_weights": "pissa"}),
    ("bnb_fp4", {"init_lora_weights": "olora"}),
    ("bnb_8bit", {"init_lora_weights": "pissa_niter_2"}),
    ("torchao_int8", {"init_lora_weights": "olora"}),
    ("torchao_nf4", {"init_lora_weights": "pissa_niter_2"}),
    ("hqq_4bit", {"init_lora_weights": "pissa"}),
    ("bnb_4bit", {"init_lora_weights": "pissa", "use_dora": True}),
]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def load(path: str, kind: str) -> nn.Module:
    if kind == "bnb_fp4":
        pytest.importorskip("bitsandbytes")
        return load_quantized(path, 4, quant_type="fp4")
    return load_kind(path, kind)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def started(model: nn.Module, options: dict) -> LoraModel:
    torch.manual_seed(1)  # pissa_niter_K draws a random start: the same draw on the quantized model and its copy
    return LoraModel(model, lora_r=4, **options)


def case_id(kind: str, options: dict) -> str:
    return "-".join([kind, options["init_lora_weights"], *(name for name in options if name != "init_lora_weights")])


@pytest.mark.parametrize(("kind", "options"), CASES, ids=[case_id(*case) for case in CASES])
def test_a_weight_started_lora_takes_the_dequantized_weights_start_and_detaches_and_reloads_exactly(
    saved_model, tmp_path, kind, options
):
    model = load(saved_model, kind)
    dense = dense_copy(model, LlamaForCausalLM.from_pretrained(saved_model))
    before = packed_state(model)
    bare = logits(model)
    delta, twin = started(model, options), started(dense, options)
    assert torch.equal(logits(model), bare)  # s (B A - B0 A0) is exactly zero at the start
    assert delta.layers.keys() == twin.layers.keys()
    for path, layer in delta.layers.items():  # the factors of the weight the layer multiplies by
        assert torch.equal(layer.lora_A0, twin.layers[path].lora_A0)
        assert torch.equal(layer.lora_B0, twin.layers[path].lora_B0)

    perturb(delta, 0.05)
    tuned = logits(model)
    assert not torch.equal(tuned, bare)
    delta.save_finetuned(tmp_path / "delta")
    delta.detach()
    assert_same_packed_state(model, before)
    assert torch.equal(logits(model), bare)

    other = load(saved_model, kind)
    torch.manual_seed(12345)  # another random stream: a randomised SVD at load would give other factors
    AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=other)
    assert torch.equal(logits(other), tuned)


def test_a_pissa_started_lora_on_4bit_trains_with_the_gradients_of_the_dequantized_dense_model(saved_model):
    """bitsandbytes' 4-bit CPU kernel multiplies by the dequantized weight, so the dense copy computes the
    same outputs (tests/test_quantized.py); the deltas' gradients differ by summation order at most."""
    pytest.importorskip("bitsandbytes")
    model = load(saved_model, "bnb_4bit")
    dense = dense_copy(model, LlamaForCausalLM.from_pretrained(saved_model))
    deltas = [started(m, {"init_lora_weights": "pissa"}) for m in (model, dense)]
    for delta, m in zip(deltas, (model, dense)):
        perturb(delta, 0.05)
        delta.freeze_module(exclude=["deltas"], set_state_dict=False)
        m(input_ids=IDS).logits.pow(2).mean().backward()
    grads = [[p.grad for p in d.delta_parameters()] for d in deltas]
    assert grads[0] and all(g is not None for g in grads[0])
    for q, d in zip(*grads):
        assert (q - d).abs().max() <= 2e-6 * d.abs().max().clamp_min(1e-30)


def test_saved_as_peft_a_pissa_lora_on_4bit_loads_in_peft_onto_the_4bit_model_with_equal_outputs(saved_model, tmp_path):
    """PEFT's format holds such a LoRA as PEFT's converted rank-2r LoRA on the original weights, which PEFT puts
    beside the same quantized layers."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    model = load(saved_model, "bnb_4bit")
    noise = float32_noise(dense_copy(model, LlamaForCausalLM.from_pretrained(saved_model)), lambda m, _: logits(m))
    delta = started(model, {"init_lora_weights": "pissa"})
    perturb(delta, 0.05)
    expected = logits(model)
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(load(saved_model, "bnb_4bit"), tmp_path)
    assert loaded.peft_config["default"].r == 8
    assert_within_noise(logits(loaded), expected, noise)
