"""``opendelta demo``: delta-tune the real MiniLM on real tweets and show what it bought.

``opendelta demo multitask``: one real SmolLM2 backbone serves several tasks by attaching and
detaching one delta per task (the paper's Figure 4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from opendelta.errors import OpenDeltaError
from opendelta.registry import known_delta_types


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="delta-tune the real MiniLM into a tweet sentiment classifier")
    parser.add_argument("--delta", default="lora", choices=known_delta_types(), help="delta method (default lora)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: tuned per method)")
    parser.add_argument("--out", default="runs/demo", help="where the delta checkpoint is written")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    parser.add_argument("--no-tree", action="store_true", help="do not print the model tree")
    parser.add_argument(  # the choices are sentiment.QUANTIZATIONS (not imported here: it imports torch)
        "--quantize", choices=("nf4", "int8"), default=None,
        help="load the backbone quantized by bitsandbytes (4-bit NF4 or 8-bit); the delta trains beside it",
    )
    modes = parser.add_subparsers(dest="mode", metavar="{multitask}", help="another demo (default: the single task above)")
    multitask = modes.add_parser(
        "multitask", help="one SmolLM2 backbone, one delta per task: attach -> answer -> detach"
    )
    multitask.add_argument("--steps", type=int, default=None,
                           help="training steps per task (default: each task's own, tuned by a sweep)")
    multitask.add_argument("--batch-size", type=int, default=8)
    multitask.add_argument("--examples", type=int, default=None,
                           help="held-out inputs scored per task, delta vs bare backbone (default: 80 for "
                                "spelling and hashtags, 200 for sentiment)")
    multitask.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens per answer")
    multitask.add_argument("--seed", type=int, default=0)
    multitask.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    multitask.add_argument(
        "--cache-dir", default=None, help="where the dequantised backbone is kept (default ~/.cache/opendelta/smollm2)"
    )
    multitask.add_argument("--no-cache", action="store_true", help="dequantise the GGUF every time; write no cache")
    multitask.add_argument("--out", default="runs/multitask", help="where the per-task delta checkpoints are written")
    multitask.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")


def _check_writable(out: Path) -> str | None:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} exists and is not a directory; name a directory"
    if not probe.is_dir():
        return f"--out {str(out)!r} is inside {str(probe)!r}, which is a file; name a directory"
    if not os.access(probe, os.W_OK):
        return f"--out {str(out)!r} is not writable; name a directory you can write to"
    return None


def _positive(args: argparse.Namespace, names: tuple[str, ...]) -> str | None:
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    return None


def _console(stderr: bool) -> Console:
    """Rich output; in a pipe or log (80 columns by default) wide enough that tables keep whole words."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=max(console.width, 120))


def run(args: argparse.Namespace) -> int:
    problem = _check_writable(Path(args.out))
    if problem is None and args.mode == "multitask":
        problem = _positive(args, ("steps", "batch_size", "examples", "max_new_tokens", "threads"))
    if problem is None and args.mode is None:
        problem = _positive(args, ("epochs", "train_size", "test_size"))
        if problem is None and args.lr is not None and not args.lr > 0:
            problem = f"--lr must be a positive number, got {args.lr}"
    if problem:
        print(f"opendelta demo: {problem}", file=sys.stderr)
        return 2
    if args.mode == "multitask":
        return _run_multitask(args)
    return _run_single(args)


def _run_multitask(args: argparse.Namespace) -> int:
    import torch

    from opendelta.demo import multitask

    console = _console(stderr=args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else multitask.DEFAULT_CACHE
    try:
        result = multitask.run(
            steps=args.steps,
            batch_size=args.batch_size,
            examples=args.examples,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            cache_dir=cache_dir,
            out=args.out,
            console=console,
        )
    except (OpenDeltaError, OSError, ValueError) as exc:
        print(f"opendelta demo multitask: {exc}", file=sys.stderr)
        return 1
    console.print(multitask.answers_table(result))
    console.print(multitask.summary_table(result))
    if args.json:
        print(json.dumps(multitask.as_json(result)))
    return 0 if result.backbone_restored else 1


def _run_single(args: argparse.Namespace) -> int:
    from opendelta.demo import sentiment

    console = _console(stderr=args.json)
    try:
        result = sentiment.run(
            delta_type=args.delta,
            epochs=args.epochs,
            train_size=args.train_size,
            test_size=args.test_size,
            seed=args.seed,
            out=args.out,
            console=console,
            show_tree=not args.no_tree,
            lr=args.lr,
            quantize=args.quantize,
        )
    except (OpenDeltaError, OSError, ValueError) as exc:
        print(f"opendelta demo: {exc}", file=sys.stderr)
        return 1
    console.print(sentiment.summary_table(result))
    if args.json:
        print(json.dumps(sentiment.as_json(result)))
    return 0 if result.reload_identical else 1
