"""Serving speed of unmerged deltas (issue 21): greedy decoding and batch forwards on SmolLM2-135M.

Figures, each configuration timed once per round, rounds interleaved in one process (min and median):
  * decode attached / detached: LoRA r=8 on q,v of all 30 layers, IA3 and the adapter (defaults),
    batch 1 and batch 8, 16 new tokens: the cost of one unmerged delta per decoded token;
  * mixed-task decode: ``generate()`` inside ``mixed_batch`` over 8 tasks (batch 8) and 32 tasks
    (batch 32), one row each, / the same batch through one attached delta; PEFT's ``adapter_names=``
    generate beside it (its own ratio to its single adapter);
  * unmerged forward of 8 prompts: opendelta LoRA / PEFT LoRA.
The LoRA training step against PEFT is the main suite's ``train_step`` figure (``./dev.sh bench``).

    ./dev.sh python -m benchmarks.decode [--rounds 5] [--threads 1] [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from opendelta import AdapterModel, IA3Model, LoraModel, mixed_batch

NEW_TOKENS = 16
PROMPT = 8
QV = ["q_proj", "v_proj"]


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def smollm2() -> nn.Module:
    from benchmarks.workloads import _smollm2

    return _smollm2().eval()


def perturbed(delta, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator).to(p.dtype))
    return delta


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Each function once per round, rounds interleaved; seconds as min and median."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: {"min": min(v), "median": statistics.median(v)} for name, v in samples.items()}


def ratio(times: dict[str, dict[str, float]], num: str, den: str) -> dict[str, float]:
    return {key: times[num][key] / times[den][key] for key in ("min", "median")}


def generate(model: nn.Module, ids: torch.Tensor, **extra: object) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **extra)

    return run


def attached(delta, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        delta.attach()
        try:
            return fn()
        finally:
            delta.detach()

    return run


def decode_ratios(model: nn.Module, rounds: int, vocab: int) -> dict[str, object]:
    results: dict[str, object] = {}
    builders = {"lora": lambda: LoraModel(model, name="d", modified_modules=QV, lora_r=8),
                "ia3": lambda: IA3Model(model, name="d"), "adapter": lambda: AdapterModel(model, name="d")}
    for method, build in builders.items():
        delta = perturbed(build(), seed=1)
        delta.detach()
        for batch in (1, 8):
            ids = torch.randint(3, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
            run = generate(model, ids)
            times = interleaved({"attached": attached(delta, run), "detached": run}, rounds)
            results[f"{method} batch {batch}"] = {"seconds": times, "attached / detached": ratio(times, "attached", "detached")}
        if delta.is_attached:
            delta.detach()
    return results


def peft_model(model: nn.Module, names: list[str]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=QV, init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(model), config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    return peft.eval()


def mixed_decode(model: nn.Module, rounds: int, vocab: int, counts: tuple[int, ...]) -> dict[str, object]:
    results: dict[str, object] = {}
    for tasks in counts:
        names = [f"t{i}" for i in range(tasks)]
        deltas = [perturbed(LoraModel(model, name=n, modified_modules=QV, lora_r=8), seed=i + 1) for i, n in enumerate(names)]
        for d in deltas[1:]:
            d.detach()
        ids = torch.randint(3, vocab, (tasks, PROMPT), generator=torch.Generator().manual_seed(tasks))
        single = generate(model, ids)
        for d in deltas[1:]:
            d.attach()

        def mixed(deltas=deltas, ids=ids) -> object:
            with mixed_batch(deltas, list(range(len(deltas)))):
                return generate(model, ids)()

        def one(deltas=deltas, run=single) -> object:
            for d in deltas[1:]:
                d.detach()
            try:
                return run()
            finally:
                for d in deltas[1:]:
                    d.attach()

        peft = peft_model(model, names)
        peft.set_adapter(names[0])
        fns = {"opendelta mixed": mixed, "opendelta one delta": one,
               "peft mixed": generate(peft, ids, adapter_names=names), "peft one adapter": generate(peft, ids)}
        times = interleaved(fns, rounds)
        results[f"{tasks} tasks"] = {
            "seconds": times,
            "opendelta mixed / one delta": ratio(times, "opendelta mixed", "opendelta one delta"),
            "peft mixed / one adapter": ratio(times, "peft mixed", "peft one adapter"),
            "opendelta mixed / peft mixed": ratio(times, "opendelta mixed", "peft mixed"),
        }
        for d in deltas:
            d.detach()
        del peft
    return results


def forward_vs_peft(model: nn.Module, rounds: int, vocab: int) -> dict[str, object]:
    delta = perturbed(LoraModel(model, name="f", modified_modules=QV, lora_r=8), seed=3)
    peft = peft_model(model, ["f"])
    ids = torch.randint(3, vocab, (8, 32), generator=torch.Generator().manual_seed(8))

    def forward(m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(input_ids=ids)

        return run

    times = interleaved({"opendelta": forward(model), "peft": forward(peft)}, rounds)
    delta.detach()
    return {"seconds": times, "opendelta / peft": ratio(times, "opendelta", "peft")}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA, 2 rounds: checks that everything runs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tiny_llama() if args.smoke else smollm2()
    rounds = args.rounds or (2 if args.smoke else 5)
    vocab = min(1000, model.config.vocab_size)
    started = time.perf_counter()
    results = {
        "model": "tiny-llama" if args.smoke else "SmolLM2-135M", "threads": args.threads, "rounds": rounds,
        "new_tokens": NEW_TOKENS, "torch": torch.__version__,
        "decode": decode_ratios(model, rounds, vocab),
        "mixed_decode": mixed_decode(model, rounds, vocab, (2, 4) if args.smoke else (8, 32)),
        "forward": forward_vs_peft(model, rounds, vocab),
    }
    results["seconds"] = time.perf_counter() - started
    for section in ("decode", "mixed_decode"):
        for name, figures in results[section].items():  # type: ignore[union-attr]
            shown = {k: f"{v['min']:.3f} (median {v['median']:.3f})" for k, v in figures.items() if " / " in k}
            print(f"{section:13s} {name:16s} {shown}")
    print(f"forward       8 prompts        opendelta / peft {results['forward']['opendelta / peft']}")  # type: ignore[index]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
