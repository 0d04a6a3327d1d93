"""The suite's results as tables, machine facts, and the targets the engine must hold."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

KIB = 1024


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import peft
    import torch
    import transformers

    import opendelta

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    root = Path(__file__).parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "opendelta": opendelta.__version__,
        "commit": commit,
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _get(data: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked against the medians."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, unit: str = "x", cpu: float | None = None) -> None:
        if value is not None:
            checks.append({"target": name, "value": value, "cpu_value": cpu, "limit": limit, "unit": unit, "met": value <= limit})

    def timed(w: dict, figure: str, pair: str) -> dict[str, float | None]:
        return {"value": _get(w, figure, "ratios", pair, "median"), "cpu": _get(w, figure, "cpu_ratios", pair, "median")}

    for wname, w in results["workloads"].items():
        check(f"{wname}: LoRA train step / PEFT", limit=0.95, **timed(w, "train_step", "opendelta:lora / peft:lora"))
        check(f"{wname}: LoRA peak memory / PEFT", _get(w, "memory_ratios", "opendelta:lora / peft:lora", "peak_bytes"), 1.0)
        # on one model switched between states: separate copies differ by their placement in memory
        check(f"{wname}: LoRA unmerged inference / bare", limit=1.03, **timed(w, "inference_one_model", "opendelta:lora / bare"))
        check(f"{wname}: LoRA merged inference / bare", limit=1.01, **timed(w, "inference_one_model", "opendelta:lora merged / bare"))
        overhead = _get(w, "params_checkpoint", "opendelta:lora", "overhead_bytes")
        check(f"{wname}: LoRA checkpoint bytes - tensor bytes", overhead / KIB if overhead is not None else None, 16, "KiB")
    for sname, sk in results.get("skeletons", {}).items():
        check(f"{sname}: LoRA construction / PEFT", limit=1.0, **timed(sk, "construction", "opendelta:lora / peft:lora"))
        seconds = _get(sk, "visualisation", "seconds", "opendelta:lora", "median")
        check(f"{sname}: visualisation with LoRA", seconds, 1.0, "s")
    return checks


def _ms(spread: dict[str, float] | None) -> str:
    if spread is None:
        return "-"
    return escape(f"{1e3 * spread['median']:.2f} ms [{1e3 * spread['q1']:.2f}-{1e3 * spread['q3']:.2f}]")


def _ratio(spread: dict[str, float] | None) -> str:
    if spread is None:
        return "-"
    return escape(f"{spread['median']:.3f}x [{spread['q1']:.3f}-{spread['q3']:.3f}]")


def _timed_rows(table: Table, figure: str, block: dict[str, Any] | None) -> None:
    if not block:
        return
    for name, spread in block["seconds"].items():
        table.add_row(figure, name, _ms(spread), "", "")
    for name, spread in block.get("ratios", {}).items():
        table.add_row(figure, name, "", _ratio(spread), _ratio(block.get("cpu_ratios", {}).get(name)))
    for name, note in block.get("notes", {}).items():
        table.add_row(figure, name, note, "", "")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_report(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=160)
    m = results["machine"]
    console.print(f"[bold]machine[/]: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), "
                  f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, opendelta {m['opendelta']} "
                  f"@ {m['commit']}; device {results['settings']['device']}, {results['settings']['rounds']} rounds")
    console.print(escape("times: median [interquartile range] over interleaved rounds; ratios: median [IQR] of "
                         "per-round ratios, on the wall clock and on this process's CPU clock"))
    for wname, w in {**results["workloads"], **results.get("skeletons", {})}.items():
        batch = f", batch {w['batch'][0]}x{w['batch'][1]}" if "batch" in w else ""
        table = Table(title=f"{wname}: {w['description']}{batch}, {w['parameters']:,} parameters", title_justify="left")
        for col in ("figure", "configuration", "value (wall)", "ratio (wall)", "ratio (cpu)"):
            table.add_column(col)
        _timed_rows(table, "train step", w.get("train_step"))
        for name, mem in w.get("memory", {}).items():
            value = mem.get("error") or (f"peak {_mib(mem['peak_bytes'])}, step {_mib(mem['step_bytes'])}, "
                                         f"autograd-saved {_mib(mem['saved_bytes'])}")
            table.add_row("memory", name, value, "", "")
        for name, r in w.get("memory_ratios", {}).items():
            table.add_row("memory", name, "", ", ".join(f"{k.split('_')[0]} {v:.3f}x" for k, v in r.items()), "")
        _timed_rows(table, "inference", w.get("inference"))
        _timed_rows(table, "inference, one model", w.get("inference_one_model"))
        _timed_rows(table, "construction", w.get("construction"))
        _timed_rows(table, "visualisation", w.get("visualisation"))
        _timed_rows(table, "switch", w.get("switch"))
        if isinstance(w.get("mixed_batch"), dict):
            _timed_rows(table, "mixed batch", w["mixed_batch"])
        for name, pc in w.get("params_checkpoint", {}).items():
            table.add_row("checkpoint", name, f"{pc['trainable_parameters']:,} trainable, {pc['checkpoint_bytes']:,} B on disk "
                          f"({pc['tensor_bytes']:,} B tensors + {pc['overhead_bytes']:,} B)", "", "")
        console.print(table)
    table = Table(title="targets", title_justify="left")
    for col in ("target", "value (wall)", "value (cpu)", "limit", "met (wall)"):
        table.add_column(col)
    for t in results["targets"]:
        cpu = "" if t["cpu_value"] is None else f"{t['cpu_value']:.3f}{t['unit']}"
        met = "yes" if t["met"] else "[red]NO[/]"
        table.add_row(t["target"], f"{t['value']:.3f}{t['unit']}", cpu, f"<= {t['limit']}{t['unit']}", met)
    console.print(table)
