"""DoRA's training step beside LoRA's, by opendelta and by PEFT, on one real workload.

    PYTHONPATH=src python -m benchmarks.dora --only smollm2 --rounds 9

Every configuration is a fresh copy of the backbone with LoRA or DoRA (r=8, alpha=16) at the
attention query and value projections; one step is forward + backward + AdamW. The four steps run
interleaved (benchmarks/timing.py), so a busy machine slows them alike; ratios are taken round by round.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.timing import interleaved, recording_rounds, write_json
from benchmarks.variants import build, train_step
from benchmarks.workloads import by_name

CONFIGURATIONS = ("opendelta:lora", "opendelta:dora", "peft:lora", "peft:dora")
PAIRS = (
    ("opendelta:dora", "opendelta:lora"),
    ("peft:dora", "peft:lora"),
    ("opendelta:dora", "peft:lora"),
    ("peft:dora", "opendelta:lora"),
    ("opendelta:dora", "peft:dora"),
    ("opendelta:lora", "peft:lora"),
)


def measure(workload: str, rounds: int, warmup: int, on_update: Callable[[dict], None] = lambda result: None) -> dict:
    """Median seconds per step of each configuration and the round-by-round ratios of PAIRS; prints a row and
    calls `on_update(result)` after every round, so a stopped run keeps the rounds it finished."""
    chosen = by_name(workload)
    base = chosen.load()
    batch = chosen.batch(base, torch.device("cpu"))
    steps = {name: train_step(build(name, copy.deepcopy(base)), batch) for name in CONFIGURATIONS}
    result: dict = {
        "workload": chosen.description,
        "batch": [chosen.batch_size, chosen.seq_len],
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "warmup": warmup,
    }
    print(f"{result['workload']}, batch {result['batch']}, {result['threads']} threads", flush=True)
    started = time.perf_counter()
    interleaved(steps, rounds, warmup, on_round=recording_rounds(result, PAIRS, rounds, started, on_update))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dora", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="smollm2", help="workload name (minilm, smollm2, bert-base, tiny-llama...)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (after every round)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.only, args.rounds, args.warmup, on_update=lambda result: write_json(result, args.json))
    for name, spread in result["seconds"].items():
        print(f"  {name:16s} {spread['median']:.3f} s/step")
    for pair, spread in result["ratios"].items():
        cpu = result["cpu_ratios"][pair]
        print(f"  {pair:34s} {spread['median']:.3f} [{spread['q1']:.3f}, {spread['q3']:.3f}]  cpu {cpu['median']:.3f}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
