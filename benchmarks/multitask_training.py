"""Aggregate throughput of multi-task training: one run of mixed batches vs the tasks one after another.

    PYTHONPATH=src python -m benchmarks.multitask_training [--only minilm] [--tasks 4] [--rounds 3] [--smoke]

The same rows (``tasks`` x ``batches`` batches of ``batch_size`` rows each) are trained two ways on
one backbone carrying one LoRA delta per task (r=8 at the defaults, every task's delta attached):

- **mixed**: every batch holds rows of all tasks (round-robin), routed per row by
  :class:`opendelta.multitask_trainer.TaskRouting` (the collator and the forward hook a Trainer run uses);
- **sequential**: each task in turn, its batches holding its rows only, with just its delta
  attached (plain single-delta training, the baseline a user would otherwise run).

One sample is one full pass over the rows (forward, backward, AdamW step per batch); the two run
interleaved, so a busy machine slows them alike. Rows per second and the ratio mixed / sequential
(of seconds per pass: below 1 means mixed is faster) are reported per round, and the JSON rewritten
after every round.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.timing import Samples, Spread, interleaved, ratio, round_line, write_json
from benchmarks.workloads import by_name
from opendelta import LoraModel
from opendelta.multitask_trainer import TaskRouting


def _batches(workload_batch: dict[str, torch.Tensor], tasks: int, batches: int) -> list[dict[str, torch.Tensor]]:
    """tasks x batches batches of the workload's shape, rows drawn from one fixed random pool."""
    n = workload_batch["input_ids"].shape[0]
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(tasks * batches):
        pick = torch.randint(0, n, (n,), generator=g)
        out.append({k: v[pick] for k, v in workload_batch.items()})
    return out


def _deltas(model: nn.Module, tasks: int) -> dict[str, LoraModel]:
    torch.manual_seed(0)
    deltas = {f"task{i}": LoraModel(model, name=f"task{i}") for i in range(tasks)}
    deltas["task0"].freeze_module(exclude=["deltas"], set_state_dict=True)
    return deltas


def mixed_pass(base: nn.Module, batches: list[dict[str, torch.Tensor]], tasks: int) -> Callable[[], None]:
    model = copy.deepcopy(base).train()
    deltas = _deltas(model, tasks)
    routing = TaskRouting(model, deltas)
    params = [p for d in deltas.values() for p in d.delta_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    names = list(deltas)
    collated = []
    for batch in batches:  # collated once, outside the timing: the rows and their task per row
        n = batch["input_ids"].shape[0]
        features = [{**{k: v[i] for k, v in batch.items()}, "task": names[i % tasks]} for i in range(n)]
        collated.append(routing.collate(features))

    def run() -> None:
        for batch in collated:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def sequential_pass(base: nn.Module, batches: list[dict[str, torch.Tensor]], tasks: int) -> Callable[[], None]:
    model = copy.deepcopy(base).train()
    deltas = list(_deltas(model, tasks).values())
    for delta in deltas[1:]:  # task0's freeze alone: each switch hands it to the next task
        delta.detach()
    for here, there in zip(deltas, deltas[1:] + deltas[:1]):  # a baseline training the backbone would be no baseline
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in here.delta_parameters()}, f"{here.name} trains more than its delta"
        here.switch(to=there)
    optimizers = [torch.optim.AdamW(d.delta_parameters(), lr=1e-4) for d in deltas]
    per_task = len(batches) // tasks
    state = {"current": 0}

    def run() -> None:
        for t in range(tasks):
            if state["current"] != t:
                deltas[state["current"]].switch(to=deltas[t])
                state["current"] = t
            for batch in batches[t * per_task : (t + 1) * per_task]:
                model(**batch).loss.backward()
                optimizers[t].step()
                optimizers[t].zero_grad(set_to_none=True)

    return run


def measure(workload: str, tasks: int, batches: int, rounds: int, warmup: int,
            on_update: Callable[[dict], None] = lambda result: None) -> dict:
    """Seconds per pass of both ways, rows per second and the round-by-round ratio; prints a row and calls
    `on_update(result)` after every round, so a stopped run keeps the rounds it finished."""
    chosen = by_name(workload)
    base = chosen.load()
    pool = _batches(chosen.batch(base, torch.device("cpu")), tasks, batches)
    rows = sum(b["input_ids"].shape[0] for b in pool)
    fns = {"mixed": mixed_pass(base, pool, tasks), "sequential": sequential_pass(base, pool, tasks)}
    result: dict = {
        "workload": chosen.description, "batch": [chosen.batch_size, chosen.seq_len], "tasks": tasks,
        "rows_per_pass": rows, "threads": torch.get_num_threads(), "rounds": rounds, "warmup": warmup,
    }
    print(f"{result['workload']}, batch {result['batch']}, {tasks} tasks, {rows} rows per pass, "
          f"{result['threads']} threads", flush=True)
    started = time.perf_counter()

    def on_round(samples: Samples, done: int) -> None:
        wall, cpu = samples["wall"], samples["cpu"]
        result.update({
            "rounds_done": done,
            "seconds_per_pass": {name: Spread.of(values).to_dict() for name, values in wall.items()},
            "rows_per_second": {name: rows / Spread.of(values).median for name, values in wall.items()},
            "ratio mixed / sequential": ratio(wall, "mixed", "sequential").to_dict(),
            "cpu ratio mixed / sequential": ratio(cpu, "mixed", "sequential").to_dict(),
        })
        print(round_line(samples, done, rounds, started), flush=True)
        on_update(result)

    interleaved(fns, rounds, warmup, on_round=on_round)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multitask_training", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="minilm", help="workload (minilm, smollm2, tiny-bert, tiny-llama, ...)")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2, help="batches per task in one pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny-llama, 2 tasks, 1 batch each, 1 round")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (after every round)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.only, args.tasks, args.batches, args.rounds, args.warmup, args.threads = "tiny-llama", 2, 1, 1, 0, 1
    torch.set_num_threads(args.threads)
    result = measure(args.only, args.tasks, args.batches, args.rounds, args.warmup,
                     on_update=lambda result: write_json(result, args.json))
    for name, spread in result["seconds_per_pass"].items():
        print(f"  {name:10s} {spread['median']:.2f} s per pass, {result['rows_per_second'][name]:.1f} rows/s")
    r, c = result["ratio mixed / sequential"], result["cpu ratio mixed / sequential"]
    print(f"  mixed / sequential: {r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}] (cpu {c['median']:.3f})")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
