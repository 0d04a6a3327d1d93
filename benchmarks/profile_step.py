"""One decode step of a causal LM (issue 21), bare, with one unmerged LoRA (r=8 on q,v of every layer)
and with that LoRA served fused (``delta.fuse()``): where its time goes.

A step is one forward of batch x 1 new token over an 8-token KV cache, under ``no_grad``. Per step:
top-level aten ops (called from Python) and their self CPU time (torch.profiler), Python function calls
(cProfile), the median time of one q or v projection call inside the step (its delta's hooks or fused
checks included, at their cold-cache cost, which a warm loop hides), and the wall time as the median
over the rounds (each round times the three back to back, the order alternating). The time a delta adds
splits into its aten work (its extra ops' time: the LoRA arithmetic, and for fused the cost of the merged
weight) and the rest, Python: hook dispatch and the per-module code around the ops (the split is a difference of two noisy timers: under load it can even
come out negative). The paired ratio to bare (benchmarks.decode's) is printed on the wall and the process
CPU clock. Counts are exact on any machine; times are worth what the machine's quiet is.

    ./dev.sh python -m benchmarks.profile_step [--smollm2] [--batch 1] [--steps 50] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.decode import PROMPT, QV, interleaved, perturbed, ratio, shown, smollm2, tiny_llama
from benchmarks.profile_decode import python_calls
from opendelta import LoraModel


def one_step(model: nn.Module, batch: int) -> Callable[[], object]:
    """A decode step: the model's forward on one new token per row, after an 8-token prompt (prefilled once)."""
    vocab = min(1000, model.config.vocab_size)
    ids = torch.randint(3, vocab, (batch, PROMPT + 1), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :PROMPT], use_cache=True).past_key_values

    def run() -> object:
        with torch.no_grad():
            out = model(input_ids=ids[:, PROMPT:], cache=cache, use_cache=True)
        cache.crop(-1)  # drop the step's token: the next step sees the same cache
        return out

    return run


def aten(fn: Callable[[], object], steps: int) -> tuple[float, float, dict[str, int]]:
    """Per step: top-level aten ops, their self CPU microseconds, and the count of each op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    top = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    names: dict[str, int] = {}
    for event in top:
        names[event.name.removeprefix("aten::")] = names.get(event.name.removeprefix("aten::"), 0) + 1
    return len(top) / steps, sum(e.cpu_time_total for e in top) / steps, {k: v // steps for k, v in sorted(names.items())}


def per_call(step: Callable[[], object], modules: list[nn.Module], steps: int) -> float:
    """Median microseconds of one call of one of `modules` inside the decode step, from a first forward
    pre-hook to a last forward hook: the delta's own hooks, or the fused forward's checks, included. Inside a
    step every Python object a call touches is cold in the CPU cache (the weights streamed through since the
    module's last call), so this is where per-call code costs what it really costs, several times its warm
    cost in a loop."""
    started: dict[int, int] = {}
    times: list[int] = []

    def pre(module: nn.Module, args: tuple) -> None:
        started[id(module)] = time.perf_counter_ns()

    def post(module: nn.Module, args: tuple, output: object) -> None:
        times.append(time.perf_counter_ns() - started.pop(id(module)))

    handles = [m.register_forward_pre_hook(pre, prepend=True) for m in modules]
    handles += [m.register_forward_hook(post) for m in modules]
    try:
        for _ in range(steps):
            step()
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(times) / 1000


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M (default: a tiny LLaMA)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed sample and per count")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = smollm2() if args.smollm2 else tiny_llama()
    delta = perturbed(LoraModel(model, name="d", modified_modules=QV, lora_r=8), seed=1)
    step = one_step(model, args.batch)
    targets = [module for path, module in model.named_modules() if path.endswith(tuple(QV))]
    handle: list = []
    modes: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "bare": (delta.detach, delta.attach),
        "attached": (lambda: None, lambda: None),
        "fused": (lambda: handle.append(delta.fuse()), lambda: handle.pop().remove()),
    }
    results: dict[str, object] = {"model": "SmolLM2-135M" if args.smollm2 else "tiny-llama", "batch": args.batch}
    print(f"{results['model']}, batch {args.batch}, one decode step: exact counts per step", flush=True)
    for name, (enter, leave) in modes.items():
        enter()
        try:
            step()  # the first forward (reachability check; the fused weights are built here)
            ops, us, names = aten(step, args.steps)
            results[name] = {"aten ops": ops, "aten us": us, "ops": names, "python calls": python_calls(step, args.steps),
                             "us per q/v call": per_call(step, targets, args.steps)}
            # printed now, so a run stopped during the timing below still shows every count
            print(f"  {name:8s} {ops:.0f} aten ops, {results[name]['python calls']:.0f} Python calls; one q/v call "
                  f"inside the step {results[name]['us per q/v call']:.1f} us (median)", flush=True)
        finally:
            leave()

    def timed(name: str) -> Callable[[], None]:
        enter, leave = modes[name]

        def run() -> None:
            enter()
            try:
                for _ in range(args.steps):
                    step()
            finally:
                leave()

        return run

    samples = interleaved({name: timed(name) for name in modes}, args.rounds)
    for name in modes:
        results[name]["us per step"] = 1e6 * statistics.median(samples[name]["wall"]) / args.steps  # type: ignore[index]
        if name != "bare":
            results[name]["/ bare"] = ratio(samples, name, "bare")  # type: ignore[index]
    bare = results["bare"]
    print(f"timed ({args.steps} steps x {args.rounds} rounds, medians):")
    for name in modes:
        r = results[name]
        added = r["us per step"] - bare["us per step"]  # type: ignore[index,operator]
        arithmetic = r["aten us"] - bare["aten us"]  # type: ignore[index,operator]
        r["split us"] = {"added": added, "aten (delta arithmetic)": arithmetic, "python (hooks, per-module code)": added - arithmetic}  # type: ignore[index]
        print(f"  {name:8s} {r['us per step']:8.0f} us/step ({r['us per step'] / bare['us per step']:.3f} x bare), "  # type: ignore[index,operator]
              f"{r['aten ops']:.0f} aten ops ({r['aten us']:.0f} us self), {r['python calls']:.0f} Python calls; "
              f"added {added:+.0f} us = aten {arithmetic:+.0f} + python {added - arithmetic:+.0f}")
    for name in modes:
        if name != "bare":
            print(f"  {name} / bare: {shown(results[name]['/ bare'])}")  # type: ignore[index]
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
