"""Deltas on a bitsandbytes-quantized backbone (QLoRA): tiny LLaMA loaded through transformers'
BitsAndBytesConfig in 4-bit NF4 and 8-bit, on CPU.

Each method trains with the gradients it gets on a dense copy built from the dequantized weights,
detaches leaving every packed byte as it was, saves and reloads (merging: tests/test_quantized_merge.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu  # noqa: E402
import support.quantized as quantized_support  # noqa: E402
from support.quantized import IDS, load_quantized, save_tiny_llama  # noqa: E402

from opendelta import AutoDeltaConfig, AutoDeltaModel  # noqa: E402
from opendelta.errors import UnsupportedModuleError  # noqa: E402
from opendelta.quantized import is_4bit, unpack_cpu_repacked  # noqa: E402

#: every method that acts on linear layers or around them, at small sizes for hidden 64
METHODS = {
    "lora": {}, "ia3": {}, "bitfit": {}, "adapter": {"bottleneck_dim": 8}, "parallel_adapter": {"bottleneck_dim": 8},
    "low_rank_adapter": {"reduction_factor": 8}, "compacter": {"reduction_factor": 8}, "prefix": {"prefix_token_num": 3},
}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def load(path: str, bits: int) -> nn.Module:
    return load_quantized(path, bits)


def dense_copy(model: nn.Module) -> nn.Module:
    """The same model with every quantized layer replaced by an nn.Linear holding its dequantized weight."""
    return quantized_support.dense_copy(model, copy.deepcopy(model)).train(model.training)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model, the packed quantized bytes and quantization statistics included."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def build(model: nn.Module, delta_type: str):
    config = AutoDeltaConfig.from_dict({"delta_type": delta_type, **METHODS[delta_type]})
    torch.manual_seed(1)
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    delta.freeze_module(exclude=["deltas"], set_state_dict=False)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a freshly built LoRA is zero: perturb so every factor gets a gradient
        for p in delta.delta_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return delta


def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("delta_type", sorted(METHODS))
def test_every_method_trains_with_the_gradients_of_the_dequantized_dense_model(saved_model, bits, delta_type):
    """8-bit in training mode: bitsandbytes' 8-bit CPU kernel then multiplies by the dequantized weight (in
    eval mode it quantizes the inputs to int8 too). The tiny LLaMA has no dropout: both modes compute the same."""
    model = load(saved_model, bits).train(bits == 8)
    dense = dense_copy(model)
    with torch.no_grad():
        assert torch.equal(logits(model), logits(dense))  # the CPU kernels multiply by the dequantized weight
    deltas = [build(m, delta_type) for m in (model, dense)]
    for m in (model, dense):
        logits(m).pow(2).mean().backward()
    grads = [[p.grad for p in d.delta_parameters()] for d in deltas]
    assert grads[0] and all(g is not None for g in grads[0])
    for q, d in zip(*grads):
        # the issue's bound: both sides multiply by identical weights, only the kernels' summation order may differ
        assert (q - d).abs().max() <= 2e-6 * d.abs().max().clamp_min(1e-30)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("delta_type", sorted(METHODS))
def test_detach_leaves_every_packed_byte_and_reload_reproduces_the_outputs(saved_model, tmp_path, bits, delta_type):
    model = load(saved_model, bits)
    before = state(model)
    with torch.no_grad():
        bare = logits(model)
    delta = build(model, delta_type)
    with torch.no_grad():
        tuned = logits(model)
    assert not torch.equal(tuned, bare)
    delta.save_finetuned(tmp_path / "delta")
    delta.detach()
    assert_same_state(model, before)
    with torch.no_grad():
        assert torch.equal(logits(model), bare)
    other = load(saved_model, bits)
    AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=other)
    with torch.no_grad():
        assert torch.equal(logits(other), tuned)


def test_no_forward_of_ours_or_later_repacks_a_4bit_weight_so_gradients_stay_exact(saved_model):
    """bitsandbytes repacks a 4-bit weight the first time an eval no-grad forward runs on a CPU with
    AVX512-BF16, after which backward through it is silently wrong. Tell every layer the CPU has
    the instruction set: construction's dummy pass and a later eval forward must not repack."""
    model = load(saved_model, 4)
    reference = dense_copy(model)
    layers = [m for m in model.modules() if is_4bit(m)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    delta = build(model, "lora")
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
    with torch.no_grad():  # the forward that repacks on such a CPU
        logits(model)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    dense_delta = build(reference, "lora")
    for m in (model, reference):
        logits(m).pow(2).mean().backward()
    for q, d in zip(delta.delta_parameters(), dense_delta.delta_parameters()):
        assert (q.grad - d.grad).abs().max() <= 2e-6 * d.grad.abs().max()


def test_a_weight_already_repacked_is_a_typed_error_and_unpacking_it_is_one_call(saved_model):
    model = load(saved_model, 4)
    first = next(m for m in model.modules() if is_4bit(m))
    first.weight.data, first.weight.quant_state = _convert_weight_packed_for_cpu(first.weight.data, first.weight.quant_state)
    # (state_dict() would unpack it: bitsandbytes converts back when saving)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    packed_state = first.weight.quant_state
    with pytest.raises(UnsupportedModuleError, match="repacked 1 4-bit weight"):
        build(model, "lora")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and len(before) == len(list(model.parameters()))
    assert first.weight.quant_state is packed_state
    assert unpack_cpu_repacked(model) == ["model.layers.0.self_attn.q_proj"]
    reference = dense_copy(model)  # the weights as they are now (bf16-rounded block scales)
    deltas = [build(m, "lora") for m in (model, reference)]
    for m in (model, reference):
        logits(m).pow(2).mean().backward()
    for q, d in zip(deltas[0].delta_parameters(), deltas[1].delta_parameters()):
        assert (q.grad - d.grad).abs().max() <= 2e-6 * d.grad.abs().max()


def _dora(model: nn.Module):
    return quantized_support.perturbed(model, {"delta_type": "lora", "use_dora": True}, 0.05)


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_trains_with_the_dense_gradients_and_merges_back_to_the_same_bytes(saved_model, bits):
    """In training mode: bitsandbytes' 8-bit CPU kernel then multiplies by the dequantized weight (in eval
    mode it quantizes the inputs to int8 too, so gradients are those of that kernel, not the dense ones)."""
    model = load(saved_model, bits).train()  # the tiny LLaMA has no dropout: training mode computes the same
    dense = dense_copy(model)
    before = state(model)
    deltas = [_dora(m) for m in (model, dense)]
    for m in (model, dense):
        logits(m).pow(2).mean().backward()
    for q, d in zip(deltas[0].delta_parameters(), deltas[1].delta_parameters()):
        assert q.dtype == torch.float32 and (q.grad - d.grad).abs().max() <= 2e-6 * d.grad.abs().max().clamp_min(1e-30)
    with torch.no_grad():
        unmerged = logits(model)
    deltas[0].merge()
    deltas[0].unmerge()
    with torch.no_grad():
        assert torch.equal(logits(model), unmerged)  # the norm kept for the old weight was recomputed, then equal
    deltas[0].detach()
    assert_same_state(model, before)
