"""The family sweep's check: a method at its default positions on a family's tiny model
(tests/support/families.py), shared by tests/test_family_sweep.py and ``scripts/coverage_table.py``."""

from __future__ import annotations

from typing import Any

import torch
from support.families import fresh
from support.methods import METHODS
from torch import nn


# ----------------------------------------------------------------------------- the default-positions check

def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every floating-point tensor the model returns (logits, hidden states, ...), in order."""
    out = model(**inputs)
    items = out.to_tuple() if hasattr(out, "to_tuple") else out if isinstance(out, tuple) else (out,)
    flat: list[torch.Tensor] = []
    stack = list(items)
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            flat.append(item)
        elif isinstance(item, (tuple, list)):
            stack[:0] = list(item)
        elif hasattr(item, "to_tuple"):
            stack[:0] = list(item.to_tuple())
    return flat


#: arguments that fit hidden-32 models (the defaults assume real sizes); positions stay the defaults
TINY_ARGS: dict[str, dict[str, Any]] = {t: m.tiny for t, m in METHODS.items() if m.tiny}


def check_defaults(
    name: str, delta_type: str, checkpoint_dir: str | None = None, model: nn.Module | None = None
) -> list[str]:
    """Put `delta_type` at its default positions on the family's tiny model and check the promises.

    Forward and backward run and give every delta parameter a gradient; with the delta's
    parameters perturbed the outputs change; detach gives the original outputs bit for bit; and,
    with `checkpoint_dir`, from_finetuned into a fresh backbone reproduces the tuned outputs.
    Returns the modified module paths; raises AssertionError or the library's error otherwise.
    `model` (default: a fresh copy) is the backbone to use.
    """
    from opendelta import AutoDeltaConfig, AutoDeltaModel
    from opendelta.runtime_init import synthesize_inputs

    model = fresh(name) if model is None else model
    generator = torch.Generator().manual_seed(2)
    inputs = {  # random pixels / audio: an all-zero image makes every patch, and so every gradient, alike
        k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in synthesize_inputs(model).items()
    }
    with torch.no_grad():
        before = outputs(model, inputs)
    config = AutoDeltaConfig.from_dict({"delta_type": delta_type, **TINY_ARGS.get(delta_type, {})})
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    delta.freeze_module(exclude=["deltas"], set_state_dict=False)
    with torch.no_grad():
        for param in delta.delta_parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1)
    tuned = outputs(model, inputs)
    # a random readout: a plain sum of a layer-normed output has zero gradient
    torch.stack([(t.float() * torch.randn(t.shape, generator=generator)).sum() for t in tuned]).sum().backward()
    params = delta.delta_parameters()
    assert params and all(p.grad is not None for p in params), f"{delta_type} on {name}: a delta parameter got no gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"{delta_type} on {name}: all-zero gradients"
    tuned = [t.detach() for t in tuned]
    assert any(not torch.equal(a, b) for a, b in zip(tuned, before)), f"{delta_type} on {name}: outputs did not change"
    if checkpoint_dir is not None:
        delta.save_finetuned(checkpoint_dir)
    delta.detach()
    with torch.no_grad():
        restored = outputs(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(restored, before)), f"{delta_type} on {name}: detach is not exact"
    if checkpoint_dir is not None:
        other = fresh(name)
        AutoDeltaModel.from_finetuned(checkpoint_dir, backbone_model=other)
        with torch.no_grad():
            reloaded = outputs(other, inputs)
        assert all(torch.equal(a, b) for a, b in zip(reloaded, tuned)), f"{delta_type} on {name}: reload differs"
    return list(delta.layers)
