"""The figures, per workload: training step, peak memory, inference, construction, switching,
parameters and checkpoint bytes. Every comparison is a ratio of interleaved measurements."""

from __future__ import annotations

import copy
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.memory import probe_all
from benchmarks.timing import Spread, interleaved, summary
from benchmarks.variants import (
    METHODS,
    build,
    build_opendelta,
    build_peft,
    inference,
    merge,
    train_step,
    variants,
)
from benchmarks.workloads import Workload, meta_skeleton

MIXED_TASKS = 4
MERGE_NA = "n/a: this tool cannot merge the delta"


@dataclass(frozen=True)
class Settings:
    device: torch.device
    rounds: int
    warmup: int
    memory: bool = True
    threads: int = 2

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _fresh(base: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(base).to(device)


def training(base: nn.Module, batch: dict, methods: list[str], s: Settings) -> dict[str, Any]:
    """Step time (forward + backward + AdamW) of every configuration, interleaved."""
    names = variants(methods)
    steps = {v: train_step(build(v, _fresh(base, s.device)), batch) for v in names}
    samples = interleaved(steps, s.rounds, s.warmup, s.sync)
    pairs = [("opendelta:lora", "peft:lora"), ("opendelta:lora", "full"), ("peft:lora", "full"), ("frozen", "full")]
    pairs += [(f"opendelta:{m}", "opendelta:lora") for m in methods if m != "lora"]
    pairs += [(f"opendelta:{m}", f"peft:{m}") for m in methods if m != "lora" and f"peft:{m}" in names]
    del steps
    gc.collect()
    return summary(samples, pairs)


def inference_latency(base: nn.Module, batch: dict, s: Settings) -> dict[str, Any]:
    """Forward latency of the bare backbone and of LoRA unmerged / merged, by both tools."""
    models: dict[str, nn.Module] = {"bare": build("bare", _fresh(base, s.device)).model}
    notes: dict[str, str] = {}
    for tool in ("opendelta", "peft"):
        models[f"{tool}:lora"] = build(f"{tool}:lora", _fresh(base, s.device)).model
        merged = build(f"{tool}:lora", _fresh(base, s.device))
        if merge(merged.delta):
            models[f"{tool}:lora merged"] = merged.model
        else:
            notes[f"{tool}:lora merged"] = MERGE_NA
    fns = {name: inference(model, batch) for name, model in models.items()}
    samples = interleaved(fns, s.rounds, s.warmup, s.sync, min_seconds=0.05)
    result = summary(samples, [(name, "bare") for name in models if name != "bare"])
    result["notes"] = notes
    return result


def inference_one_model(base: nn.Module, batch: dict, s: Settings) -> dict[str, Any]:
    """Forward latency of ONE model object switched between bare (delta detached), LoRA unmerged and
    LoRA merged before each timed call: the same weight tensors in the same memory in all three, so
    where a copy of the model happens to sit in memory (a few % on this VM, see BENCHMARKS.md)
    does not enter the ratios. The states are set outside the timed region."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = _fresh(base, s.device).eval()
    delta = build_opendelta(model, "lora")

    def to(state: str) -> Callable[[], None]:
        def setup() -> None:
            if delta.is_merged:
                delta.unmerge()
            if state == "bare" and delta.is_attached:
                delta.detach()
            elif state != "bare" and not delta.is_attached:
                delta.attach()
            if state == "opendelta:lora merged":
                delta.merge()

        return setup

    def forward(_: object) -> None:
        with torch.inference_mode():
            model(**inputs)

    states = ("bare", "opendelta:lora", "opendelta:lora merged")
    samples = interleaved({name: forward for name in states}, 3 * s.rounds, s.warmup, s.sync,
                          setup={name: to(name) for name in states})
    return summary(samples, [(name, "bare") for name in states if name != "bare"])


def construction(make: Callable[[], nn.Module], s: Settings, rounds: int | None = None) -> dict[str, Any]:
    """Time to make a fresh backbone LoRA-ready (addressing, layers, hooks, freezing), each tool."""
    fns = {
        "opendelta:lora": lambda model: build_opendelta(model, "lora"),
        "peft:lora": lambda model: build_peft(model, "lora"),
    }
    samples = interleaved(fns, rounds or s.rounds, s.warmup, s.sync, setup={name: make for name in fns})
    return summary(samples, [("opendelta:lora", "peft:lora")])


def mixed_batches(base: nn.Module, batch: dict, s: Settings) -> dict[str, Any]:
    """Forward latency of one batch whose rows belong to MIXED_TASKS different LoRA deltas (rows
    round-robin), against the same batch through one attached delta, for both tools."""
    from opendelta import mixed_batch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    n = next(iter(inputs.values())).shape[0]
    rows = [i % MIXED_TASKS for i in range(n)]
    names = [f"task_{i}" for i in range(MIXED_TASKS)]
    od_model = _fresh(base, s.device).eval()  # all tasks attached; a mixed batch routes each row to one
    deltas = [build_opendelta(od_model, "lora", name=name) for name in names]
    single_model = _fresh(base, s.device).eval()
    build_opendelta(single_model, "lora", name=names[0])
    peft_model = build_peft(_fresh(base, s.device), "lora", adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, METHODS["lora"].peft_config(_peft_targets(peft_model)))
    peft_model.eval()
    with torch.no_grad():  # a fresh LoRA's B is zero: give every task a real update
        for model in (od_model, single_model, peft_model):
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.01)

    def od_single() -> None:
        single_model(**inputs)

    def od_mixed() -> None:
        with mixed_batch(deltas, rows):
            od_model(**inputs)

    def peft_single() -> None:
        peft_model(**inputs)

    def peft_mixed() -> None:
        peft_model(**inputs, adapter_names=[names[r] for r in rows])

    fns = {"opendelta:lora single": od_single, "opendelta:lora mixed": od_mixed,
           "peft:lora single": peft_single, "peft:lora mixed": peft_mixed}
    with torch.inference_mode():
        samples = interleaved(fns, s.rounds, s.warmup, s.sync, min_seconds=0.05)
    return summary(samples, [("opendelta:lora mixed", "opendelta:lora single"), ("peft:lora mixed", "peft:lora single"),
                            ("opendelta:lora mixed", "peft:lora mixed")])


def switching(base: nn.Module, s: Settings) -> dict[str, Any]:
    """Latency of switching one backbone between two LoRA task deltas."""
    od_model = _fresh(base, s.device)
    a = build_opendelta(od_model, "lora", name="task_a")
    b = build_opendelta(od_model, "lora", name="task_b").detach()
    od_state = [a, b]

    def od_switch() -> None:
        od_state[0].detach()
        od_state[1].attach()
        od_state.reverse()

    peft_model = build_peft(_fresh(base, s.device), "lora", adapter_name="task_a")
    peft_model.add_adapter("task_b", METHODS["lora"].peft_config(_peft_targets(peft_model)))
    peft_state = ["task_a", "task_b"]

    def peft_switch() -> None:
        peft_model.set_adapter(peft_state[1])
        peft_state.reverse()

    samples = interleaved({"opendelta:lora": od_switch, "peft:lora": peft_switch}, s.rounds, 2, s.sync, min_seconds=0.05)
    return summary(samples, [("opendelta:lora", "peft:lora")])


def _peft_targets(peft_model: Any) -> list[str]:
    return sorted(next(iter(peft_model.peft_config.values())).target_modules)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parameters_and_checkpoints(base: nn.Module, methods: list[str]) -> dict[str, Any]:
    """Trainable parameters and bytes on disk of each method's checkpoint, against its tensors' bytes."""
    result: dict[str, Any] = {}
    for method in methods:
        for tool in ("opendelta", "peft"):
            if tool == "peft" and METHODS[method].peft_config is None:
                continue
            built = build(f"{tool}:{method}", copy.deepcopy(base))
            tensor_bytes = sum(p.numel() * p.element_size() for p in built.trainable)
            with tempfile.TemporaryDirectory() as tmp:
                if tool == "opendelta":
                    built.delta.save_finetuned(tmp)
                else:
                    built.delta.save_pretrained(tmp)
                disk = _dir_bytes(Path(tmp))
            result[f"{tool}:{method}"] = {
                "trainable_parameters": sum(p.numel() for p in built.trainable),
                "tensor_bytes": tensor_bytes,
                "checkpoint_bytes": disk,
                "overhead_bytes": disk - tensor_bytes,
            }
    return result


def run_workload(
    workload: Workload, methods: list[str], s: Settings, into: dict[str, Any] | None = None,
    on_figure: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Every figure for one workload, filled into `into` (default a new dict) and returned; `on_figure` is
    called after each figure, so a caller holding `into` can save what is done."""
    base = workload.load()
    batch = workload.batch(base, s.device)
    result: dict[str, Any] = into if into is not None else {}
    result.update({
        "description": workload.description,
        "batch": [workload.batch_size, workload.seq_len],
        "parameters": sum(p.numel() for p in base.parameters()),
    })
    figures: list[tuple[str, Callable[[], Any]]] = [
        ("train_step", lambda: training(base, batch, methods, s)),
        ("inference", lambda: inference_latency(base, batch, s)),
        ("inference_one_model", lambda: inference_one_model(base, batch, s)),
        ("construction", lambda: construction(lambda: _fresh(base, s.device), s)),
        ("switch", lambda: switching(base, s)),
        ("mixed_batch", lambda: mixed_batches(base, batch, s)),
        ("params_checkpoint", lambda: parameters_and_checkpoints(base, methods)),
    ]
    if s.memory:
        figures.append(("memory", lambda: probe_all(workload.name, variants(methods), str(s.device), s.threads)))
    for key, figure in figures:
        started = time.perf_counter()
        result[key] = figure()
        if key == "memory":
            result["memory_ratios"] = _memory_ratios(result["memory"])
        print(f"[benchmarks]   {key}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        on_figure()
    return result


def _memory_ratios(memory: dict[str, dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    pairs = [("opendelta:lora", "peft:lora"), ("opendelta:lora", "full"), ("peft:lora", "full"), ("frozen", "full")]
    # every other method beside LoRA by the same tool, and beside PEFT's same method
    others = [v.split(":", 1)[1] for v in memory if v.startswith("opendelta:") and v != "opendelta:lora"]
    pairs += [(f"{tool}:{m}", f"{tool}:lora") for m in others for tool in ("opendelta", "peft") if f"{tool}:{m}" in memory]
    pairs += [(f"opendelta:{m}", f"peft:{m}") for m in others if f"peft:{m}" in memory]
    for a, b in pairs:
        ma, mb = memory.get(a, {}), memory.get(b, {})
        if "peak_bytes" in ma and "peak_bytes" in mb:
            out[f"{a} / {b}"] = {k: ma[k] / mb[k] for k in ("peak_bytes", "step_bytes", "saved_bytes") if mb[k] > 0}
    return out


def run_skeleton(name: str, sizes: dict[str, int], s: Settings) -> dict[str, Any]:
    """Construction time on a meta-device skeleton (no memory behind its weights)."""
    template = meta_skeleton(sizes)
    result = {"description": f"LlamaForCausalLM skeleton on the meta device ({sizes['num_hidden_layers']} layers, "
              f"hidden {sizes['hidden_size']})", "parameters": sum(p.numel() for p in template.parameters())}
    meta = Settings(torch.device("meta"), s.rounds, s.warmup, memory=False, threads=s.threads)
    result["construction"] = construction(lambda: copy.deepcopy(template), meta, rounds=max(s.rounds, 5))
    result["visualisation"] = visualisation(template, rounds=max(s.rounds, 5))
    return result


def visualisation(model: nn.Module, rounds: int) -> dict[str, Any]:
    """Seconds to build and print the collapsed tree of `model` with LoRA attached (to a string)."""
    import io

    from rich.console import Console

    from bigmodelvis import Visualization

    with_lora = copy.deepcopy(model)
    build_opendelta(with_lora, "lora")

    def render() -> None:
        Visualization(with_lora, console=Console(file=io.StringIO(), width=120)).structure_graph()

    samples = interleaved({"opendelta:lora": render}, rounds, warmup=1)
    return {"seconds": {name: Spread.of(values).to_dict() for name, values in samples["wall"].items()}}
