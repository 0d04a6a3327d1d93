"""VeRA, LoHa, LoKr, OFT and AdaLoRA beside LoRA: training step time and peak memory, by opendelta and by PEFT.

    PYTHONPATH=src python -m benchmarks.weight_changes --only minilm --rounds 7

Every configuration is a fresh copy of the backbone with the method at the attention query and
value projections (the sizes in benchmarks/variants.py, PEFT's defaults: LoRA r=8, VeRA r=256, LoHa
and LoKr r=8, OFT blocks of 32, AdaLoRA init_r=12 -> target_r=8); one step is forward + backward +
AdamW, and for AdaLoRA also the orthogonal regulariser in the loss and ``update_and_allocate(step)``
after the update, pruning at every step, as its users train it. The steps run interleaved
(benchmarks/timing.py), so a busy machine slows them alike, and ratios are taken round by round; peak
memory is measured per configuration in a fresh process (benchmarks/memory.py), after the timing
(``--no-memory`` / ``--memory-only`` run one part alone). Rows are printed, and the JSON rewritten,
after every round and every memory probe.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.memory import probe_all
from benchmarks.timing import interleaved, recording_rounds, write_json
from benchmarks.variants import build, train_step
from benchmarks.workloads import by_name

METHODS = ("vera", "loha", "lokr", "oft", "adalora")
TOOLS = ("opendelta", "peft")
#: each method beside LoRA by the same tool, and opendelta's beside PEFT's
PAIRS = tuple((f"{tool}:{m}", f"{tool}:lora") for m in METHODS for tool in TOOLS) + tuple(
    (f"opendelta:{m}", f"peft:{m}") for m in ("lora", *METHODS)
)


def measure(workload: str, rounds: int, warmup: int, memory: bool, threads: int, timing: bool = True,
            methods: tuple[str, ...] = METHODS, on_update: Callable[[dict], None] = lambda result: None) -> dict:
    """Median seconds per step of each configuration and the round-by-round ratios of PAIRS (`timing`),
    and the peak-memory ratios of the same pairs (`memory`), for `methods` beside LoRA. Prints a row per
    round and per memory probe and calls `on_update(result)` after each, so a stopped run keeps them."""
    chosen = by_name(workload)
    names = [f"{tool}:{m}" for m in ("lora", *methods) for tool in TOOLS]
    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    result: dict = {
        "workload": chosen.description,
        "batch": [chosen.batch_size, chosen.seq_len],
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "warmup": warmup,
    }
    print(f"{result['workload']}, batch {result['batch']}, {result['threads']} threads", flush=True)
    started = time.perf_counter()
    if timing:
        base = chosen.load()
        batch = chosen.batch(base, torch.device("cpu"))
        steps = {name: train_step(build(name, copy.deepcopy(base)), batch) for name in names}
        del base
        interleaved(steps, rounds, warmup, on_round=recording_rounds(result, pairs, rounds, started, on_update))
        del steps
        for name, spread in result["seconds"].items():
            print(f"  {name:16s} {spread['median']:.3f} s/step", flush=True)
        for pair, spread in result["ratios"].items():
            print(f"  {pair:34s} step {spread['median']:.3f} [{spread['q1']:.3f}, {spread['q3']:.3f}]  "
                  f"cpu {result['cpu_ratios'][pair]['median']:.3f}", flush=True)
    if memory:
        peaks: dict[str, dict] = result.setdefault("memory", {})

        def on_probe(name: str, figures: dict) -> None:
            peaks[name] = figures
            result["memory_ratios"] = {f"{a} / {b}": peaks[a]["peak_bytes"] / peaks[b]["peak_bytes"]
                                       for a, b in pairs if "peak_bytes" in peaks.get(a, {}) and "peak_bytes" in peaks.get(b, {})}
            shown = f"peak {figures['peak_bytes'] / 2**20:.0f} MiB" if "peak_bytes" in figures else figures.get("error")
            print(f"  {name:16s} {shown} ({time.perf_counter() - started:.0f} s)", flush=True)
            on_update(result)

        probe_all(workload, names, "cpu", threads, on_probe)
        for pair, value in result["memory_ratios"].items():
            print(f"  {pair:34s} peak memory {value:.3f}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weight_changes", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="minilm", help="workload name (minilm, smollm2, tiny-bert, tiny-llama...)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods beside LoRA (default all: {','.join(METHODS)})")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (one process each)")
    memory.add_argument("--memory-only", action="store_true", help="only the peak-memory probes (no timing)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (after every round)")
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    result = measure(args.only, args.rounds, args.warmup, not args.no_memory, args.threads, timing=not args.memory_only,
                     methods=methods, on_update=lambda result: write_json(result, args.json))
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
