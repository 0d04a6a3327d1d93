"""Tolerances measured on the machine that runs the tests, never constants tuned to one CPU.

Two computations that are equal in exact arithmetic but ordered differently (a batch vs each row alone,
SDPA vs eager attention, a fused vs an unfused path) differ by float rounding, and by how much depends on
the CPU's kernels: 1e-4 held on one machine and 4e-4 came out on another. So each test measures the
rounding noise of a reference it cannot break (the bare backbone batched vs row by row, and the same
forward in float32 vs float64) and allows the path under test a fixed multiple of that measurement.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

#: Two float32 evaluations of the same math each lie within about the measured noise of the exact result,
#: so they differ by up to about twice it; the deltas add their own reordered products on top, another
#: factor of two. A real routing or math error (a row getting another task's delta, a wrong scale) moves
#: outputs by orders of magnitude more, which the tests that use this check by their own assertions.
MARGIN = 4.0

#: forward(model, rows) -> the model's main output for the rows `rows` of the test's inputs
Forward = Callable[[nn.Module, slice], torch.Tensor]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def batching_noise(model: nn.Module, forward: Forward, rows: int) -> float:
    """How far the model's batched output lies from each row run alone (its own batching noise here)."""
    with torch.no_grad():
        batched = forward(model, slice(None))
        alone = torch.cat([forward(model, slice(i, i + 1)) for i in range(rows)])
    return max_abs_diff(batched, alone)


def float32_noise(model: nn.Module, forward: Forward, rows: slice = slice(None)) -> float:
    """How far the model's float32 output lies from the same forward on a float64 copy (its rounding here)."""
    with torch.no_grad():
        low = forward(model, rows)
        exact = forward(copy.deepcopy(model).double(), rows)
    return max_abs_diff(low, exact)


def noise_bound(like: torch.Tensor, *noises: float) -> float:
    """MARGIN times the largest measured noise, and never below one float step at the output's magnitude."""
    floor = torch.finfo(like.dtype).eps * like.abs().max().item()
    return MARGIN * max((floor, *noises))


def assert_within_noise(got: torch.Tensor, want: torch.Tensor, *noises: float) -> None:
    """`got` equals `want` up to MARGIN times the measured rounding noise `noises` of a reference path."""
    assert got.shape == want.shape, (got.shape, want.shape)
    coarser = got if torch.finfo(got.dtype).eps > torch.finfo(want.dtype).eps else want  # e.g. float32 vs exact
    bound = noise_bound(coarser, *noises)
    diff = max_abs_diff(got, want)
    assert diff <= bound, f"max |difference| {diff:.3g} > {bound:.3g} ({MARGIN} x measured noise {max((0.0, *noises)):.3g})"


def assert_changed(after: torch.Tensor, before: torch.Tensor, *noises: float) -> None:
    """`after` moved away from `before` by more than rounding could explain (see `noise_bound`)."""
    bound = noise_bound(before, *noises)
    diff = max_abs_diff(after, before)
    assert diff > bound, f"the output moved by {diff:.3g}, within rounding ({bound:.3g}): the change is invisible"


def random_direction(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Seeded Gaussian noise shaped like `like`: a perturbation no normalisation cancels, unlike a uniform
    shift (which a LayerNorm removes entirely)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=generator).to(like)


def perturbed_delta(delta, seed: int, size: float = 0.2):
    """`delta` with `size` * N(0, 1) noise (from `seed`, drawn in each parameter's dtype) added to every delta
    parameter, so a fresh delta (LoRA's zero B) changes the outputs; returns it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(size * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return delta
