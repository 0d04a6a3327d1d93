"""LoRA's fused, in-place accumulation: same values and gradients as the plain equation, on every path."""

from __future__ import annotations

import torch
from torch import nn

from opendelta import LoraModel


def _lora_linear(seed: int = 0) -> tuple[nn.Linear, LoraModel]:
    torch.manual_seed(seed)
    holder = nn.Sequential(nn.Linear(8, 6))
    delta = LoraModel(holder, modified_modules=["0"], lora_r=2, lora_alpha=6)
    delta.freeze_module(exclude=["deltas"])
    with torch.no_grad():
        delta.layers["0"].lora_B.normal_()
    return holder, delta


def _reference(holder: nn.Sequential, delta: LoraModel, x: torch.Tensor) -> torch.Tensor:
    layer, linear = delta.layers["0"], holder[0]
    return x @ linear.weight.T + linear.bias + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)


def test_three_dimensional_input_gives_the_equations_output_and_gradients():
    holder, delta = _lora_linear()
    layer = delta.layers["0"]
    x = torch.randn(3, 5, 8, requires_grad=True)
    upstream = torch.randn(3, 5, 6)
    out = holder(x)
    grads = torch.autograd.grad(out, [x, layer.lora_A, layer.lora_B], upstream)
    ref = _reference(holder, delta, x)
    ref_grads = torch.autograd.grad(ref, [x, layer.lora_A, layer.lora_B], upstream)
    assert torch.allclose(out, ref, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_no_grad_and_inference_mode_give_the_training_path_values():
    holder, delta = _lora_linear()
    x = torch.randn(4, 7, 8)
    with_grad = holder(x)
    with torch.no_grad():
        without = holder(x)
    with torch.inference_mode():
        inference = holder(x)
    assert torch.equal(with_grad, without) and torch.equal(without, inference)


def test_an_unbatched_input_and_a_two_dimensional_input_work():
    holder, delta = _lora_linear()
    for x in (torch.randn(8), torch.randn(5, 8)):
        assert torch.allclose(holder(x), _reference(holder, delta, x), atol=1e-5)


def test_route_parallel_on_a_non_contiguous_output_adds_without_touching_it():
    _, delta = _lora_linear()
    layer = delta.layers["0"]
    h_in = torch.randn(5, 8)
    h_out = torch.randn(6, 5).T  # a transposed view: not the memory of a fresh matrix product
    before = h_out.clone()
    combined = layer.route_parallel(h_in, h_out)
    assert torch.allclose(combined, before + 3.0 * (h_in @ layer.lora_A.T @ layer.lora_B.T), atol=1e-5)
    assert torch.equal(h_out, before)


def test_bf16_autocast_output_keeps_the_autocast_dtype():
    holder, delta = _lora_linear()
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = holder(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), _reference(holder, delta, x), atol=0.1)
