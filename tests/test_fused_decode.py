"""The fused inference route (``delta.fuse()``, opendelta.fused): one linear map with a cached merged weight
where a mergeable delta is alone on a linear module and no gradient is recorded; the unmerged route,
bit for bit, everywhere else. The backbone's tensors are never written."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import tiny_llama
from support.numerics import assert_changed, assert_within_noise, batching_noise, float32_noise, perturbed_delta

from opendelta import AdapterModel, IA3Model, LifecycleError, LoraModel, MergeError, mixed_batch
from opendelta.hotswap import LoraSlot
from opendelta.routing import FusedLinear, site_of

IDS = torch.randint(1, 99, (4, 6), generator=torch.Generator().manual_seed(5))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def noise(model: torch.nn.Module) -> tuple[float, float]:
    """The bare model's own rounding here: batched vs each row alone, and float32 vs float64."""
    def forward(m: torch.nn.Module, rows: slice) -> torch.Tensor:
        return logits(m, IDS[rows])

    return batching_noise(model, forward, len(IDS)), float32_noise(model, forward)


def fused_modules(delta) -> list[torch.nn.Module]:
    sites = [(t.module, site_of(t.module)) for t in delta._targets.values()]
    return [module for module, site in sites if site is not None and site._fused is not None]


def test_fused_lora_equals_the_unmerged_route_within_rounding_and_never_writes_the_backbone() -> None:
    model = tiny_llama()
    reference = noise(model)
    weights = {name: p.clone() for name, p in model.named_parameters()}
    bare = logits(model)
    delta = perturbed_delta(LoraModel(model, name="a"), seed=1)
    unmerged = logits(model)
    with delta.fuse():
        modules = fused_modules(delta)
        assert len(modules) == len(delta.layers)
        assert all(type(m) is FusedLinear and not m._forward_hooks and not m._forward_pre_hooks for m in modules)
        fused = logits(model)
        assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters() if name in weights)
    assert_within_noise(fused, unmerged, *reference)
    assert torch.equal(logits(model), unmerged)  # the handle removed: the hooks' route again, bit for bit
    assert all(type(m) is torch.nn.Linear for m in modules)
    delta.detach()
    assert torch.equal(logits(model), bare)


def test_detach_while_fused_restores_the_backbone_bit_for_bit_and_attach_fuses_again() -> None:
    model = tiny_llama()
    bare = logits(model)
    delta = perturbed_delta(LoraModel(model, name="a"), seed=1)
    delta.fuse()
    fused = logits(model)
    delta.detach()
    assert torch.equal(logits(model), bare)
    assert all(type(t.module) is torch.nn.Linear and site_of(t.module) is None for t in delta._targets.values())
    delta.attach()
    assert len(fused_modules(delta)) == len(delta.layers)
    assert torch.equal(logits(model), fused)


def test_the_fused_route_is_not_taken_with_gradients_a_scale_a_training_dropout_or_a_mixed_batch() -> None:
    model = tiny_llama()
    a = perturbed_delta(LoraModel(model, name="a", lora_dropout=0.1), seed=1)
    b = perturbed_delta(LoraModel(model, name="b", modified_modules=["mlp.down_proj"]), seed=2)
    b.detach()
    a.eval()  # dropout off: the fused route may run
    with torch.no_grad():
        a_unmerged = model(input_ids=IDS).logits
        with a.scale(0.5):
            scaled = model(input_ids=IDS).logits
        b.attach()
        with mixed_batch([a, b], [0, 1, 1, 0]):
            mixed = model(input_ids=IDS).logits
        b.detach()
    tracked = model(input_ids=IDS).logits
    a.fuse()
    assert fused_modules(a)
    with torch.no_grad():
        with a.scale(0.5):
            assert torch.equal(model(input_ids=IDS).logits, scaled)
        b.attach()
        with mixed_batch([a, b], [0, 1, 1, 0]):
            assert torch.equal(model(input_ids=IDS).logits, mixed)
        b.detach()
    with_grad = model(input_ids=IDS).logits
    assert torch.equal(with_grad, tracked) and with_grad.requires_grad
    with_grad.square().mean().backward()
    assert all(p.grad is not None for p in a.delta_parameters())
    a.train()  # dropout on: the unmerged route, which drops
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = model(input_ids=IDS).logits
    assert not torch.allclose(dropped, a_unmerged)


def test_the_cache_follows_in_place_changes_and_a_hot_swap_slot() -> None:
    model = tiny_llama()
    reference = noise(model)
    bare = logits(model)
    slot = LoraSlot(model, ["q_proj", "v_proj"], max_rank=4, name="slot")
    donor = tiny_llama()
    tasks = [perturbed_delta(LoraModel(donor, name=f"t{i}", lora_r=4), seed=i + 1) for i in range(2)]
    for task in tasks:
        task.detach()
    unmerged = []
    for task in tasks:
        slot.load(task)
        unmerged.append(logits(model))
    handle = slot.delta.fuse()
    for task, want in zip(tasks, unmerged):
        slot.load(task)  # copies into the slot's factors in place: the merged weights are rebuilt
        assert_within_noise(logits(model), want, *reference)
    with torch.no_grad():
        slot.delta.layers["model.layers.0.self_attn.q_proj"].lora_B.mul_(3.0)
    changed = logits(model)
    handle.remove()
    assert_within_noise(changed, logits(model), *reference)
    assert_changed(changed, unmerged[-1], *reference)
    slot.delta.fuse()
    slot.clear()  # zero factors: W + 0 is W exactly, so the fused model is the bare one bit for bit
    assert torch.equal(logits(model), bare)


@pytest.mark.parametrize("change", [".data assigned", "slot scaling filled"])
def test_the_cache_follows_changes_that_move_no_version_counter_of_a_parameter(change: str) -> None:
    model = tiny_llama()
    reference = noise(model)
    slot = LoraSlot(model, ["q_proj", "v_proj"], max_rank=4, name="slot")
    slot.load(perturbed_delta(LoraModel(tiny_llama(), name="t", lora_r=4), seed=1))
    handle = slot.delta.fuse()
    before = logits(model)
    with torch.no_grad():
        for layer in slot.delta.layers.values():
            if change == ".data assigned":
                layer.lora_B.data = layer.lora_B.data * 3  # a new storage; the version counter stays
            else:
                layer.scaling.fill_(3.0)  # the slot's 0-dim scaling: a tensor attribute, not a parameter
    fused = logits(model)
    handle.remove()
    assert_within_noise(fused, logits(model), *reference)
    assert_changed(fused, before, *reference)


def test_two_deltas_on_a_module_keep_the_unmerged_route_bit_for_bit() -> None:
    model = tiny_llama()
    lora = perturbed_delta(LoraModel(model, name="a"), seed=1)
    ia3 = perturbed_delta(IA3Model(model, name="i"), seed=2)  # shares v_proj with the LoRA
    both = logits(model)
    lora.fuse()
    fused = {id(m) for m in fused_modules(lora)}
    v_proj = model.model.layers[0].self_attn.v_proj
    q_proj = model.model.layers[0].self_attn.q_proj
    assert id(v_proj) not in fused and id(q_proj) in fused
    reference = noise(model)
    assert_within_noise(logits(model), both, *reference)
    ia3.detach()
    assert id(v_proj) in {id(m) for m in fused_modules(lora)}  # alone again: fused


def test_fuse_and_unfuse_are_refused_inside_a_mixed_batch_and_change_nothing() -> None:
    model = tiny_llama()
    a = perturbed_delta(LoraModel(model, name="a"), seed=1)
    b = perturbed_delta(LoraModel(model, name="b"), seed=2)
    with mixed_batch([a, b], [0, 1, 1, 0]):
        with pytest.raises(LifecycleError, match="mixed_batch"):
            a.fuse()
    assert not fused_modules(a) and all(not layer.serve_fused for layer in a.layers.values())
    b.detach()
    handle = a.fuse()
    fused = fused_modules(a)
    b.attach()  # two deltas per module: unfused while both are attached
    with mixed_batch([a, b], [0, 1, 1, 0]):
        with pytest.raises(LifecycleError, match="mixed_batch"):
            handle.remove()
    assert all(layer.serve_fused for layer in a.layers.values())
    b.detach()
    assert fused_modules(a) == fused
    handle.remove()
    assert not fused_modules(a)


def test_fuse_refuses_a_delta_with_nothing_to_merge_and_changes_nothing() -> None:
    model = tiny_llama()
    adapter = perturbed_delta(AdapterModel(model, name="ad"), seed=1)
    before = logits(model)
    with pytest.raises(MergeError, match="nothing to fuse"):
        adapter.fuse()
    assert all(not layer.serve_fused for layer in adapter.layers.values())
    assert torch.equal(logits(model), before)


def test_merge_unmerge_switch_and_copies_while_fused() -> None:
    model = tiny_llama()
    reference = noise(model)
    bare = logits(model)
    a = perturbed_delta(LoraModel(model, name="a"), seed=1)
    unmerged_a = logits(model)
    keys = set(model.state_dict())
    a.fuse()
    assert set(model.state_dict()) == keys  # the cache is no parameter or buffer: nothing more is saved
    fused_a = logits(model)
    a.merge()
    assert not fused_modules(a)
    assert_within_noise(logits(model), unmerged_a, *reference)
    a.unmerge()
    assert torch.equal(logits(model), fused_a)  # fused again, from the restored weights
    assert torch.equal(logits(copy.deepcopy(model)), fused_a)  # a copy routes through its own merged weights
    assert torch.equal(logits(pickle.loads(pickle.dumps(model))), fused_a)  # the fused class pickles by name
    a.detach()
    b = perturbed_delta(LoraModel(model, name="b"), seed=2)
    unmerged_b = logits(model)
    b.fuse()
    b.detach()
    a.attach()
    a.switch(b)  # the sites are kept and re-decided: b's layers run fused
    assert len(fused_modules(b)) == len(b.layers)
    assert_within_noise(logits(model), unmerged_b, *reference)
    b.detach()
    assert torch.equal(logits(model), bare)


def test_a_compiled_model_traces_the_unmerged_route_while_fused() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).eval()
    delta = perturbed_delta(LoraModel(model, name="a", modified_modules=["0", "2"], lora_r=2), seed=1)
    h = torch.randn(3, 8)
    with torch.no_grad():
        unmerged = model(h)
        delta.fuse()
        graphs = []
        compiled = torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward)
        assert torch.equal(compiled(h), unmerged)  # the captured unmerged ops, run eagerly: bit for bit
    assert len(graphs) == 1  # no graph break at the fused forward
    torch._dynamo.reset()


class SubLinear(torch.nn.Linear):
    """A subclass with nn.Linear's forward: fusable, through a fused subclass of its own."""


class OwnForwardLinear(torch.nn.Linear):
    """A subclass with a forward of its own (as quantized layers have): the delta stays unmerged."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h)


def test_only_modules_with_nn_linears_forward_are_fused_and_their_class_comes_back() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(SubLinear(8, 8), torch.nn.Tanh(), OwnForwardLinear(8, 4)).eval()
    delta = perturbed_delta(LoraModel(model, name="a", modified_modules=["0", "2"], lora_r=2), seed=1)
    h = torch.randn(3, 8)
    with torch.no_grad():
        unmerged = model(h)
        handle = delta.fuse()
        assert type(model[0]) is not SubLinear and isinstance(model[0], SubLinear) and type(model[2]) is OwnForwardLinear
        fused = model(h)
        copied = pickle.loads(pickle.dumps(model))
        assert type(copied[0]) is type(model[0]) and torch.equal(copied(h), fused)
        handle.remove()
        assert type(model[0]) is SubLinear and torch.equal(model(h), unmerged)
    reference = float32_noise(model, lambda m, _: m(h.to(m[0].weight.dtype)))
    assert_within_noise(fused, unmerged, reference)


class Doubled(torch.nn.Module):
    """A parametrization: the module's weight becomes a property computed from ``parametrizations.weight.original``."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2


@pytest.mark.parametrize("when", ["before fuse", "after fuse"])
def test_a_parametrized_weight_is_never_served_from_a_stale_cache(when: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).eval()
    if when == "before fuse":
        torch.nn.utils.parametrize.register_parametrization(model[2], "weight", Doubled())
    delta = perturbed_delta(LoraModel(model, name="a", modified_modules=["2"], lora_r=2), seed=1)
    h = torch.randn(3, 8)
    with torch.no_grad():
        handle = delta.fuse()
        model(h)  # builds the cache where the route is fused
        if when == "after fuse":
            torch.nn.utils.parametrize.register_parametrization(model[2], "weight", Doubled())
        model[2].parametrizations.weight.original.add_(1.0)  # seen by the property, not by the module's own tensors
        fused = model(h)
        handle.remove()
        assert torch.equal(fused, model(h))  # the unmerged route ran: the same ops, bit for bit
        delta.detach()
        bare = model(h)
        delta.attach()
        delta.detach()
        assert torch.equal(model(h), bare)
        assert_changed(fused, bare, float32_noise(model, lambda m, _: m(h.to(m[0].weight.dtype))))


@pytest.mark.parametrize("made_there", ["backbone weight", "delta factor"])
def test_tensors_made_under_inference_mode_run_unmerged_since_their_changes_leave_no_version(made_there: str) -> None:
    torch.manual_seed(0)
    with torch.inference_mode(made_there == "backbone weight"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).eval()
    delta = perturbed_delta(LoraModel(model, name="a", modified_modules=["2"], lora_r=2), seed=1)
    layer = delta.layers["2"]
    if made_there == "delta factor":
        with torch.inference_mode():
            layer.lora_B = torch.nn.Parameter(torch.randn(layer.lora_B.shape))
    changed = model[2].weight if made_there == "backbone weight" else layer.lora_B
    h = torch.randn(3, 8)
    with torch.inference_mode():
        unmerged = model(h)
        handle = delta.fuse()
        assert torch.equal(model(h), unmerged)  # the unmerged route ran: the same ops, bit for bit
        cache = model[2].__dict__.get("_opendelta_fused")  # none where the backbone weight rules fusing out
        state = None if cache is None else cache._state
        changed.add_(1.0)  # in inference mode: no version counter moves
        after = model(h)
        assert cache is None or cache._state is state  # not rebuilt on every call either
        handle.remove()
        assert torch.equal(after, model(h))
    assert_changed(after, unmerged, float32_noise(model, lambda m, _: m(h.to(m[0].weight.dtype))))


def test_an_attribute_set_on_a_layer_by_hand_rebuilds_the_merged_weight() -> None:
    model = tiny_llama()
    reference = noise(model)
    delta = perturbed_delta(LoraModel(model, name="a"), seed=1)
    with delta.fuse():
        before = logits(model)
        for layer in delta.layers.values():
            layer.scaling = layer.scaling * 3  # a plain float: no tensor of the layer changes
        tripled = logits(model)
    assert_within_noise(tripled, logits(model), *reference)  # what the unmerged route computes now
    assert_changed(tripled, before, *reference)


@pytest.mark.parametrize("delta_type", ["lora", "dora", "ia3", "vera", "loha", "lokr", "oft", "adalora"])
def test_steady_calls_serve_the_cached_merged_weight_without_rebuilding_it(delta_type: str) -> None:
    from support.methods import METHODS

    from opendelta.routing import FUSED_ATTR

    model = tiny_llama()
    if delta_type == "dora":  # DoRA caches its weight norms on the layer while merging
        delta = perturbed_delta(LoraModel(model, use_dora=True), seed=1)
    else:
        delta = perturbed_delta(METHODS[delta_type].model_class(model, **METHODS[delta_type].tiny), seed=1)
    delta.fuse()
    logits(model)
    modules = fused_modules(delta)
    assert modules
    assert all(m.__dict__[FUSED_ATTR].cached is not None for m in modules)  # each served fused
    built = [m.__dict__[FUSED_ATTR]._state for m in modules]
    model.eval()  # train/eval flags and the scale are read on every call: setting them edits nothing cached
    for layer in delta.layers.values():
        layer.change_scale = 1.0
    logits(model)
    assert all(m.__dict__[FUSED_ATTR]._state is state for m, state in zip(modules, built))
