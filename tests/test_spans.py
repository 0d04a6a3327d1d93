"""Spans: a parallel delta that reads one module's input and adds its result to a later module's
output, and the parallel adapter's use of it where no single module holds the feed-forward block."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support.families import MATRIX as FAMILIES, fresh_base, hidden
from torch import nn
from torch.utils.checkpoint import checkpoint

from opendelta import LoraModel, NoMatchError, ParallelAdapterModel, PatternError, UnsupportedModuleError
from opendelta.checkpoint import read_checkpoint
from opendelta.layer import DeltaLayer
from opendelta.multitask import mixed_batch
from opendelta.routing import Span, add_delta, remove_delta, site_of


class Scale(DeltaLayer):
    """m(h) = c * h."""

    def __init__(self, c: float, route: str = "parallel") -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))
        self.route = route

    def forward(self, h):
        return self.c * h


class TwoStep(nn.Module):
    """A feed-forward block kept as two modules, like BERT's intermediate and output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 4)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def state(m: nn.Module) -> list:
    return [(dict(s._forward_hooks), dict(s._forward_pre_hooks), dict(s._modules), set(s.__dict__))
            for s in m.modules()]


# ------------------------------------------------------------------ the routing mechanism


def test_a_span_adds_a_function_of_the_start_input_to_the_end_output() -> None:
    m = TwoStep()
    ref = m(X)
    add_delta(Span(m.up, m.down), "d", Scale(0.5))
    assert torch.allclose(m(X), ref + 0.5 * X, atol=1e-7)
    assert "d" in m.down._modules and "d" not in m.up._modules


def test_a_span_reads_the_start_input_after_the_start_modules_before_deltas() -> None:
    m = TwoStep()
    add_delta(m.up, "pre", Scale(1.0, "before"))
    add_delta(Span(m.up, m.down), "d", Scale(0.5))
    doubled = 2 * X
    ffn = F.linear(torch.tanh(F.linear(doubled, m.up.weight, m.up.bias)), m.down.weight, m.down.bias)
    assert torch.allclose(m(X), ffn + 0.5 * doubled, atol=1e-6)


def test_removing_a_span_restores_both_modules_exactly() -> None:
    m = TwoStep()
    before, ref = state(m), m(X)
    add_delta(Span(m.up, m.down), "d", Scale(0.5))
    remove_delta(Span(m.up, m.down), "d")
    assert site_of(m.up) is None and site_of(m.down) is None
    assert state(m) == before
    assert torch.equal(m(X), ref)


def test_a_deepcopy_routes_through_its_own_span_layer() -> None:
    m = TwoStep()
    ref = m(X)
    add_delta(Span(m.up, m.down), "d", Scale(0.5))
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin.down.d.c.fill_(0.0)
    assert torch.equal(twin(X), ref)
    assert torch.allclose(m(X), ref + 0.5 * X, atol=1e-7)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_replays_the_start_before_the_end(use_reentrant: bool) -> None:
    grads = []
    for checkpointed in (False, True):
        m = TwoStep()
        add_delta(Span(m.up, m.down), "d", Scale(0.5))
        x = X.clone().requires_grad_(True)
        out = checkpoint(m, x, use_reentrant=use_reentrant) if checkpointed else m(x)
        out.pow(2).sum().backward()
        grads.append((m.down.d.c.grad.clone(), x.grad.clone()))
    assert torch.allclose(grads[1][0], grads[0][0], atol=1e-6) and torch.allclose(grads[1][1], grads[0][1], atol=1e-6)


def test_an_end_that_runs_without_its_start_raises_naming_the_delta() -> None:
    m = TwoStep()
    add_delta(Span(m.up, m.down), "d", Scale(0.5))
    with pytest.raises(UnsupportedModuleError, match="'d' spans two modules"):
        m.down(torch.randn(2, 6))


def test_only_a_parallel_delta_can_span_and_a_refused_one_leaves_the_modules_alone() -> None:
    m = TwoStep()
    before = state(m)
    with pytest.raises(UnsupportedModuleError, match="only parallel deltas"):
        add_delta(Span(m.up, m.down), "d", Scale(0.5, "after"))
    assert state(m) == before


# ------------------------------------------------------------------ the parallel adapter's positions

FFN_POSITIONS = {
    "bert": ["encoder.layer.0.intermediate.dense->encoder.layer.0.output.dense",
             "encoder.layer.1.intermediate.dense->encoder.layer.1.output.dense"],
    "bart": [f"{side}.layers.{i}.fc1->{side}.layers.{i}.fc2" for side in ("encoder", "decoder") for i in (0, 1)],
    "opt": ["decoder.layers.0.fc1->decoder.layers.0.fc2", "decoder.layers.1.fc1->decoder.layers.1.fc2"],
    "llama": ["layers.0.mlp", "layers.1.mlp"],
}
SPAN_FAMILIES = ["bert", "bart", "opt"]


def perturb(delta, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator).to(p.dtype))


def ffn_adapter(name: str, model: nn.Module, **args) -> ParallelAdapterModel:
    """The default parallel adapter's feed-forward positions only (attention left out)."""
    positions = [p for p in ParallelAdapterModel.plan(model) if p in FFN_POSITIONS[name]]
    return ParallelAdapterModel(model, modified_modules=positions, bottleneck_dim=6, **args)


@pytest.mark.parametrize("name", FFN_POSITIONS)
def test_default_ffn_positions_are_the_ffn_module_or_the_span_of_its_two_projections(name: str) -> None:
    paths = ParallelAdapterModel.plan(fresh_base(name))
    assert [p for p in paths if "attn" not in p and "attention" not in p] == FFN_POSITIONS[name]


@pytest.mark.parametrize("name", FFN_POSITIONS)
def test_the_ffn_output_changes_by_exactly_s_times_the_adapter_of_the_ffn_input(name: str) -> None:
    model = fresh_base(name)
    delta = ffn_adapter(name, model, scaled=2.5)
    perturb(delta)
    path = FFN_POSITIONS[name][0]
    start, _, end = path.partition("->")
    end = end or start
    seen: dict[str, torch.Tensor] = {}

    def record(key: str, index: int):
        def hook(module, *values) -> None:  # returns None: a recorder must not replace what it sees
            seen.setdefault(key, values[index] if index < 0 else values[index][0])
        return hook

    handles = [model.get_submodule(start).register_forward_pre_hook(record("h_in", 0)),
               model.get_submodule(end).register_forward_pre_hook(record("end_in", 0)),
               model.get_submodule(end).register_forward_hook(record("out", -1))]
    hidden(model, FAMILIES[name])
    for handle in handles:
        handle.remove()
    layer = delta.layers[path]
    h = seen["h_in"]
    adapter = F.linear(F.gelu(F.linear(h, layer.down.weight, layer.down.bias), approximate="tanh"),
                       layer.up.weight, layer.up.bias)
    with torch.no_grad():
        delta.detach()
        plain = model.get_submodule(end)(seen["end_in"])
    assert torch.allclose(seen["out"], plain + 2.5 * adapter, rtol=0, atol=1e-6)
    assert adapter.abs().max() > 1e-3


@pytest.mark.parametrize("name", FFN_POSITIONS)
def test_detach_restores_the_backbone_bit_for_bit_and_attach_brings_the_tuned_output_back(name: str) -> None:
    model = fresh_base(name)
    family = FAMILIES[name]
    original, before = hidden(model, family), state(model)
    delta = ParallelAdapterModel(model, bottleneck_dim=6)
    perturb(delta)
    tuned = hidden(model, family)
    delta.detach()
    assert torch.equal(hidden(model, family), original)
    assert state(model) == before
    delta.attach()
    assert torch.equal(hidden(model, family), tuned)


@pytest.mark.parametrize("name", FFN_POSITIONS)
def test_save_then_load_reproduces_the_output_with_readable_keys(name: str, tmp_path) -> None:
    model = fresh_base(name)
    delta = ParallelAdapterModel(model, bottleneck_dim=6)
    perturb(delta)
    tuned = hidden(model, FAMILIES[name])
    delta.save_finetuned(tmp_path)
    other = fresh_base(name)
    loaded = ParallelAdapterModel.from_finetuned(tmp_path, other)
    assert list(loaded.layers) == list(delta.layers)
    assert torch.equal(hidden(other, FAMILIES[name]), tuned)
    keys = read_checkpoint(tmp_path).tensors.keys()
    assert f"delta.{FFN_POSITIONS[name][0]}.down.weight" in keys


def test_a_span_layer_lives_under_its_end_module_in_the_backbone() -> None:
    model = fresh_base("bert")
    ParallelAdapterModel(model, bottleneck_dim=6)
    keys = [k for k in model.state_dict() if "parallel_adapter" in k and "intermediate" not in k]
    assert "encoder.layer.0.output.dense.parallel_adapter.down.weight" in keys
    assert not any("intermediate" in k and "parallel_adapter" in k for k in model.state_dict())


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("name", SPAN_FAMILIES)
def test_gradient_checkpointing_gives_span_adapters_the_same_gradients(name: str, use_reentrant: bool) -> None:
    grads = []
    for checkpointing in (False, True):
        model = fresh_base(name).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        delta = ffn_adapter(name, model)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # set, not add: the initial values hang on how much RNG the dummy pass used
            for p in delta.delta_parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        delta.freeze_module()
        torch.manual_seed(0)  # the same dropout masks in both runs
        hidden(model, FAMILIES[name]).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        assert torch.allclose(grads[1][key], grads[0][key], atol=1e-6), key


def test_mixed_batch_runs_each_rows_own_span_adapter() -> None:
    model, family = fresh_base("bert"), FAMILIES["bert"]
    deltas = [ParallelAdapterModel(model, bottleneck_dim=6, name=f"task{i}") for i in range(2)]
    for i, delta in enumerate(deltas):
        perturb(delta, seed=i + 1)
    separate = []
    for i, delta in enumerate(deltas):
        deltas[1 - i].detach()
        separate.append(hidden(model, family))
        deltas[1 - i].attach()
    with mixed_batch(deltas, [1, 0]):
        mixed = hidden(model, family)
    assert torch.allclose(mixed[0], separate[1][0], atol=1e-6) and torch.allclose(mixed[1], separate[0][1], atol=1e-6)


def test_a_deepcopied_backbone_runs_its_own_span_adapters() -> None:
    model, family = fresh_base("opt"), FAMILIES["opt"]
    original = hidden(model, family)
    delta = ParallelAdapterModel(model, bottleneck_dim=6)
    perturb(delta)
    tuned = hidden(model, family)
    twin = copy.deepcopy(model)
    assert torch.equal(hidden(twin, family), tuned)
    delta.detach()
    assert torch.equal(hidden(model, family), original) and torch.equal(hidden(twin, family), tuned)


# ------------------------------------------------------------------ addressing spans


def test_a_span_is_addressed_by_name_or_by_role_and_pairs_within_each_layer() -> None:
    model = fresh_base("bert")
    by_name = ParallelAdapterModel.plan(model, modified_modules=["intermediate.dense->output.dense"])
    by_role = ParallelAdapterModel.plan(model, modified_modules=["ffn.up->ffn.down"], common_structure=True)
    assert by_name == by_role == FFN_POSITIONS["bert"]


def test_a_span_from_a_module_to_itself_is_that_module() -> None:
    assert ParallelAdapterModel.plan(fresh_base("llama"), modified_modules=["mlp->mlp"]) == FFN_POSITIONS["llama"]


def test_exclude_modules_removes_a_span_whose_start_or_end_it_names() -> None:
    paths = ParallelAdapterModel.plan(fresh_base("bert"), modified_modules=["intermediate.dense->output.dense"],
                                      exclude_modules=["encoder.layer.1.output"])
    assert paths == FFN_POSITIONS["bert"][:1]


def test_a_span_whose_start_has_no_end_after_it_in_its_block_is_a_pattern_error() -> None:
    with pytest.raises(PatternError, match="no end after it"):
        ParallelAdapterModel(fresh_base("bert"), modified_modules=["output.dense->intermediate.dense"])


def test_a_span_side_that_matches_nothing_names_it() -> None:
    with pytest.raises(NoMatchError, match="fc3"):
        ParallelAdapterModel(fresh_base("opt"), modified_modules=["fc1->fc3"])


def test_a_method_that_acts_on_one_module_refuses_a_span_and_leaves_the_model_alone() -> None:
    model = fresh_base("bert")
    before = state(model)
    with pytest.raises(UnsupportedModuleError, match="span"):
        LoraModel(model, modified_modules=["intermediate.dense->output.dense"])
    assert state(model) == before
