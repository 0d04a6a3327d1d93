"""Sweep the learning rate (and steps) of each task of ``opendelta demo multitask`` on the real SmolLM2.

For every task, every rate and every seed: a fresh delta is trained on the demo's training tweets
(the seed shuffles the tweets, draws the typos and initialises the delta), then it answers the
demo's held-out examples with the delta attached; the bare backbone's score on the same examples is
printed once per task and seed. One JSON line per run goes to stdout, so the output is the record.

    PYTHONPATH=src python scripts/multitask_sweep.py --task sentiment --lrs 1e-3 3e-3 1e-2 --seeds 0 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from opendelta.demo import multitask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=[t.name for t in multitask.TASKS], required=True)
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=None, help="default: the task's own")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=None, help="default: the task's own held-out count")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cache-dir", default=str(multitask.DEFAULT_CACHE))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--delta", type=json.loads, default=None,
                        help="another delta configuration for the task, as JSON (default: the task's own)")
    parser.add_argument("--show", type=int, default=0, help="print this many held-out answers per run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = next(t for t in multitask.TASKS if t.name == args.task)
    if args.delta is not None:
        task = dataclasses.replace(task, delta=args.delta)
    steps = task.steps if args.steps is None else args.steps
    model, tokenizer, _ = multitask.load_backbone(Path(args.cache_dir), Console(stderr=True))
    model.eval()
    for seed in args.seeds:
        held_out, pool = multitask.split(seed)
        pairs = multitask.held_out_pairs(task, held_out, args.examples or task.held_out, seed)
        inputs = [x for x, _ in pairs]
        bare = multitask.respond(model, tokenizer, task, inputs)
        bare_acc = sum(b == y for b, (_, y) in zip(bare, pairs)) / len(pairs)
        print(json.dumps({"task": task.name, "seed": seed, "bare": bare_acc}), flush=True)
        for lr in args.lrs:
            torch.manual_seed(seed)
            delta, seconds, first, last = multitask.train_delta(
                model, tokenizer, task, pool, random.Random(seed), pairs, steps, args.batch_size, lr)
            delta.attach()
            start = time.perf_counter()
            tuned = multitask.respond(model, tokenizer, task, inputs)
            answer_seconds = time.perf_counter() - start
            delta.detach()
            acc = sum(t == y for t, (_, y) in zip(tuned, pairs)) / len(pairs)
            se = multitask.gain_standard_error([t == y for t, (_, y) in zip(tuned, pairs)],
                                               [b == y for b, (_, y) in zip(bare, pairs)])
            print(json.dumps({"task": task.name, "method": delta.delta_type, "seed": seed, "lr": lr, "steps": steps,
                              "batch": args.batch_size, "accuracy": acc, "bare": bare_acc, "gain_se": round(se, 4),
                              "loss": [round(first, 3), round(last, 3)], "train_s": round(seconds, 1),
                              "answer_s": round(answer_seconds, 1)}), flush=True)
            for (x, y), t in list(zip(pairs, tuned))[: args.show]:
                print(f"   {x!r} -> {t!r} (expected {y!r})", file=sys.stderr)


if __name__ == "__main__":
    main()
