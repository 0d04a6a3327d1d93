"""The exact lifecycle every weight-changing delta keeps (merge, unmerge, detach, re-attach), checked one way
for LoRA and its inits, DoRA, VeRA, LoHa and LoKr."""

from __future__ import annotations

from collections.abc import Callable

import torch
from support.numerics import assert_changed, assert_within_noise, float32_noise
from torch import nn

from opendelta import DeltaBase


def assert_exact_lifecycle(
    model: nn.Module, attach: Callable[[nn.Module], DeltaBase], forward: Callable[[nn.Module], torch.Tensor]
) -> None:
    """`attach(model)` adds a delta with non-zero values; then: the outputs change but no backbone tensor does,
    unmerge undoes merge bit for bit, merged outputs lie within float32 noise of unmerged ones, detach (even
    while merged) restores the bare model bit for bit, and attaching again brings the tuned outputs back exactly."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bare = forward(model)
    delta = attach(model)
    tuned = forward(model)
    assert_changed(tuned, bare)
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in state)
    delta.merge()
    merged = forward(model)
    delta.unmerge()
    assert torch.equal(forward(model), tuned)
    delta.merge()
    delta.detach()  # unmerges first
    assert torch.equal(forward(model), bare)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    delta.attach()
    assert torch.equal(forward(model), tuned)
    assert_within_noise(merged, tuned, float32_noise(model, lambda m, _: forward(m)))
