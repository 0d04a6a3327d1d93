"""Train LoRA under torchrun with DDP, FSDP2 or DeepSpeed ZeRO-3, then save only the delta.

    torchrun --nproc_per_node=2 examples/distributed/train_lora.py --engine ddp --out runs/ddp
    torchrun --nproc_per_node=2 examples/distributed/train_lora.py --engine fsdp2 --out runs/fsdp2
    torchrun --nproc_per_node=2 examples/distributed/train_lora.py --engine deepspeed --out runs/zero3

The backbone is a tiny BERT built from a config (so it runs anywhere, on CPU with gloo) unless
--model names a pretrained checkpoint folder. Every rank calls ``save_finetuned``: the ranks
gather the (sharded) delta tensors and rank 0 writes ``<out>/delta``. Rank 0 also writes the
distributed model's logits on a fixed batch to ``<out>/expected.safetensors``, so a single
process can check that the checkpoint reproduces them.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from opendelta import LoraModel

TINY_BERT = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
)
DEEPSPEED_CONFIG = Path(__file__).with_name("deepspeed_zero3.json")


def build_model(path: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    if path:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return BertForSequenceClassification(BertConfig(**TINY_BERT))


def batch(seed: int, n: int = 4, length: int = 6, vocab: int = 99) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, vocab, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def wrap(engine: str, model: torch.nn.Module, lr: float):
    """The model as the engine runs it, and an optimizer over the trainable (delta + head) parameters."""
    if engine == "ddp":
        # the backbone's buffers are constants: broadcasting them every forward is wasted work
        wrapped = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        return wrapped, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:  # one shard group per block, then the rest
            fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if engine == "deepspeed":
        import deepspeed

        config = json.loads(DEEPSPEED_CONFIG.read_text())
        trainable = [p for p in model.parameters() if p.requires_grad]
        wrapped, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(trainable, lr=lr), config=config
        )
        return wrapped, optimizer
    raise SystemExit(f"unknown engine {engine!r}; pick ddp, fsdp2 or deepspeed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ddp", "fsdp2", "deepspeed"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="a pretrained model folder (default: a tiny BERT)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    if args.engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group(backend="gloo")
    rank = dist.get_rank()

    model = build_model(args.model)
    vocab = model.config.vocab_size
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    wrapped, optimizer = wrap(args.engine, model, args.lr)

    wrapped.train()
    for step in range(args.steps):
        loss = wrapped(**batch(seed=100 * step + rank, vocab=vocab)).loss  # each rank its own data
        if args.engine == "deepspeed":
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    wrapped.eval()
    probe = {k: v for k, v in batch(seed=7, vocab=vocab).items() if k != "labels"}
    with torch.no_grad():
        logits = wrapped(**probe).logits  # a forward is a collective under FSDP2 / ZeRO-3: every rank runs it
    delta.save_finetuned(args.out / "delta")  # on every rank: gathers, rank 0 writes
    if rank == 0:
        save_file({"logits": logits.detach().contiguous(), **probe}, args.out / "expected.safetensors")
        weights = json.loads((args.out / "delta" / "delta_config.json").read_text())["weights"]["file"]
        size = (args.out / "delta" / weights).stat().st_size
        print(f"saved {args.out / 'delta'} ({size} bytes of delta tensors)", flush=True)
    # free the engine's wrapper (DDP's reducer) while the process group is alive and idle: freeing it
    # at interpreter exit can deadlock gloo's teardown against a worker thread that needs the GIL
    del wrapped
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
