"""``python -m benchmarks.shipping [--smoke] [--json PATH]``: shipping a tuned delta, opendelta vs PEFT, on SmolLM2-135M.

- export: ``export_merged(dir)`` vs PEFT's ``merge_and_unload()`` + ``save_pretrained(dir)`` (time, the median of
  the per-round ratios, folder size);
- ties: combining 8 LoRA deltas with ``combine(..., "ties")`` vs PEFT's ``add_weighted_adapter``;
- scaling: a forward at ``delta.scale(0.5)`` vs at 1.0 (the default route);
- hot-swap: a swap plus one forward, ``LoraSlot.load`` in a ``torch.compile``d model (``--backend``, default
  aot_eager: inductor compiles take minutes on a 2-core CPU) vs the same slot in eager mode and ``switch()``
  in eager mode, and the recompiles over 20 swaps.

Figures are medians of a few rounds on a shared machine: indicative, compare the ratios. ``--smoke``
uses a tiny LLaMA instead of SmolLM2 (no download, seconds). ``--json PATH`` also writes the figures,
rewritten after every section.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.timing import write_json  # noqa: E402
from opendelta import LoraModel, combine  # noqa: E402


def _base(smoke: bool) -> torch.nn.Module:
    if smoke:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(config).eval()
    from opendelta.demo.assets import smollm2_gguf

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config.to_dict()
    config.pop("quantization_config")  # a GGUF-loaded model refuses save_pretrained: rebuild it as a plain one
    model = type(loaded)(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict())
    return model.eval()


def _median_s(run: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _randomize(params: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def bench_export(base: torch.nn.Module, rounds: int) -> dict[str, float]:
    """Rounds alternate ours and PEFT's, each timed write starting with no dirty pages (``os.sync()`` untimed
    before it), so the writeback one 513 MB save leaves does not land in the next one's time (timing ours
    three times back to back and PEFT's between untimed model copies did not treat the two alike)."""
    targets = ["q_proj", "v_proj"]
    ours_model = copy.deepcopy(base)
    delta = LoraModel(ours_model, modified_modules=targets, lora_r=8, lora_alpha=16)
    _randomize(delta.delta_parameters(), 0)
    ours_times: list[float] = []
    peft_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        delta.export_merged(Path(tmp) / "warm")  # untimed: the first save_pretrained of a process pays one-off costs
        for _ in range(rounds):
            os.sync()
            start = time.perf_counter()
            delta.export_merged(Path(tmp) / "ours")
            ours_times.append(time.perf_counter() - start)
            tuned = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
            _randomize([p for n, p in tuned.named_parameters() if "lora_" in n], 0)
            os.sync()
            start = time.perf_counter()
            tuned.merge_and_unload().save_pretrained(Path(tmp) / "peft")
            peft_times.append(time.perf_counter() - start)
            del tuned
        out = {
            "opendelta_export_s": statistics.median(ours_times),
            "peft_merge_and_save_s": statistics.median(peft_times),
            "export_paired_ratio": statistics.median(o / p for o, p in zip(ours_times, peft_times)),
            "opendelta_export_mb": _folder_mb(Path(tmp) / "ours"),
            "peft_export_mb": _folder_mb(Path(tmp) / "peft"),
        }
    return out


def bench_ties(base: torch.nn.Module, rounds: int, n: int = 8) -> dict[str, float]:
    targets = ["q_proj", "v_proj"]
    tuned = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets), adapter_name="t0")
    for i in range(1, n):
        tuned.add_adapter(f"t{i}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    _randomize([p for name, p in tuned.named_parameters() if "lora_" in name], 1)
    ours_model = copy.deepcopy(base)
    deltas = [LoraModel(ours_model, modified_modules=targets, lora_r=8, lora_alpha=16, name=f"t{i}") for i in range(n)]
    for i, d in enumerate(deltas):
        _randomize(d.delta_parameters(), 10 + i)
    weights = [1.0 / n] * n
    counter = iter(range(10**6))
    peft_s = _median_s(
        lambda: tuned.add_weighted_adapter([f"t{i}" for i in range(n)], weights, f"m{next(counter)}", combination_type="ties", density=0.5),
        rounds,
    )
    ours_s = _median_s(lambda: combine(deltas, weights, "ties", density=0.5), rounds)
    return {"opendelta_ties_8_s": ours_s, "peft_ties_8_s": peft_s}


def bench_scaling(base: torch.nn.Module, rounds: int, smoke: bool) -> dict[str, float]:
    model = copy.deepcopy(base)
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=8)
    _randomize(delta.delta_parameters(), 2)
    ids = torch.randint(1, 90, (4, 16 if smoke else 128), generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        with torch.no_grad():
            model(ids)

    forward()
    unscaled = _median_s(forward, rounds)
    with delta.scale(0.5):
        scaled = _median_s(forward, rounds)
    return {"forward_scale_1_s": unscaled, "forward_scale_0.5_s": scaled}


def bench_hotswap(base: torch.nn.Module, rounds: int, smoke: bool, backend_name: str) -> dict[str, float]:
    """Latency of serving another task: swap the weights, then one forward. Compiled: ``LoraSlot.load`` into
    the slot of a ``torch.compile``d model; eager: the same slot uncompiled, and ``switch()`` between two
    attached-once deltas. Also the recompiles over the swaps (tasks of ranks 8 and 16, zero-padded to 16)."""
    from opendelta.hotswap import LoraSlot

    targets = ["q_proj", "v_proj"]
    donor = copy.deepcopy(base)
    tasks = [LoraModel(donor, modified_modules=targets, lora_r=8 * (1 + i % 2), name=f"h{i}") for i in range(4)]
    for i, t in enumerate(tasks):
        _randomize(t.delta_parameters(), 20 + i)
        t.detach()
    ids = torch.randint(1, 90, (1, 16 if smoke else 64), generator=torch.Generator().manual_seed(0))
    swaps = max(rounds, 20)
    compiles = [0]

    def backend(gm: Any, example_inputs: Any) -> Any:
        compiles[0] += 1
        return torch._dynamo.lookup_backend(backend_name)(gm, example_inputs)

    def serve(slot: LoraSlot, model: Any) -> Callable[[], None]:
        counter = iter(range(10**6))

        def swap_and_forward() -> None:
            slot.load(tasks[next(counter) % len(tasks)])
            with torch.no_grad():
                model(ids)

        return swap_and_forward

    out: dict[str, float] = {}
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(base)
    compiled_slot = LoraSlot(compiled_model, targets, max_rank=16, name="slot")
    compiled = torch.compile(compiled_model, backend=backend)
    start = time.perf_counter()
    serve(compiled_slot, compiled)()  # the first call compiles
    out["compile_first_call_s"] = time.perf_counter() - start
    first = compiles[0]
    out["hotswap_compiled_swap_and_forward_s"] = _median_s(serve(compiled_slot, compiled), swaps)
    out["recompiles_over_swaps"] = compiles[0] - first
    out["hotswap_compiled_load_only_s"] = _median_s(lambda: compiled_slot.load(tasks[0]), swaps)

    eager_model = copy.deepcopy(base)
    eager_slot = LoraSlot(eager_model, targets, max_rank=16, name="slot")
    serve(eager_slot, eager_model)()
    out["hotswap_eager_swap_and_forward_s"] = _median_s(serve(eager_slot, eager_model), swaps)

    switch_model = copy.deepcopy(base)
    attached = [LoraModel(switch_model, modified_modules=targets, lora_r=8, name=f"e{i}") for i in range(2)]
    attached[1].detach()
    state = {"on": 0}

    def switch_and_forward() -> None:
        attached[state["on"]].switch(attached[1 - state["on"]])
        state["on"] = 1 - state["on"]
        with torch.no_grad():
            switch_model(ids)

    out["eager_switch_and_forward_s"] = _median_s(switch_and_forward, swaps)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shipping", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA instead of SmolLM2, one round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--backend", default="aot_eager",
                        help="torch.compile backend of the hot-swap figures (inductor: minutes of compiling on a CPU)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH (after every section)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.smoke else 3)
    torch.set_num_threads(1 if args.smoke else 2)
    base = _base(args.smoke)
    results: dict[str, float] = {}
    sections = (lambda: bench_export(base, rounds), lambda: bench_ties(base, rounds),
                lambda: bench_scaling(base, rounds, args.smoke), lambda: bench_hotswap(base, rounds, args.smoke, args.backend))
    for section in sections:  # each section's rows printed and saved as soon as it is done: a stopped run keeps them
        figures = section()
        for key, value in figures.items():
            print(f"{key:28s} {value:10.4f}", flush=True)
        results.update(figures)
        write_json({"model": "tiny-llama" if args.smoke else "SmolLM2-135M", "rounds": rounds, **results}, args.json)
    return results


if __name__ == "__main__":
    main()
