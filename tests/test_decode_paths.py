"""The decode fast paths: a site's short post hook for its one parallel delta, and LoRA layers stacked
into one batched product in a mixed batch. Each must compute what the general path computes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from support.numerics import assert_changed, assert_within_noise, batching_noise, float32_noise, perturbed_delta
from support.rows import each_row_alone

from opendelta import AdapterModel, LoraModel, mixed_batch
from opendelta.methods.lora import LoraConfig, LoraLayer
from opendelta.methods.lora_stacked import StackedLora
from opendelta.routing import site_of

IDS = torch.randint(1, 99, (4, 6), generator=torch.Generator().manual_seed(5))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(input_ids=ids).logits


def sites(delta) -> list:
    return [site_of(t.module) for t in delta._targets.values()]


def test_the_short_post_hook_equals_the_general_path_bit_for_bit_and_detach_restores() -> None:
    model = tiny_llama()
    with torch.no_grad():
        bare = logits(model)
        delta = perturbed_delta(LoraModel(model, name="a"), seed=1)
        assert all(site._lean is not None for site in sites(delta))
        short = logits(model)
        for site in sites(delta):
            site._lean = None  # the general path
        general = logits(model)
        delta.detach()
        detached = logits(model)
    assert torch.equal(short, general) and not torch.equal(short, bare)
    assert torch.equal(detached, bare)


def test_the_short_path_is_taken_only_for_one_unscaled_parallel_delta() -> None:
    model = tiny_llama()
    a = perturbed_delta(LoraModel(model, name="a"), seed=1)
    assert all(site._lean == "a" for site in sites(a))
    b = perturbed_delta(LoraModel(model, name="b"), seed=2)
    assert all(site._lean is None for site in sites(b))  # two parallel deltas: the general path
    b.detach()
    assert all(site._lean == "a" for site in sites(a))
    dora = LoraModel(model, name="d", use_dora=True, modified_modules=["mlp.down_proj"])
    assert all(site._lean is None for site in sites(dora))  # reads its module
    with torch.no_grad():
        plain = logits(model)
        with a.scale(0.5):  # the short path checks the scale on every call
            scaled = logits(model)
        a.detach()
        without = logits(model)
    assert not torch.equal(scaled, plain) and not torch.equal(scaled, without)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_short_path_skips_the_precision_wrapper_only_where_it_would_not_cast(dtype) -> None:
    model = tiny_llama().to(dtype)
    with torch.no_grad():
        delta = perturbed_delta(LoraModel(model, name="a"), seed=1)  # on bfloat16: float32 factors, marked
        half = dtype != torch.float32
        assert all(site._lean_route == ("route_parallel" if half else "_route_parallel_as_written") for site in sites(delta))
        short = logits(model)
        for site in sites(delta):
            site._lean_route = "route_parallel"  # the wrapped route, as the general path calls it
        wrapped = logits(model)
        for site in sites(delta):
            site._lean = None
        general = logits(model)
    assert torch.equal(short, wrapped) and torch.equal(short, general) and short.dtype == dtype


@pytest.mark.parametrize("bias", [True, False])  # the output a view of the 2-D product / a 3-D tensor of its own
def test_lora_without_autograd_returns_the_output_it_added_into_with_the_values_of_the_autograd_path(bias) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10, bias=bias)
    layer = LoraLayer(12, 10, LoraConfig(lora_r=4, init_lora_weights=False), linear)
    h = torch.randn(3, 5, 12)
    with torch.no_grad():
        h_out = linear(h)
        summed = layer.route_parallel(h, h_out)
    assert summed is h_out  # added in place into the output's memory; no view made
    with torch.enable_grad():
        tracked = layer.route_parallel(h, linear(h))
    assert tracked.requires_grad and tracked is not h_out and torch.equal(tracked, summed)


def test_an_adapter_after_a_module_keeps_the_general_path() -> None:
    model = tiny_llama()
    adapter = AdapterModel(model, name="ad")
    assert all(site._lean is None for site in sites(adapter))


def _tasks(model: torch.nn.Module, n: int, **config) -> list[LoraModel]:
    return [perturbed_delta(LoraModel(model, name=f"t{i}", **config), seed=i + 1) for i in range(n)]


def _noise(model: torch.nn.Module) -> tuple[float, float]:
    def forward(m: torch.nn.Module, rows: slice) -> torch.Tensor:
        return logits(m, IDS[rows])

    return batching_noise(model, forward, len(IDS)), float32_noise(model, forward)


@pytest.mark.parametrize("rows", [[0, 1, 2, 0], [2, -1, 0, 2]])  # every row in order (in place) / a scatter
def test_stacked_lora_in_a_mixed_batch_equals_each_row_alone(rows: list[int]) -> None:
    model = tiny_llama()
    noise = _noise(model)
    deltas = _tasks(model, 3, rank_pattern={"q_proj": 4})  # ranks differ per module: padded with zeros
    with torch.no_grad():
        with mixed_batch(deltas, rows):
            assert any(isinstance(step, StackedLora) for site in sites(deltas[0]) for step, _ in site.mix.parallel)
            mixed = logits(model)
        expected = each_row_alone(deltas, rows, lambda i: logits(model, IDS[i : i + 1]))
    assert_within_noise(mixed, expected, *noise)


@pytest.mark.parametrize("change", ["in place", ".data assigned", "float scaling set by hand"])
def test_stacked_lora_equals_the_unstacked_mixed_batch_and_follows_changes(monkeypatch, change: str) -> None:
    model = tiny_llama()
    noise = _noise(model)
    deltas = _tasks(model, 2)
    rows = [1, 0, 0, 1]

    def unstacked() -> torch.Tensor:
        with monkeypatch.context() as patch:
            patch.setattr(LoraLayer, "stack_rows", classmethod(lambda cls, parts, n: None))
            with mixed_batch(deltas, rows):
                return logits(model)

    with torch.no_grad():
        before = unstacked()
        with mixed_batch(deltas, rows):
            stacked = logits(model)
            for layer in deltas[1].layers.values():
                if change == "in place":
                    layer.lora_B.mul_(2.0)  # its version counter moves
                elif change == ".data assigned":
                    layer.lora_B.data = layer.lora_B.data * 2  # a new storage; the version counter stays
                else:
                    layer.scaling = layer.scaling * 2  # a plain float: no tensor changes
            changed = logits(model)  # restacked before this forward
        changed_alone = unstacked()
    assert_within_noise(stacked, before, *noise)
    assert_within_noise(changed, changed_alone, *noise)
    assert_changed(changed, stacked, *noise)


@pytest.mark.parametrize("rows", [[0, 1, 1, 0], [1, -1, 0, 1]])  # every row covered / a bare row
def test_stacked_lora_trains_side_by_side_with_the_one_by_one_gradients(monkeypatch, rows: list[int]) -> None:
    model = tiny_llama()
    deltas = _tasks(model, 2, rank_pattern={"q_proj": 4})  # a task's blocks of two ranks
    deltas[0].freeze_module(exclude=["deltas"])
    calls = []
    side_by_side = StackedLora._side_by_side
    monkeypatch.setattr(StackedLora, "_side_by_side", lambda self, *a: calls.append(1) or side_by_side(self, *a))

    def grads(m: torch.nn.Module, mix: list[int] | None = None) -> torch.Tensor:
        params = [p for n, p in m.named_parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        with torch.enable_grad():
            if mix is None:
                logits(m).square().mean().backward()
            else:
                with mixed_batch(deltas, mix):
                    logits(m).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in params])

    stacked = grads(model, rows)
    assert calls  # training took the side-by-side product
    monkeypatch.setattr(LoraLayer, "stack_rows", classmethod(lambda cls, parts, n: None))
    unstacked = grads(model, rows)
    # the rounding of these gradients on this CPU: both deltas on every row, float32 against float64
    assert_within_noise(stacked, unstacked, float32_noise(model, lambda m, _: grads(m)))


def test_the_decode_benchmark_runs_on_a_tiny_model() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import decode

    results = decode.main(["--smoke", "--rounds", "1"])
    assert {"lora batch 1", "ia3 batch 8", "adapter batch 1"} <= set(results["decode"])
    lora = results["decode"]["lora batch 1"]
    assert {"attached / detached", "fused / detached", "peft / detached"} <= set(lora)
    assert "fused / detached" in results["decode"]["ia3 batch 8"] and "fused / detached" not in results["decode"]["adapter batch 1"]
    assert results["mixed_decode"]["4 tasks"]["opendelta mixed / one delta"]["min"] > 0
    assert results["forward"]["8 prompts"]["opendelta / peft"]["median"] > 0
    paired = results["decode"]["lora batch 1"]["attached / detached"]["paired"]
    assert len(paired["rounds"]) == 1 and paired["low"] <= paired["median"] <= paired["high"]
    assert len(paired["rounds"]) == len(results["decode"]["lora batch 1"]["attached / detached"]["cpu"]["paired"]["rounds"])
    only = decode.main(["--smoke", "--rounds", "2", "--only", "decode", "step", "--methods", "lora", "--batches", "1"])
    assert set(only["decode"]) == set(only["step"]) == {"lora batch 1"} and "mixed_decode" not in only
    # the step section times one-token steps: each round's figure is a step's median, under a whole generate's
    steps, generates = only["step"]["lora batch 1"]["seconds"], only["decode"]["lora batch 1"]["seconds"]
    assert 0 < steps["detached"]["median"] < generates["detached"]["median"]
    assert {"attached / detached", "fused / detached", "peft / detached"} <= set(only["step"]["lora batch 1"])
    assert len(only["decode"]["lora batch 1"]["attached / detached"]["paired"]["rounds"]) == 2
    assert only["decode_protocol"].startswith("warm")
    cold = decode.main(["--smoke", "--rounds", "1", "--only", "decode", "--methods", "lora", "--batches", "1", "--cold"])
    assert cold["decode_protocol"].startswith("cold") and "fused / detached" in cold["decode"]["lora batch 1"]


def test_the_decode_profile_counts_what_a_lora_adds_to_a_module_call() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import profile_decode

    results = profile_decode.main(["--calls", "3", "--rounds", "1"])
    ops, names = results["attached"]["aten ops"]
    assert results["bare"]["aten ops"][1] == ["linear"] and ops > results["bare"]["aten ops"][0]
    # added in place into the bias-free output (no out-of-place addmm), no casts in float32
    assert {"addmm_", "linear"} <= set(names) and not {"addmm", "to"} & set(names)
    assert results["attached"]["python calls"] > results["bare"]["python calls"]
    assert results["fused"]["aten ops"] == results["bare"]["aten ops"]  # served fused: the bare call's one linear


def test_the_step_profile_counts_no_aten_op_beyond_the_bare_step_for_a_fused_lora() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import profile_step

    results = profile_step.main(["--steps", "2", "--rounds", "1"])
    bare, attached, fused = (results[name] for name in ("bare", "attached", "fused"))
    assert fused["ops"] == bare["ops"] and attached["aten ops"] > bare["aten ops"]
    assert "addmm_" in set(attached["ops"]) - set(bare["ops"]) and attached["ops"]["mul"] > bare["ops"]["mul"]
    assert all(results[name]["us per q/v call"] > 0 for name in ("bare", "attached", "fused"))


def test_stacked_lora_trains_side_by_side_on_a_bf16_backbone_in_the_deltas_float32(monkeypatch) -> None:
    model = tiny_llama().to(torch.bfloat16)
    deltas = [LoraModel(model, name=f"t{i}", lora_r=2) for i in range(2)]  # float32 factors (the precision policy)
    deltas[0].freeze_module(exclude=["deltas"])
    calls = []
    side_by_side = StackedLora._side_by_side
    monkeypatch.setattr(StackedLora, "_side_by_side", lambda self, *a: calls.append(1) or side_by_side(self, *a))
    with mixed_batch(deltas, [0, 1, 1, 0]):
        out = logits(model)
    out[1].float().square().mean().backward()  # only a row of t1
    assert calls and out.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in deltas[1].delta_parameters())
    assert any(p.grad.any() for p in deltas[1].delta_parameters())
    assert all(p.grad is None or not p.grad.any() for p in deltas[0].delta_parameters())
