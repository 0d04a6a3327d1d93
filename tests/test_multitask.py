"""Multi-task serving: mixed-task batches, switching, merging, joint training, and their errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from support.methods import METHODS as TABLE
from support.numerics import assert_within_noise, batching_noise, float32_noise
from support.rows import each_row_alone

from opendelta import (
    BitFitModel,
    DeltaBase,
    IA3Model,
    LifecycleError,
    LoraModel,
    MergeError,
    MixedBatchError,
    MultiTask,
    PrefixModel,
    SoftPromptModel,
    mixed_batch,
)
from opendelta.routing import mixing_anywhere, site_of

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}

#: method -> (class, arguments) from the method table; positions are each method's defaults
METHODS: dict[str, tuple[type[DeltaBase], dict[str, Any]]] = {t: (m.model_class, m.small) for t, m in TABLE.items()}
#: methods that change the sequence length: every row of a mixed batch needs one of them
WHOLE_BATCH = {t for t, m in TABLE.items() if m.whole_batch}

IDS = torch.randint(1, 99, (5, 7), generator=torch.Generator().manual_seed(3))
MASK = torch.ones(5, 7, dtype=torch.long)
MASK[1, 5:] = 0  # right padding
MASK[3, :2] = 0  # left padding


def perturb(delta: DeltaBase, seed: int) -> DeltaBase:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator).to(p.dtype))
    return delta


def tasks(model: torch.nn.Module, method: str, n: int = 3) -> list[DeltaBase]:
    cls, args = METHODS[method]
    return [perturb(cls(model, name=f"task{i}", **args), seed=i + 1) for i in range(n)]


def out(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    result = model(input_ids=ids, attention_mask=mask)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def bare_noise(model: torch.nn.Module) -> tuple[float, float]:
    """The bare backbone's rounding on IDS here: batched vs row by row, and float32 vs float64."""

    def forward(m: torch.nn.Module, rows: slice) -> torch.Tensor:
        return out(m, IDS[rows], MASK[rows])

    return batching_noise(model, forward, len(IDS)), float32_noise(model, forward)


def one_at_a_time(model: torch.nn.Module, deltas: list[DeltaBase], rows: list[int]) -> torch.Tensor:
    """Each row alone (a batch of one), with only its own delta attached."""
    return each_row_alone(deltas, rows, lambda i: out(model, IDS[i : i + 1], MASK[i : i + 1]))


@pytest.mark.parametrize("family", BUILDERS)
@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_equals_each_row_alone(method: str, family: str) -> None:
    model = BUILDERS[family]()
    noise = bare_noise(model)
    deltas = tasks(model, method)
    rows = [0, 2, 1, 1, 0] if method in WHOLE_BATCH else [0, 2, -1, 1, 0]
    with torch.no_grad():
        with mixed_batch(deltas, rows):
            mixed = out(model, IDS, MASK)
        expected = one_at_a_time(model, deltas, rows)
    assert_within_noise(mixed, expected, *noise)


@pytest.mark.parametrize("name", ["DistilBERT", "ModernBERT", "BLOOM"])
def test_prefix_mixed_batch_equals_each_row_alone_without_a_cache_or_with_layer_past(name: str) -> None:
    from support.prompt_cases import build

    model = build(name)
    noise = bare_noise(model)
    deltas = tasks(model, "prefix")
    rows = [0, 2, 1, 1, 0]
    with torch.no_grad():
        with mixed_batch(deltas, rows):
            mixed = out(model, IDS, MASK)
        expected = one_at_a_time(model, deltas, rows)
    assert_within_noise(mixed, expected, *noise)


def test_rows_without_a_delta_run_on_the_bare_backbone() -> None:
    model = tiny_llama()
    noise = bare_noise(model)
    with torch.no_grad():
        bare = out(model, IDS, MASK)
        deltas = tasks(model, "lora")
        with mixed_batch(deltas, [-1] * 5):
            mixed = out(model, IDS, MASK)
    assert_within_noise(mixed, bare, *noise)


def test_deltas_outside_the_mix_act_on_every_row() -> None:
    model = tiny_llama()
    noise = bare_noise(model)
    shared = perturb(BitFitModel(model, name="shared"), seed=9)
    deltas = tasks(model, "lora", 2)
    rows = [1, 0, -1, 0, 1]
    with torch.no_grad():
        with mixed_batch(deltas, rows):
            mixed = out(model, IDS, MASK)
        expected = one_at_a_time(model, deltas, rows)  # `shared` stays attached throughout
    assert shared.is_attached
    assert_within_noise(mixed, expected, *noise)


def test_a_mixed_batch_leaves_the_model_as_it_was() -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    with torch.no_grad():
        before = out(model, IDS, MASK)
        with mixed_batch(deltas, [0, 1, 0, 1, -1]):
            out(model, IDS, MASK)
        assert torch.equal(out(model, IDS, MASK), before)
    assert all(site_of(t.module).mix is None for d in deltas for t in d._targets.values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_generate_in_a_mixed_batch_equals_generate_per_row(method: str, family: str) -> None:
    model = BUILDERS[family]()
    deltas = tasks(model, method, 2)
    rows = [0, 1, 1] if method in WHOLE_BATCH else [0, -1, 1]
    ids = IDS[:3]
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with mixed_batch(deltas, rows):
            mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
        for d in deltas:
            d.detach()
        for i, r in enumerate(rows):
            if r >= 0:
                deltas[r].attach()
            alone = model.generate(ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **settings)
            if r >= 0:
                deltas[r].detach()
            assert torch.equal(mixed[i : i + 1], alone)


def test_beam_search_in_a_mixed_batch_is_refused() -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    with mixed_batch(deltas, [0, 1]), pytest.raises(MixedBatchError, match="expands the batch"):
        model.generate(IDS[:2], max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("rows", [[0, 1, 0, 1], [0, 1, 0, 1, 0, 1]])
def test_rows_of_another_length_than_the_batch_raise(rows: list[int]) -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    with mixed_batch(deltas, rows), pytest.raises(MixedBatchError, match="one row index per batch row"):
        out(model, IDS, MASK)


@pytest.mark.parametrize("rows", [[0, 2, 0], [0, -2, 0], [[0, 1]], [], [0.5, 1.0], "01"])
def test_bad_rows_raise_and_change_nothing(rows: Any) -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    with pytest.raises(MixedBatchError):
        with mixed_batch(deltas, rows):
            pass
    assert not mixing_anywhere(model)
    assert all(site_of(t.module).mix is None for d in deltas for t in d._targets.values())


def test_a_detached_delta_cannot_join_a_mix() -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    deltas[1].detach()
    with pytest.raises(LifecycleError, match="attach"):
        with mixed_batch(deltas, [0, 1]):
            pass
    assert not deltas[1].is_attached


def test_a_delta_of_another_backbone_cannot_join_a_mix() -> None:
    model, other = tiny_llama(), tiny_llama()
    mine, foreign = LoraModel(model), LoraModel(other)
    with pytest.raises(MixedBatchError, match="another backbone"):
        with mixed_batch([mine, foreign], [0, 1]):
            pass


def test_a_merged_delta_cannot_join_a_mix() -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    deltas[0].merge()
    with pytest.raises(LifecycleError, match="unmerge"):
        with mixed_batch(deltas, [0, 1]):
            pass


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16])
def test_rows_of_any_integer_dtype_route_by_value(dtype: torch.dtype) -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 3)
    rows = [0, 2, -1, 1, 0] if dtype.is_signed else [0, 2, 1, 1, 0]  # -1 (no delta) needs a signed dtype
    with torch.no_grad():
        with mixed_batch(deltas, rows):
            expected = out(model, IDS, MASK)
        with mixed_batch(deltas, torch.tensor(rows, dtype=dtype)):
            got = out(model, IDS, MASK)
    assert torch.equal(got, expected)


def test_an_out_of_range_uint8_row_is_named_by_its_value() -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    with pytest.raises(MixedBatchError, match="rows holds index 255, but there are 2 deltas"):
        with mixed_batch(deltas, torch.tensor([0, 255, 1, 0, 1], dtype=torch.uint8)):
            pass
    assert not mixing_anywhere(model)


def test_a_boolean_rows_mask_is_refused_with_the_fix() -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    with pytest.raises(MixedBatchError, match=r"boolean mask.*mask\.long\(\) - 1"):
        with mixed_batch(deltas, torch.tensor([True, False, True, False, True])):
            pass
    assert not mixing_anywhere(model)


def test_mixed_batches_do_not_nest_and_lock_the_lifecycle() -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    with mixed_batch(deltas, [0, 1]):
        with pytest.raises(LifecycleError, match="nest"):
            with mixed_batch(deltas, [1, 0]):
                pass
        for action in (deltas[0].detach, deltas[0].merge, lambda: deltas[0].switch(to=deltas[1])):
            with pytest.raises(LifecycleError, match="inside a mixed_batch"):
                action()
    assert all(d.is_attached for d in deltas)


def test_prefixes_need_a_prefix_on_every_row() -> None:
    model = tiny_llama()
    deltas = tasks(model, "prefix", 2)
    with pytest.raises(MixedBatchError, match="every row"):
        with mixed_batch(deltas, [0, -1, 1]):
            pass
    assert all(site_of(t.module).mix is None for d in deltas for t in d._targets.values())


def test_prefixes_of_different_lengths_cannot_mix() -> None:
    model = tiny_llama()
    short = PrefixModel(model, name="short", prefix_token_num=2, embed_dim=8, mid_dim=8)
    long = PrefixModel(model, name="long", prefix_token_num=3, embed_dim=8, mid_dim=8)
    with pytest.raises(MixedBatchError, match="same prefix_token_num"):
        with mixed_batch([short, long], [0, 1]):
            pass


def test_a_soft_prompt_cannot_share_a_batch_with_rows_without_one() -> None:
    model = tiny_llama()
    prompt = SoftPromptModel(model, soft_token_num=4)
    lora = LoraModel(model)
    with pytest.raises(MixedBatchError, match="every row"):
        with mixed_batch([prompt, lora], [0, 1]):
            pass


# ----------------------------------------------------------------- switching


def test_switch_computes_what_detach_then_attach_computes() -> None:
    model = tiny_gpt2()
    a, b = tasks(model, "lora", 2)
    b.detach()
    with torch.no_grad():
        a.detach()
        b.attach()
        expected = out(model, IDS, MASK)
        b.detach()
        a.attach()
        assert a.switch(to=b) is b
        assert (a.is_attached, b.is_attached) == (False, True)
        assert torch.equal(out(model, IDS, MASK), expected)


def test_switch_between_deltas_on_different_modules() -> None:
    model = tiny_llama()
    a = perturb(LoraModel(model, modified_modules=["q_proj"], name="a"), 1)
    b = perturb(LoraModel(model, modified_modules=["v_proj", "q_proj"], name="b"), 2)
    b.detach()
    with torch.no_grad():
        a.switch(to=b)
        switched = out(model, IDS, MASK)
        b.detach()
        bare_then = out(model, IDS, MASK)
        b.attach()
        assert torch.equal(out(model, IDS, MASK), switched)
    b.detach()
    fresh = tiny_llama()
    with torch.no_grad():
        assert torch.equal(bare_then, out(fresh, IDS, MASK))
    assert all(site_of(m) is None and not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_switch_refuses_a_delta_already_attached() -> None:
    model = tiny_llama()
    a, b = tasks(model, "lora", 2)
    with pytest.raises(LifecycleError, match="already attached"):
        a.switch(to=b)
    assert a.is_attached and b.is_attached


# ----------------------------------------------------------------- merging


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "ia3", "ia3_input"])
def test_merged_delta_computes_what_the_attached_delta_computes(method: str, family: str) -> None:
    model = BUILDERS[family]()
    noise = bare_noise(model)  # merged weights round differently from weight and delta applied apart
    down = {"llama": "down_proj", "gpt2": "mlp.c_proj", "bert": "output.dense"}[family]
    if method == "ia3_input":
        delta = perturb(IA3Model(model, modified_modules=[down], feedforward_modules=[down]), 1)
    else:
        delta = perturb(METHODS[method][0](model), 1)
    with torch.no_grad():
        attached = out(model, IDS, MASK)
        delta.merge()
        assert delta.is_merged
        assert all(site_of(t.module) is None for t in delta._targets.values())  # no hooks: the bare backbone's cost
        assert_within_noise(out(model, IDS, MASK), attached, *noise)


def test_unmerge_and_detach_restore_the_weights_bit_for_bit() -> None:
    model = tiny_gpt2()  # Conv1D: the transposed layout
    original = {k: v.clone() for k, v in model.state_dict().items()}
    delta = perturb(LoraModel(model, modified_modules=["c_attn", "c_proj"]), 1)
    with torch.no_grad():
        attached = out(model, IDS, MASK)
        delta.merge().unmerge()
        assert torch.equal(out(model, IDS, MASK), attached)
        delta.merge()
        delta.detach()
    assert not delta.is_merged
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    delta.attach()
    with torch.no_grad():
        assert torch.equal(out(model, IDS, MASK), attached)


def test_bitfit_merges_into_an_existing_bias() -> None:
    model = tiny_bert()
    noise = bare_noise(model)
    delta = perturb(BitFitModel(model, modified_modules=["query", "LayerNorm"]), 1)
    with torch.no_grad():
        attached = out(model, IDS, MASK)
        delta.merge()
        assert_within_noise(out(model, IDS, MASK), attached, *noise)


@pytest.mark.parametrize("method", ["adapter", "parallel_adapter", "prefix"])
def test_merging_a_method_that_cannot_merge_raises_and_changes_nothing(method: str) -> None:
    model = tiny_llama()
    (delta,) = tasks(model, method, 1)
    with torch.no_grad():
        before = out(model, IDS, MASK)
        with pytest.raises(MergeError, match="cannot be merged"):
            delta.merge()
        assert not delta.is_merged
        assert torch.equal(out(model, IDS, MASK), before)


def test_bitfit_cannot_merge_into_a_module_without_a_bias() -> None:
    model = tiny_llama()  # LLaMA projections have no bias
    delta = BitFitModel(model, modified_modules=["q_proj"])
    with pytest.raises(MergeError):
        delta.merge()
    assert not delta.is_merged


def test_merging_into_a_tied_weight_is_refused() -> None:
    model = tiny_gpt2()  # lm_head shares the token embedding's weight
    delta = perturb(LoraModel(model, modified_modules=["lm_head"]), 1)
    embedding = model.transformer.wte.weight.clone()
    with pytest.raises(MergeError, match="tied"):
        delta.merge()
    assert not delta.is_merged and torch.equal(model.transformer.wte.weight, embedding)


class Doubled(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2


def test_merging_into_a_parametrized_weight_is_refused_and_changes_nothing() -> None:
    model = tiny_llama()
    torch.nn.utils.parametrize.register_parametrization(model.model.layers[0].self_attn.q_proj, "weight", Doubled())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    delta = perturb(LoraModel(model, modified_modules=["q_proj"]), 1)
    with torch.no_grad():
        unmerged = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        with pytest.raises(MergeError, match="layers.0.self_attn.q_proj.weight is computed"):
            delta.merge()
        assert not delta.is_merged and torch.equal(model(input_ids=torch.tensor([[1, 2, 3]])).logits, unmerged)
    delta.detach()
    assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)


def test_merges_undo_in_reverse_order() -> None:
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = tasks(model, "lora", 2)
    a.merge()
    b.merge()
    with pytest.raises(LifecycleError, match="unmerge 'task1' first"):
        a.unmerge()
    b.unmerge()
    a.unmerge()
    a.detach()
    b.detach()
    assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)


def test_merge_needs_an_attached_unmerged_delta() -> None:
    model = tiny_llama()
    (delta,) = tasks(model, "lora", 1)
    delta.merge()
    with pytest.raises(LifecycleError, match="already merged"):
        delta.merge()
    delta.detach()
    with pytest.raises(LifecycleError, match="attach"):
        delta.merge()
    with pytest.raises(LifecycleError, match="not merged"):
        delta.unmerge()


# ----------------------------------------------------------------- joint training


def test_joint_training_sends_each_rows_gradient_to_its_own_delta_only() -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 3)
    deltas[0].freeze_module(exclude=["deltas"])
    rows = [0, 0, 1, -1, 0]  # task2 has no row in this batch
    with mixed_batch(deltas, rows):
        logits = out(model, IDS, MASK)
    logits[2].sum().backward()  # only the loss of row 2 (task1)
    grads = [[p.grad for p in d.delta_parameters()] for d in deltas]
    assert all(g is None or not g.any() for g in grads[0] + grads[2])
    assert all(g is not None for g in grads[1]) and any(g.any() for g in grads[1])
    assert all(p.grad is None for n, p in model.named_parameters() if "task" not in n)


def test_joint_training_gradients_equal_training_each_task_alone() -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    deltas[0].freeze_module(exclude=["deltas"])
    rows = [0, 1, 1, 0, 1]

    def gradients(m: torch.nn.Module, picked: list[int] | slice, names: list[str]) -> dict[str, torch.Tensor]:
        """The gradients of the loss of rows `picked` with respect to the parameters `names`."""
        for p in m.parameters():
            p.grad = None
        with torch.enable_grad():
            out(m, IDS[picked], MASK[picked]).pow(2).mean(dim=(1, 2)).sum().backward()
        params = dict(m.named_parameters())
        return {n: params[n].grad for n in names}

    def names_of(d: DeltaBase) -> list[str]:
        return [n for n, p in model.named_parameters() if any(p is q for q in d.delta_parameters())]

    with mixed_batch(deltas, rows):
        joint = gradients(model, slice(None), [n for d in deltas for n in names_of(d)])
    for d in deltas:
        d.detach()
    for i, d in enumerate(deltas):
        d.attach()
        picked = [j for j, r in enumerate(rows) if r == i]
        names = names_of(d)
        assert len(names) == len(d.delta_parameters())

        def flat(m: torch.nn.Module, _: slice) -> torch.Tensor:
            return torch.cat([g.flatten() for g in gradients(m, picked, names).values()])

        # the same gradients in float64 show how much rounding moves them on this CPU
        assert_within_noise(torch.cat([joint[n].flatten() for n in names]), flat(model, slice(None)), float32_noise(model, flat))
        d.detach()


def test_jointly_trained_deltas_save_and_reload_separately(tmp_path) -> None:
    model = tiny_llama()
    deltas = tasks(model, "lora", 2)
    rows = [0, 1, 1, 0, -1]
    with torch.no_grad(), mixed_batch(deltas, rows):
        mixed = out(model, IDS, MASK)
    for d in deltas:
        d.save_finetuned(tmp_path / d.name)
    fresh = tiny_llama()
    loaded = [LoraModel.from_finetuned(tmp_path / d.name, fresh) for d in deltas]
    with torch.no_grad(), mixed_batch(loaded, rows):
        assert torch.equal(out(fresh, IDS, MASK), mixed)


# ----------------------------------------------------------------- MultiTask


def test_multitask_activate_leaves_exactly_one_task_attached() -> None:
    model = tiny_llama()
    a, b, c = tasks(model, "lora", 3)
    serving = MultiTask(model, {"a": a, "b": b, "c": c})
    serving.activate("b")
    assert serving.active == ["b"]
    with torch.no_grad():
        only_b = out(model, IDS, MASK)
        serving.activate("a")
        serving.activate("b")
        assert torch.equal(out(model, IDS, MASK), only_b)
    serving.activate(None)
    assert serving.active == []


def test_multitask_mixed_attaches_what_it_needs_and_restores() -> None:
    model = tiny_llama()
    noise = bare_noise(model)
    a, b, c = tasks(model, "lora", 3)
    serving = MultiTask(model, {"a": a, "b": b, "c": c})
    serving.activate("c")
    names = ["b", None, "a", "b", "a"]
    with torch.no_grad():
        with serving.mixed(names):
            mixed = out(model, IDS, MASK)
        assert serving.active == ["c"]
        serving.activate(None)
        expected = one_at_a_time(model, [a, b], [{"a": 0, "b": 1, None: -1}[t] for t in names])
    assert_within_noise(mixed, expected, *noise)


def test_multitask_unknown_task_raises() -> None:
    model = tiny_llama()
    serving = MultiTask(model, {"a": LoraModel(model)})
    with pytest.raises(MixedBatchError, match="unknown task 'z'"):
        serving.activate("z")
    with pytest.raises(MixedBatchError, match="unknown task 'z'"):
        with serving.mixed(["a", "z"]):
            pass
