"""``python -m benchmarks [--smoke] [--device cpu|cuda] [--json PATH]``: run the suite, print the tables."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks import workloads  # noqa: E402
from benchmarks.report import machine, print_report, targets  # noqa: E402
from benchmarks.suite import Settings, run_skeleton, run_workload  # noqa: E402
from benchmarks.timing import write_json  # noqa: E402
from benchmarks.variants import available_methods  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="opendelta vs PEFT vs full fine-tuning")
    parser.add_argument("--smoke", action="store_true", help="tiny models, few rounds: a fast check that everything runs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per figure (default 7, smoke 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls before the rounds (default 1)")
    parser.add_argument("--only", help="comma-separated workload names (e.g. minilm,llama-7b-meta)")
    parser.add_argument("--methods", help="comma-separated delta methods to train (default all; LoRA is always included)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 2, smoke 1: tiny ops only lose from threading)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads or (1 if args.smoke else 2))
    settings = Settings(
        device=torch.device(args.device),
        rounds=args.rounds or (3 if args.smoke else 7),
        warmup=args.warmup if args.warmup is not None else 1,
        memory=not args.no_memory,
        threads=torch.get_num_threads(),
    )
    chosen = set(args.only.split(",")) if args.only else None
    loads = workloads.SMOKE if args.smoke else workloads.FULL
    skeletons = workloads.SMOKE_SKELETONS if args.smoke else workloads.SKELETONS
    methods = available_methods()
    if args.methods:
        wanted = {"lora", *args.methods.split(",")}
        unknown = wanted - set(methods)
        if unknown:
            sys.exit(f"--methods: unknown {sorted(unknown)}; choose from {methods}")
        methods = [m for m in methods if m in wanted]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "settings": {"device": args.device, "rounds": settings.rounds, "warmup": settings.warmup, "smoke": args.smoke,
                     "methods": methods},
        "workloads": {},
        "skeletons": {},
    }

    def save() -> None:  # after every figure, so a long run that is stopped keeps what it measured
        if args.json:
            results["targets"] = targets(results)
            results["seconds"] = time.perf_counter() - started
            write_json(results, args.json)

    for name, sizes in skeletons.items():
        if chosen is None or name in chosen:
            print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
            results["skeletons"][name] = run_skeleton(name, sizes, settings)
            save()
    for workload in loads:
        if chosen is None or workload.name in chosen:
            print(f"[benchmarks] {workload.name} ...", file=sys.stderr, flush=True)
            run_workload(workload, methods, settings, into=results["workloads"].setdefault(workload.name, {}),
                         on_figure=save)
    results["targets"] = targets(results)
    results["seconds"] = time.perf_counter() - started
    print_report(results)
    save()
    return results


if __name__ == "__main__":
    main()
