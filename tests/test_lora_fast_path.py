"""LoRA's fused, in-place accumulation: same values and gradients as the plain equation, on every path."""

from __future__ import annotations

import torch
from support.numerics import assert_within_noise, max_abs_diff
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


def _reference(holder: nn.Sequential, delta: LoraModel, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The plain equation, unfused, computed in `dtype` (float64: exact enough to measure float32 rounding)."""
    layer, linear = delta.layers["0"], holder[0]
    weight, bias, a, b = (t.to(dtype) for t in (linear.weight, linear.bias, layer.lora_A, layer.lora_B))
    x = x.to(dtype)
    return x @ weight.T + bias + 3.0 * (x @ a.T @ b.T)


def _assert_equation(got: torch.Tensor, holder: nn.Sequential, delta: LoraModel, x: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> None:
    """`got` lies as close to the exact equation as the plain equation computed in `dtype` does (times MARGIN)."""
    exact = _reference(holder, delta, x, torch.float64)
    assert_within_noise(got, exact, max_abs_diff(_reference(holder, delta, x, dtype), exact))


def test_three_dimensional_input_gives_the_equations_output_and_gradients():
    holder, delta = _lora_linear()
    layer = delta.layers["0"]
    x = torch.randn(3, 5, 8, requires_grad=True)
    upstream = torch.randn(3, 5, 6)
    out = holder(x)
    grads = torch.autograd.grad(out, [x, layer.lora_A, layer.lora_B], upstream)
    _assert_equation(out, holder, delta, x)
    for dtype in (torch.float32, torch.float64):  # gradients of the plain equation: float32 ones and exact ones
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, layer.lora_A, layer.lora_B)]
        weight, bias = holder[0].weight.to(dtype), holder[0].bias.to(dtype)
        ref = leaves[0] @ weight.T + bias + 3.0 * (leaves[0] @ leaves[1].T @ leaves[2].T)
        ref_grads = torch.autograd.grad(ref, leaves, upstream.to(dtype))
        if dtype == torch.float32:
            plain = ref_grads
    for got, low, exact in zip(grads, plain, ref_grads, strict=True):
        assert_within_noise(got, exact, max_abs_diff(low, exact))


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
        _assert_equation(holder(x), holder, delta, x)


def test_route_parallel_on_a_non_contiguous_output_adds_without_touching_it():
    _, delta = _lora_linear()
    layer = delta.layers["0"]
    h_in = torch.randn(5, 8)
    h_out = torch.randn(6, 5).T  # a transposed view: not the memory of a fresh matrix product
    before = h_out.clone()
    combined = layer.route_parallel(h_in, h_out)
    exact = before.double() + 3.0 * (h_in.double() @ layer.lora_A.double().T @ layer.lora_B.double().T)
    plain = before + 3.0 * (h_in @ layer.lora_A.T @ layer.lora_B.T)
    assert_within_noise(combined, exact, max_abs_diff(plain, exact))
    assert torch.equal(h_out, before)


def test_bf16_autocast_output_keeps_the_autocast_dtype():
    holder, delta = _lora_linear()
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = holder(x)
    assert out.dtype == torch.bfloat16
    _assert_equation(out, holder, delta, x, torch.bfloat16)
