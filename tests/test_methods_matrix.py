"""Every module-level delta method on every family: the lifecycle properties all of them promise."""

from __future__ import annotations

import functools

import pytest
import torch
from support.methods import METHODS
from support.numerics import assert_changed
from support.families import MATRIX as FAMILIES, Family, fresh, hidden

from opendelta import DeltaBase

#: matrix id -> (method row, place) for every place the method table puts a method at
PLACES = {at.id: (method, at) for method in METHODS.values() for at in method.matrix}
CASES = [
    pytest.param(m, f, id=f"{m}-{f}")
    for m, (method, _) in PLACES.items()
    for f in FAMILIES
    if not (method.needs_transformer and FAMILIES[f].plain)
]


def attach(method: str, family: Family, model: torch.nn.Module) -> DeltaBase:
    spec, at = PLACES[method]
    args = dict(spec.small)
    if method == "ia3_input":
        args["feedforward_modules"] = family.positions["down"]
    if family.plain and spec.model_class.needs_runtime_init:
        args["dummy_inputs"] = family.inputs()
    positions = family.positions[at.position] if at.position is not None else None
    return spec.model_class(model, modified_modules=positions, **args)


def perturb(delta: DeltaBase, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator).to(p.dtype))


@functools.cache
def _bare(name: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    model = fresh(name)
    return hidden(model, FAMILIES[name]).detach(), tuple(n for n, _ in model.named_parameters())


def original(name: str) -> torch.Tensor:
    """The bare family model's output, computed once per process (a fresh clone each call)."""
    return _bare(name)[0].clone()


def original_parameter_names(name: str) -> tuple[str, ...]:
    return _bare(name)[1]


def tuned(method: str, name: str) -> tuple[torch.nn.Module, DeltaBase, torch.Tensor]:
    model = fresh(name)
    delta = attach(method, FAMILIES[name], model)
    perturb(delta)
    return model, delta, hidden(model, FAMILIES[name])


@pytest.mark.parametrize("method,name", [c for c in CASES if PLACES[c.values[0]][0].fresh_is_identity])
def test_fresh_delta_changes_nothing(method: str, name: str) -> None:
    family = FAMILIES[name]
    model = fresh(name)
    attach(method, family, model)
    assert torch.equal(hidden(model, family), original(name))


@pytest.mark.parametrize("method,name", CASES)
def test_perturbed_delta_changes_the_output(method: str, name: str) -> None:
    _, _, out = tuned(method, name)
    assert_changed(out, original(name))


@pytest.mark.parametrize("method,name", [c for c in CASES if not PLACES[c.values[0]][0].fresh_is_identity])
def test_a_fresh_prefix_already_changes_the_output(method: str, name: str) -> None:
    family = FAMILIES[name]
    model = fresh(name)
    attach(method, family, model)
    assert_changed(hidden(model, family), original(name))


@pytest.mark.parametrize("method,name", CASES)
def test_after_freezing_gradients_reach_every_delta_parameter_and_nothing_else(method: str, name: str) -> None:
    model = fresh(name).train()
    delta = attach(method, FAMILIES[name], model)
    perturb(delta)
    delta.freeze_module()
    hidden(model, FAMILIES[name]).pow(2).sum().backward()
    delta_ids = {id(p) for p in delta.delta_parameters()}
    for pname, p in model.named_parameters():
        if id(p) in delta_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert not p.requires_grad and p.grad is None, pname


@pytest.mark.parametrize("method,name", CASES)
def test_detach_restores_the_original_bit_for_bit(method: str, name: str) -> None:
    model, delta, _ = tuned(method, name)
    delta.detach()
    assert torch.equal(hidden(model, FAMILIES[name]), original(name))
    assert tuple(n for n, _ in model.named_parameters()) == original_parameter_names(name)


@pytest.mark.parametrize("method,name", CASES)
def test_detach_and_reattach_repeatedly_alternate_the_original_and_the_tuned_output(method: str, name: str) -> None:
    model, delta, out = tuned(method, name)
    for _ in range(2):
        delta.detach()
        assert torch.equal(hidden(model, FAMILIES[name]), original(name))
        delta.attach()
        assert torch.equal(hidden(model, FAMILIES[name]), out)


@pytest.mark.parametrize("method,name", CASES)
def test_save_then_load_into_a_fresh_backbone_reproduces_the_tuned_output(method: str, name: str, tmp_path) -> None:
    _, delta, out = tuned(method, name)
    delta.save_finetuned(tmp_path)
    other = fresh(name)
    kwargs = {"dummy_inputs": FAMILIES[name].inputs()} if FAMILIES[name].plain else {}
    loaded = type(delta).from_finetuned(tmp_path, other, **kwargs)
    assert loaded.layers.keys() == delta.layers.keys()
    assert torch.equal(hidden(other, FAMILIES[name]), out)
