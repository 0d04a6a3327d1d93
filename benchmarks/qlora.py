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
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks.memory import PRELOAD, saved_bytes, step_peak
from benchmarks.timing import Spread, interleaved, ratio, write_json
from benchmarks.variants import Built, build_opendelta, build_peft, train_step
from benchmarks.workloads import by_name

#: (name, bits, compute dtype) of each quantized setting
SETTINGS = (("nf4-fp32", 4, torch.float32), ("nf4-bf16", 4, torch.bfloat16), ("int8", 8, torch.float32))
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
    return step_peak(train_step(built, by_name(workload).batch(built.model, torch.device("cpu"))), torch.device("cpu"))


def peaks(workload: str, folder: str, threads: int) -> dict[str, dict[str, dict]]:
    """setting -> tool -> peak memory of a training step (benchmarks/memory.py), each configuration in its own
    fresh process (forked from a server that imported the libraries only), two at a time; nothing is timed."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, "bitsandbytes"])
    tasks = [(workload, folder, bits, dtype, tool, threads) for _, bits, dtype in SETTINGS for tool in TOOLS]
    with context.Pool(processes=2, maxtasksperchild=1) as pool:
        results = iter(pool.map(_peak, tasks, chunksize=1))
    return {name: {tool: next(results) for tool in TOOLS} for name, _, _ in SETTINGS}


def measure(workload: str, rounds: int, warmup: int, peak: bool = True) -> dict:
    """Per setting: median seconds per step of each tool, the round-by-round ratio opendelta / PEFT,
    the bytes saved for backward and (`peak`) the peak memory of a step; plus the backbone's bytes per
    setting against fp32."""
    chosen = by_name(workload)
    folder = _folder(workload)
    dense = load(folder, None)
    batch = chosen.batch(dense, torch.device("cpu"))
    result: dict = {
        "workload": chosen.description,
        "batch": [chosen.batch_size, chosen.seq_len],
        "threads": torch.get_num_threads(),
        "backbone_bytes": {"fp32": dense.get_memory_footprint()},
        "settings": {},
    }
    del dense
    for name, bits, dtype in SETTINGS:
        built = {tool: _lora(tool, load(folder, bits, dtype)) for tool in TOOLS}
        result["backbone_bytes"][name] = built["opendelta"].model.get_memory_footprint()
        saved = {tool: saved_bytes(b.model, batch) for tool, b in built.items()}
        samples = interleaved({tool: train_step(b, batch) for tool, b in built.items()}, rounds, warmup)
        result["settings"][name] = {
            "seconds": {tool: Spread.of(values).to_dict() for tool, values in samples["wall"].items()},
            "ratio": ratio(samples["wall"], "opendelta", "peft").to_dict(),
            "cpu_ratio": ratio(samples["cpu"], "opendelta", "peft").to_dict(),
            "saved_bytes": saved,
            "saved_ratio": saved["opendelta"] / saved["peft"],
        }
        del built
    for name, by_tool in (peaks(workload, folder, torch.get_num_threads()) if peak else {}).items():
        result["settings"][name]["peak"] = by_tool | {"step_ratio": by_tool["opendelta"]["step_bytes"]
                                                      / by_tool["peft"]["step_bytes"]}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qlora", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="workload: smollm2 (default) or tiny-llama (--smoke's)")
    parser.add_argument("--smoke", action="store_true", help="the tiny LLaMA, for a quick check of the script")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory processes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.only or ("tiny-llama" if args.smoke else "smollm2"), args.rounds, args.warmup,
                     peak=not args.no_peak)
    print(f"{result['workload']}, batch {result['batch']}, {result['threads']} threads")
    fp32 = result["backbone_bytes"]["fp32"]
    for name, figures in result["settings"].items():
        seconds, spread, cpu = figures["seconds"], figures["ratio"], figures["cpu_ratio"]
        print(f"  {name:9s} opendelta {seconds['opendelta']['median']:.3f} s/step, peft {seconds['peft']['median']:.3f} "
              f"s/step, ratio {spread['median']:.3f} [{spread['q1']:.3f}, {spread['q3']:.3f}] cpu {cpu['median']:.3f}; "
              f"saved for backward {figures['saved_ratio']:.3f}x PEFT's; backbone "
              f"{result['backbone_bytes'][name] / fp32:.3f}x fp32")
        peak = figures.get("peak")
        if peak:
            print(f"  {'':9s} peak resident set opendelta {peak['opendelta']['peak_bytes'] / 2**20:.0f} MiB, peft "
                  f"{peak['peft']['peak_bytes'] / 2**20:.0f} MiB; a step's own peak (above the built model) "
                  f"{peak['step_ratio']:.3f}x PEFT's")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
