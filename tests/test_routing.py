"""Dynamic re-routing: the four routes, output containers, composition order, exact removal."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from opendelta.layer import COMBINED, DeltaLayer
from opendelta.routing import add_delta, remove_delta, site_of


class Scale(DeltaLayer):
    """m(h) = c * h, on any route."""

    def __init__(self, c: float, route: str) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))
        self.route = route  # instance attribute shadows the class default

    def forward(self, h):
        return self.c * h


class Swap(DeltaLayer):
    """Replace route: the module computes 2 * x instead (the engine of the original OpenDelta's
    replace_module; no method of ours uses it)."""

    route = "replace"

    def forward(self, x):
        return 2 * x


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 4)


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def test_before_route_adds_to_the_input():
    m = linear()
    add_delta(m, "d", Scale(0.5, "before"))
    assert torch.allclose(m(X), nn.functional.linear(X + 0.5 * X, m.weight, m.bias))


def test_after_route_adds_to_the_output():
    m = linear()
    ref = m(X)
    add_delta(m, "d", Scale(0.5, "after"))
    assert torch.allclose(m(X), ref + 0.5 * ref)


def test_parallel_route_adds_a_function_of_the_input_to_the_output():
    m = linear()
    ref = m(X)
    add_delta(m, "d", Scale(0.5, "parallel"))
    assert torch.allclose(m(X), ref + 0.5 * X)


def test_replace_route_swaps_the_computation_and_removal_restores_forward():
    m = linear()
    ref = m(X)
    add_delta(m, "d", Swap())
    assert torch.equal(m(X), 2 * X)
    remove_delta(m, "d")
    assert "forward" not in m.__dict__ and torch.equal(m(X), ref)


def test_input_passed_by_keyword_is_routed():
    m = linear()
    add_delta(m, "d", Scale(1.0, "before"))
    assert torch.allclose(m(input=X), m(X))


def test_tuple_and_model_output_keep_everything_but_the_hidden_state():
    class Block(nn.Module):
        def forward(self, h, as_dict=False):
            extra = torch.ones(1)
            return BaseModelOutput(last_hidden_state=h, hidden_states=(extra,)) if as_dict else (h, extra)

    block = Block()
    add_delta(block, "d", Scale(1.0, "after"))
    h, extra = block(X)
    assert torch.equal(h, 2 * X) and torch.equal(extra, torch.ones(1))
    out = block(X, as_dict=True)
    assert isinstance(out, BaseModelOutput)
    assert torch.equal(out.last_hidden_state, 2 * X) and torch.equal(out[0], 2 * X)
    assert torch.equal(out.hidden_states[0], torch.ones(1))


def test_composition_order_is_before_module_parallel_after():
    m = nn.Identity()
    add_delta(m, "after", Scale(10.0, "after"))
    add_delta(m, "par", Scale(1.0, "parallel"))
    add_delta(m, "pre", Scale(1.0, "before"))
    # before: x -> 2x; module: identity; parallel: + 1 * (2x) -> 4x; after: 4x + 10 * 4x = 44x
    assert torch.allclose(m(X), 44 * X)


def test_removing_one_delta_leaves_the_others_working():
    m = linear()
    ref = m(X)
    add_delta(m, "a", Scale(0.5, "after"))
    add_delta(m, "b", Scale(0.25, "parallel"))
    remove_delta(m, "a")
    assert torch.allclose(m(X), ref + 0.25 * X)


def test_removing_the_last_delta_restores_the_module_exactly():
    m = linear()
    before = (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._modules), dict(m.__dict__))
    ref = m(X)
    add_delta(m, "a", Scale(0.5, "before"))
    add_delta(m, "b", Scale(0.5, "after"))
    remove_delta(m, "a")
    remove_delta(m, "b")
    assert site_of(m) is None
    assert (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._modules)) == before[:3]
    assert set(m.__dict__) == set(before[3])
    assert torch.equal(m(X), ref)


def test_one_hook_per_module_however_many_deltas():
    m = linear()
    for i in range(3):
        add_delta(m, f"d{i}", Scale(0.1, "parallel"))
    assert len(m._forward_hooks) == 1 and len(m._forward_pre_hooks) == 0


def test_deepcopy_routes_through_the_copys_own_deltas():
    m = linear()
    add_delta(m, "d", Scale(0.5, "after"))
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin.d.c.fill_(0.0)
    assert torch.allclose(twin(X), nn.functional.linear(X, m.weight, m.bias))
    assert torch.allclose(m(X), 1.5 * nn.functional.linear(X, m.weight, m.bias))


def test_a_layer_that_rewrites_the_whole_call_must_declare_how_it_acts_on_part_of_a_batch():
    # the row-wise path of a mixed batch runs route_input on the rows, which would bypass this route_call
    with pytest.raises(TypeError, match="mixed_rows"):

        class Undeclared(DeltaLayer):
            route = "before"

            def route_call(self, args, kwargs, input_name):
                return args, kwargs

    class CallRewriter:  # a mixin that brings route_call along is no way around the declaration
        def route_call(self, args, kwargs, input_name):
            return args, kwargs

    with pytest.raises(TypeError, match="mixed_rows"):

        class UndeclaredThroughAMixin(CallRewriter, DeltaLayer):
            route = "before"

    class Declared(DeltaLayer):
        route = "before"
        mixed_rows = COMBINED

        def route_call(self, args, kwargs, input_name):
            return args, kwargs

    assert Declared.mixed_rows == COMBINED


def test_mixed_rows_accepts_only_the_declared_values():
    with pytest.raises(TypeError, match="mixed_rows"):

        class Misspelled(DeltaLayer):
            mixed_rows = "rowwise"
