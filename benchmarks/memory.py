"""Peak memory of a training step, each configuration in a fresh process.

CPU: the resident-set high-water mark (VmHWM), reset through ``/proc/self/clear_refs`` once the
model is built, so loading peaks do not count; ``step_bytes`` is that peak minus the resident set
just before the first step (activations, gradients, optimizer state and allocator slack).
CUDA: ``torch.cuda.max_memory_allocated`` over the same steps, minus the allocation before them.
Both also report ``saved_bytes``: the bytes autograd keeps for backward (parameters excluded),
which is exact and noise-free.

Run as ``python -m benchmarks.memory WORKLOAD VARIANT --device cpu``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

STEPS = 3
PRELOAD = [
    "benchmarks",  # first: it filters the known torchao import warnings before peft imports torchao
    "torch", "transformers", "peft", "opendelta", "benchmarks.variants", "benchmarks.workloads",
    "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama",
]


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def measure(workload_name: str, variant: str, device: str, threads: int = 2) -> dict[str, int | str]:
    from benchmarks.variants import build, train_step
    from benchmarks.workloads import by_name

    torch.set_num_threads(threads)
    workload = by_name(workload_name)
    dev = torch.device(device)
    model = workload.load().to(dev)
    built = build(variant, model)
    batch = workload.batch(model, dev)
    return step_peak(train_step(built, batch), dev) | {"saved_bytes": saved_bytes(built.model, batch)}


def step_peak(step: Callable[[], None], dev: torch.device) -> dict[str, int | str]:
    """Peak memory over STEPS calls of a built training `step`, from its start (see the module docstring)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
        peak, kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current resident set
        before = _status("VmRSS")
        for _ in range(STEPS):
            step()
        peak, kind = _status("VmHWM"), "cpu resident set (VmHWM)"
    return {"peak_bytes": peak, "step_bytes": peak - before, "kind": kind}


def _measure_task(task: tuple[str, str, str, int]) -> dict[str, int | str]:
    try:
        return measure(*task)
    except Exception as exc:  # reported in the table, the other configurations still run
        return {"error": f"{type(exc).__name__}: {exc}"}


def probe_all(
    workload_name: str,
    variants: list[str],
    device: str,
    threads: int = 2,
    on_result: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """Measure every variant in its own fresh process, two side by side (nothing is timed); `on_result`
    sees each variant's figures as soon as its process is done."""
    tasks = {v: (workload_name, v, device, threads) for v in variants}
    return in_fresh_processes(_measure_task, tasks, PRELOAD, on_result)


def in_fresh_processes(
    fn: Callable[[Any], dict],
    tasks: dict[str, Any],
    preload: list[str],
    on_result: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """``fn(task)`` for every named task, each in a fresh process of its own, two at a time; the results
    by name, in the order of `tasks`. `on_result` sees each (name, result) as it comes in.

    The processes are forked from a fork server that has imported `preload` and nothing else, so each
    starts as clean as a new interpreter without paying the import again.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    names = list(tasks)
    done: dict[str, dict] = {}
    with context.Pool(processes=min(2, len(names)), maxtasksperchild=1) as pool:
        for name, result in zip(names, pool.imap(fn, [tasks[n] for n in names], chunksize=1), strict=True):
            done[name] = result
            if on_result is not None:
                on_result(name, result)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workload")
    parser.add_argument("variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.workload, args.variant, args.device, args.threads)))


if __name__ == "__main__":
    main()
