"""Train LoRA with Hugging Face accelerate (DDP, or whatever `accelerate config` chose), then save the delta.

    accelerate launch --cpu --num_processes 2 examples/distributed/accelerate_lora.py --out runs/accelerate

`accelerator.prepare` wraps the model; the delta object keeps pointing at the unwrapped backbone,
so ``delta.save_finetuned`` works unchanged. Call it on every process: it gathers, rank 0 writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from train_lora import batch, build_model

from opendelta import LoraModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="a pretrained model folder (default: a tiny BERT)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    accelerator = Accelerator()
    model = build_model(args.model)
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    wrapped.train()
    for step in range(args.steps):
        data = {k: v.to(accelerator.device) for k, v in batch(100 * step + accelerator.process_index).items()}
        loss = wrapped(**data).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.print(f"step {step}: loss {loss.item():.4f}")

    delta.save_finetuned(args.out / "delta")  # on every process
    accelerator.print(f"saved {args.out / 'delta'}")
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main()
