"""VeRA, LoHa, LoKr, OFT and AdaLoRA beside LoRA: training step time and peak memory, by opendelta and by PEFT.

    PYTHONPATH=src python -m benchmarks.weight_changes --only minilm --rounds 7

Every configuration is a fresh copy of the backbone with the method at the attention query and
value projections (the sizes in benchmarks/variants.py, PEFT's defaults: LoRA r=8, VeRA r=256, LoHa
and LoKr r=8, OFT blocks of 32, AdaLoRA init_r=12 -> target_r=8); one step is forward + backward +
AdamW, and for AdaLoRA also the orthogonal regulariser in the loss and ``update_and_allocate(step)``
after the update, pruning at every step, as its users train it. The steps run interleaved
(benchmarks/timing.py), so a busy machine slows them alike, and ratios are taken round by round; peak
memory is measured per configuration in a fresh process (benchmarks/memory.py).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from benchmarks.memory import probe_all
from benchmarks.timing import Spread, interleaved, ratio, write_json
from benchmarks.variants import build, train_step
from benchmarks.workloads import by_name

METHODS = ("vera", "loha", "lokr", "oft", "adalora")
TOOLS = ("opendelta", "peft")
CONFIGURATIONS = tuple(f"{tool}:{m}" for m in ("lora", *METHODS) for tool in TOOLS)
#: each method beside LoRA by the same tool, and opendelta's beside PEFT's
PAIRS = tuple((f"{tool}:{m}", f"{tool}:lora") for m in METHODS for tool in TOOLS) + tuple(
    (f"opendelta:{m}", f"peft:{m}") for m in ("lora", *METHODS)
)


def measure(workload: str, rounds: int, warmup: int, memory: bool, threads: int) -> dict:
    """Median seconds per step of each configuration, the round-by-round ratios of PAIRS, and the
    peak-memory ratios of the same pairs."""
    chosen = by_name(workload)
    base = chosen.load()
    batch = chosen.batch(base, torch.device("cpu"))
    steps = {name: train_step(build(name, copy.deepcopy(base)), batch) for name in CONFIGURATIONS}
    samples = interleaved(steps, rounds, warmup)
    wall, cpu = samples["wall"], samples["cpu"]
    result = {
        "workload": chosen.description,
        "batch": [chosen.batch_size, chosen.seq_len],
        "threads": torch.get_num_threads(),
        "seconds": {name: Spread.of(values).to_dict() for name, values in wall.items()},
        "ratios": {f"{a} / {b}": ratio(wall, a, b).to_dict() for a, b in PAIRS},
        "cpu_ratios": {f"{a} / {b}": ratio(cpu, a, b).to_dict() for a, b in PAIRS},
    }
    if memory:
        peaks = probe_all(workload, list(CONFIGURATIONS), "cpu", threads)
        result["memory"] = peaks
        result["memory_ratios"] = {f"{a} / {b}": peaks[a]["peak_bytes"] / peaks[b]["peak_bytes"] for a, b in PAIRS}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weight_changes", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="minilm", help="workload name (minilm, smollm2, tiny-bert, tiny-llama...)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (one process each)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.only, args.rounds, args.warmup, not args.no_memory, args.threads)
    print(f"{result['workload']}, batch {result['batch']}, {result['threads']} threads")
    for name, spread in result["seconds"].items():
        print(f"  {name:16s} {spread['median']:.3f} s/step")
    for pair, spread in result["ratios"].items():
        memory = result.get("memory_ratios", {}).get(pair)
        shown = f"  peak memory {memory:.3f}" if memory is not None else ""
        print(f"  {pair:34s} step {spread['median']:.3f} [{spread['q1']:.3f}, {spread['q3']:.3f}]{shown}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
