"""Deltas on torchao-quantized (int8 weight-only, NF4) and hqq (``HQQLinear``, by direct replacement)
linear layers of a tiny LLaMA, on CPU: every linear-layer method trains with the gradients of a dense
copy built from the dequantized weights, and detaching leaves every packed byte as it was (merging
into them: tests/test_quantized_merge.py)."""

from __future__ import annotations

import pytest
import torch
from support.families import fresh
from support.methods import METHODS
from support import quantized as quantized_support
from support.quantized import packed_state as packed
from support.quantized import replace_linears
from torch import nn

from opendelta import AutoDeltaConfig, AutoDeltaModel

IDS = torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 4]])
LINEAR_METHODS = ["lora", "ia3", "bitfit", "adapter", "parallel_adapter", "low_rank_adapter", "compacter", "prefix"]


def torchao_int8() -> nn.Module:
    quantization = pytest.importorskip("torchao.quantization")
    model = fresh("llama")
    quantization.quantize_(model.model, quantization.Int8WeightOnlyConfig())
    return model.eval()


def torchao_nf4() -> nn.Module:
    quantization = pytest.importorskip("torchao.quantization")

    def nf4(linear: nn.Linear) -> nn.Linear:
        linear.weight = nn.Parameter(quantization.to_nf4(linear.weight.data, 32, 16), requires_grad=False)
        return linear

    return replace_linears(fresh("llama"), nf4)


def hqq_4bit() -> nn.Module:
    hqq = pytest.importorskip("hqq.core.quantize")
    config = hqq.BaseQuantizeConfig(nbits=4, group_size=16)
    return replace_linears(
        fresh("llama"), lambda linear: hqq.HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
    )


KINDS = {"torchao_int8": torchao_int8, "torchao_nf4": torchao_nf4, "hqq_4bit": hqq_4bit}


def dense_copy(model: nn.Module) -> nn.Module:
    """A fresh copy of the same tiny LLaMA with the quantized layers' dequantized weights (torchao's NF4
    tensors cannot be deep-copied)."""
    return quantized_support.dense_copy(model, fresh("llama"))


def build(model: nn.Module, delta_type: str):
    torch.manual_seed(1)
    config = AutoDeltaConfig.from_dict({"delta_type": delta_type, **METHODS[delta_type].small})
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    delta.freeze_module(exclude=["deltas"], set_state_dict=False)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a fresh LoRA is zero: perturb so every factor gets a gradient
        for p in delta.delta_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return delta


def _input_grad(model: nn.Module) -> torch.Tensor:
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.pow(2).mean().backward()
    return embeds.grad


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("delta_type", LINEAR_METHODS)
def test_every_method_trains_with_the_dense_gradients_and_detaches_to_the_same_bytes(kind, delta_type):
    model = KINDS[kind]()
    dense = dense_copy(model)
    # the kernels' own difference: the bare models' input gradients (same weights, other summation order)
    floor = _relative(_input_grad(model), _input_grad(dense))
    before = packed(model)
    with torch.no_grad():
        bare = model(input_ids=IDS).logits
    deltas = [build(m, delta_type) for m in (model, dense)]
    for m in (model, dense):
        m(input_ids=IDS).logits.pow(2).mean().backward()
    pairs = list(zip(deltas[0].delta_parameters(), deltas[1].delta_parameters()))
    assert pairs and all(q.grad is not None for q, _ in pairs)
    for q, d in pairs:
        assert _relative(q.grad, d.grad) <= max(2e-6, 4 * floor)
    deltas[0].detach()
    after = packed(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, bare)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lora_on_a_torchao_or_hqq_model_saves_and_reloads_exactly(kind, tmp_path):
    model = KINDS[kind]()
    delta = build(model, "lora")
    with torch.no_grad():
        tuned = model(input_ids=IDS).logits
    delta.save_finetuned(tmp_path)
    other = KINDS[kind]()
    AutoDeltaModel.from_finetuned(tmp_path, other)
    with torch.no_grad():
        assert torch.equal(other(input_ids=IDS).logits, tuned)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_dora_reads_the_dequantized_weight_and_gets_the_dense_gradients(kind):
    model = KINDS[kind]()
    dense = dense_copy(model)
    floor = _relative(_input_grad(model), _input_grad(dense))
    deltas = []
    for m in (model, dense):
        torch.manual_seed(1)
        delta = AutoDeltaModel.from_config({"delta_type": "lora", "use_dora": True}, backbone_model=m)
        delta.freeze_module(exclude=["deltas"], set_state_dict=False)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in delta.delta_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        m(input_ids=IDS).logits.pow(2).mean().backward()
        deltas.append(delta)
    for q, d in zip(deltas[0].delta_parameters(), deltas[1].delta_parameters()):
        assert _relative(q.grad, d.grad) <= max(2e-6, 4 * floor)
