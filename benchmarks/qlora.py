"""QLoRA beside PEFT's: LoRA's training step on a bitsandbytes-quantized backbone, and its memory.

    PYTHONPATH=src python -m benchmarks.qlora --rounds 7              # SmolLM2-135M, NF4 and int8, fp32 and bf16 compute
    PYTHONPATH=src python -m benchmarks.qlora --smoke --rounds 2      # a tiny LLaMA, seconds

Each configuration loads the backbone through ``BitsAndBytesConfig`` (4-bit NF4 or 8-bit, compute
dtype fp32 or bf16 for NF4) and adds LoRA (r=8, alpha=16) at the attention query and value
projections, by opendelta (``LoraModel``) and by PEFT (``get_peft_model``), each on its own load;
both keep the LoRA factors in fp32. One step is forward + backward + AdamW; the two steps of a setting
run interleaved (benchmarks/timing.py), so a busy machine slows them alike, and ratios are taken
round by round. Memory: the bytes autograd keeps for backward in one step (exact, noise-free;
benchmarks/memory.py's ``saved_bytes``), the backbone's bytes in 4-bit and 8-bit against fp32, and
each configuration's peak resident set over three steps, measured in a fresh process of its own
(benchmarks/memory.py's ``step_peak``; after the timed part, so it runs on its own).

``--counts`` measures no time: per setting, the exact counts of one training step of each tool (aten ops
by name at the dispatcher, forward, backward and AdamW; the bytes of the storages they create; Python
calls), which a loaded machine cannot blur. ``--settings int8,fp32 --counts`` sets a quantized step beside
the dense one: what a quantized layer adds to each tool's step.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.memory import PRELOAD, in_fresh_processes, saved_bytes, step_peak
from benchmarks.profile_decode import python_calls
from benchmarks.timing import Samples, Spread, interleaved, ratio, round_line, write_json
from benchmarks.variants import Built, build_opendelta, build_peft, train_step
from benchmarks.workloads import by_name

#: (name, bits, compute dtype) of each quantized setting
SETTINGS = (("nf4-fp32", 4, torch.float32), ("nf4-bf16", 4, torch.bfloat16), ("int8", 8, torch.float32))
#: the dense backbone, a reference setting for --counts only
DENSE = ("fp32", None, torch.float32)
TOOLS = ("opendelta", "peft")


def _folder(workload: str) -> str:
    """A folder from_pretrained can quantize while loading: SmolLM2's dequantised cache, or a saved tiny LLaMA."""
    if workload == "smollm2":
        from rich.console import Console

        from opendelta.demo.multitask import DEFAULT_CACHE, load_backbone

        if not (DEFAULT_CACHE / "model.safetensors").is_file():
            load_backbone(DEFAULT_CACHE, Console(quiet=True))
        return str(DEFAULT_CACHE)
    folder = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    by_name(workload).load().save_pretrained(folder)
    return str(folder)


def load(folder: str, bits: int | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model at `folder` in 4-bit NF4 or 8-bit (None: dense fp32), on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if bits is None:
        return AutoModelForCausalLM.from_pretrained(folder)
    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")


def _lora(tool: str, model: nn.Module) -> Built:
    if tool == "opendelta":
        build_opendelta(model, "lora")
        return Built(model, [p for p in model.parameters() if p.requires_grad])
    wrapped = build_peft(model, "lora")
    return Built(wrapped, [p for p in wrapped.parameters() if p.requires_grad], wrapped)


def _peak(task: tuple[str, str, int, torch.dtype, str, int]) -> dict:
    """One configuration's peak memory over its training steps, in this (fresh) process."""
    workload, folder, bits, dtype, tool, threads = task
    torch.set_num_threads(threads)
    built = _lora(tool, load(folder, bits, dtype))
    step = train_step(built, by_name(workload).batch(built.model, torch.device("cpu")))
    return step_peak(step, torch.device("cpu")) | {"backbone_bytes": built.model.get_memory_footprint()}


def peaks(workload: str, folder: str, threads: int, names: list[str],
          on_result: Callable[[str, str, dict], None] | None = None) -> dict[str, dict[str, dict]]:
    """setting -> tool -> peak memory of a training step (benchmarks/memory.py), each configuration in its own
    fresh process (forked from a server that imported the libraries only), two at a time; nothing is timed.
    `on_result(setting, tool, peak)` sees each configuration as soon as its process is done."""
    chosen = {name: (bits, dtype) for name, bits, dtype in SETTINGS if name in names}
    tasks = {(name, tool): (workload, folder, bits, dtype, tool, threads) for name, (bits, dtype) in chosen.items()
             for tool in TOOLS}
    done = in_fresh_processes(_peak, tasks, [*PRELOAD, "bitsandbytes"],
                              None if on_result is None else lambda key, peak: on_result(*key, peak))
    return {name: {tool: done[name, tool] for tool in TOOLS} for name in chosen}


def measure(workload: str, rounds: int, warmup: int, peak: bool = True, timing: bool = True,
            names: list[str] | None = None, on_update: Callable[[dict], None] = lambda result: None) -> dict:
    """Per setting (`names`, default all): median seconds per step of each tool, the round-by-round ratio
    opendelta / PEFT and the bytes saved for backward (`timing`), and the peak memory of a step (`peak`);
    plus the backbone's bytes per setting against fp32. Prints each row as it is measured and calls
    `on_update(result)` after every round and every memory probe, so a stopped run keeps what it measured."""
    chosen = by_name(workload)
    folder = _folder(workload)
    names = names or [name for name, _, _ in SETTINGS]
    dense = load(folder, None)
    batch = chosen.batch(dense, torch.device("cpu"))
    result: dict = {
        "workload": chosen.description,
        "batch": [chosen.batch_size, chosen.seq_len],
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "warmup": warmup,
        "backbone_bytes": {"fp32": dense.get_memory_footprint()},
        "settings": {},
    }
    del dense
    print(f"{result['workload']}, batch {result['batch']}, {result['threads']} threads", flush=True)
    started = time.perf_counter()
    for name, bits, dtype in SETTINGS:
        if not timing or name not in names:
            continue
        built = {tool: _lora(tool, load(folder, bits, dtype)) for tool in TOOLS}
        result["backbone_bytes"][name] = built["opendelta"].model.get_memory_footprint()
        saved = {tool: saved_bytes(b.model, batch) for tool, b in built.items()}
        figures = result["settings"][name] = {"saved_bytes": saved, "saved_ratio": saved["opendelta"] / saved["peft"]}

        def on_round(samples: Samples, done: int, figures: dict = figures) -> None:
            figures.update({
                "rounds_done": done,
                "seconds": {tool: Spread.of(values).to_dict() for tool, values in samples["wall"].items()},
                "ratio": ratio(samples["wall"], "opendelta", "peft").to_dict(),
                "cpu_ratio": ratio(samples["cpu"], "opendelta", "peft").to_dict(),
            })
            print(f"{name}" + round_line(samples, done, rounds, started), flush=True)
            on_update(result)

        interleaved({tool: train_step(b, batch) for tool, b in built.items()}, rounds, warmup, on_round=on_round)
        print(_row(name, result), flush=True)
        del built
    if peak:
        fp32 = result["backbone_bytes"]["fp32"]

        def on_peak(name: str, tool: str, figures: dict) -> None:
            entry = result["settings"].setdefault(name, {}).setdefault("peak", {})
            entry[tool] = figures
            if tool == "opendelta" and "backbone_bytes" in figures:
                result["backbone_bytes"].setdefault(name, figures["backbone_bytes"])
            if all("step_bytes" in entry.get(t, {}) for t in TOOLS):
                entry["step_ratio"] = entry["opendelta"]["step_bytes"] / entry["peft"]["step_bytes"]
            shown = (f"peak resident set {figures['peak_bytes'] / 2**20:.0f} MiB, a step's own "
                     f"{figures['step_bytes'] / 2**20:.0f} MiB" if "peak_bytes" in figures else figures.get("error"))
            print(f"  {name:9s} {tool:9s} {shown}; backbone {figures.get('backbone_bytes', 0) / fp32:.3f}x fp32 "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            on_update(result)

        peaks(workload, folder, torch.get_num_threads(), names, on_peak)
    return result


class _OpCounter(TorchDispatchMode):
    """The aten ops that run while it is entered, by name, and the bytes of the storages they create
    (an output sharing an input's storage, as a view or an in-place op's does, creates none)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.new_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket.__name__] += 1
        held = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in held:
                held.add(tensor.untyped_storage().data_ptr())
                self.new_bytes += tensor.untyped_storage().nbytes()
        return out


def step_counts(step: Callable[[], None]) -> dict:
    """Exact counts of one call of `step` (a training step: forward, backward, AdamW): aten ops per name
    and in all, the bytes of the storages they create, and Python function calls (cProfile's)."""
    with _OpCounter() as counter:
        step()
    return {"aten_ops": sum(counter.ops.values()), "ops": dict(sorted(counter.ops.items())),
            "new_bytes": counter.new_bytes, "python_calls": round(python_calls(step, 1))}


def op_differences(mine: dict[str, int], theirs: dict[str, int]) -> dict[str, int]:
    """Op name -> count in `mine` minus count in `theirs`, for the names whose counts differ."""
    return {op: mine.get(op, 0) - theirs.get(op, 0) for op in sorted({*mine, *theirs})
            if mine.get(op, 0) != theirs.get(op, 0)}


def counts(workload: str, names: list[str]) -> dict:
    """setting -> tool -> the exact counts of one training step (:func:`step_counts`, after a warm-up step)
    and the bytes saved for backward, each tool on its own load; printed with the ops whose counts differ
    between the tools, and, with the dense setting beside a quantized one, what quantizing adds to each tool."""
    chosen = by_name(workload)
    folder = _folder(workload)
    result: dict = {}
    for name, bits, dtype in (*SETTINGS, DENSE):
        if name not in names:
            continue
        figures = result[name] = {}
        for tool in TOOLS:
            built = _lora(tool, load(folder, bits, dtype))
            batch = chosen.batch(built.model, torch.device("cpu"))
            step = train_step(built, batch)
            step()
            figures[tool] = step_counts(step) | {"saved_bytes": saved_bytes(built.model, batch)}
            shown = figures[tool]
            print(f"  {name:9s} {tool:9s} aten ops {shown['aten_ops']}, new storages {shown['new_bytes']} B, Python "
                  f"calls {shown['python_calls']}, saved for backward {shown['saved_bytes']} B", flush=True)
            del built, step
        print(f"  {name:9s} op counts opendelta - peft: {op_differences(figures['opendelta']['ops'], figures['peft']['ops'])}")
    if DENSE[0] in result:
        for name in result.keys() - {DENSE[0]}:
            added = {tool: op_differences(result[name][tool]["ops"], result[DENSE[0]][tool]["ops"]) for tool in TOOLS}
            same = "the same for both tools" if added["opendelta"] == added["peft"] else "NOT the same for both tools"
            print(f"  {name} adds to each tool's step (op counts {name} - {DENSE[0]}), {same}: {added}")
    return result


def _row(name: str, result: dict) -> str:
    """One setting's timing row."""
    figures = result["settings"][name]
    seconds, spread, cpu = figures["seconds"], figures["ratio"], figures["cpu_ratio"]
    return (f"  {name:9s} opendelta {seconds['opendelta']['median']:.3f} s/step, peft {seconds['peft']['median']:.3f} "
            f"s/step, ratio {spread['median']:.3f} [{spread['q1']:.3f}, {spread['q3']:.3f}] cpu {cpu['median']:.3f} "
            f"({figures['rounds_done']} rounds); saved for backward {figures['saved_ratio']:.3f}x PEFT's; backbone "
            f"{result['backbone_bytes'][name] / result['backbone_bytes']['fp32']:.3f}x fp32")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qlora", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="workload: smollm2 (default) or tiny-llama (--smoke's)")
    parser.add_argument("--smoke", action="store_true", help="the tiny LLaMA, for a quick check of the script")
    parser.add_argument("--settings", default=",".join(name for name, _, _ in SETTINGS),
                        help="comma-separated settings to run (default all: nf4-fp32,nf4-bf16,int8)")
    parser.add_argument("--rounds", type=int, default=7)
    # measured: with one warm-up step, a setting's first rounds ran 10-20% slower (bf16 compute, an AVX512-BF16
    # CPU), mostly ours; three warm-up steps removed it
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each tool first (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (after every round)")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--no-peak", action="store_true", help="skip the peak-memory processes")
    memory.add_argument("--peak-only", action="store_true", help="only the peak-memory processes (no timing)")
    memory.add_argument("--counts", action="store_true",
                        help="no timing: the exact counts of one step of each tool (--settings may add fp32, dense)")
    args = parser.parse_args(argv)
    names = args.settings.split(",")
    unknown = set(names) - {name for name, _, _ in (*SETTINGS, *([DENSE] if args.counts else []))}
    if unknown:
        parser.error(f"--settings: unknown {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    if args.counts:
        result = counts(args.only or ("tiny-llama" if args.smoke else "smollm2"), names)
        write_json(result, args.json)
        return result
    result = measure(args.only or ("tiny-llama" if args.smoke else "smollm2"), args.rounds, args.warmup,
                     peak=not args.no_peak, timing=not args.peak_only, names=names,
                     on_update=lambda result: write_json(result, args.json))
    for name, figures in result["settings"].items():
        peak = figures.get("peak", {})
        if "step_ratio" in peak:
            print(f"  {name:9s} a step's own peak memory (above the built model) {peak['step_ratio']:.3f}x PEFT's",
                  flush=True)
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
