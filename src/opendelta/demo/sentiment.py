"""The main demo: delta-tune the real MiniLM into a positive/negative tweet classifier.

Trains only the delta (and the classification head), saves it, reloads it into a freshly loaded
backbone and checks the predictions are identical.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from opendelta.auto import AutoDeltaModel
from opendelta.demo.assets import minilm_dir
from opendelta.demo.progress import progress
from opendelta.demo.tweets import Split, sentiment_splits
from opendelta.quantized import guard_cpu_repack

#: the best of a small sweep per method at the demo's defaults (2000 tweets, 2 epochs, seed 0); the
#: held-out accuracies each rate gave are in docs/demo.md
LEARNING_RATES = {
    "lora": 2e-3,
    "adapter": 2e-3,
    "bitfit": 3e-3,
    "prefix": 1e-3,
    "soft_prompt": 1e-1,
    "compacter": 1e-2,
    "low_rank_adapter": 1e-2,
    "parallel_adapter": 4e-3,
    "ia3": 3e-2,
}
DEFAULT_LR = 2e-3
#: arguments the demo changes from a method's defaults: tweets are ~25 tokens, and OpenDelta's
#: 100-token soft prompt (sized for T5 tasks) would make every sequence ~5x longer and the demo slow
DEMO_ARGUMENTS: dict[str, dict[str, Any]] = {"soft_prompt": {"soft_token_num": 20}}
MAX_LENGTH = 64
#: --quantize choices: the backbone's linear layers loaded by bitsandbytes (QLoRA-style), computing in float32
QUANTIZATIONS = ("nf4", "int8")


@dataclass
class SentimentResult:
    delta: str
    accuracy_before: float
    accuracy_after: float
    trainable_params: int
    total_params: int
    trainable_share: float
    checkpoint_bytes: int
    model_bytes: int
    reload_identical: bool
    seconds: float
    final_loss: float
    learning_rate: float
    quantize: str | None = None


def quantization_config(quantize: str):
    """transformers' BitsAndBytesConfig for a QUANTIZATIONS name; the fresh head stays full precision (it trains)."""
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                  llm_int8_skip_modules=["classifier"])
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
    raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")


def load_backbone(quantize: str | None = None):
    """The real MiniLM with a fresh 2-way classification head, and its tokenizer; with `quantize`
    (a QUANTIZATIONS name) its linear layers loaded quantized by bitsandbytes, on CPU."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the fresh head's "newly initialized" notice is expected here
    logging.disable_progress_bar()  # a bar for loading 100 tensors is noise beside the demo's own
    path = minilm_dir()
    quantized = {} if quantize is None else {"quantization_config": quantization_config(quantize), "device_map": "cpu"}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **quantized)
    if quantize is not None:
        # the demo evaluates before attaching the delta: an eval forward would let bitsandbytes repack the 4-bit
        # weights for its AVX512-BF16 kernel, which the delta's training cannot go through (docs/quantization.md)
        guard_cpu_repack(model)
    return model, AutoTokenizer.from_pretrained(path)


def batches(tokenizer, split: Split, batch_size: int, shuffle_seed: int | None = None):
    order = list(range(len(split.texts)))
    if shuffle_seed is not None:
        # shuffle, then sort within windows of 8 batches by length and shuffle the batches: rows
        # of similar length share a batch, so far less padding is computed, and order stays random
        g = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(len(order), generator=g).tolist()
        window = 8 * batch_size
        order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda i: len(split.texts[i]))]
        chunks = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
        order = [i for c in torch.randperm(len(chunks), generator=g).tolist() for i in chunks[c]]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [split.texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        yield dict(enc), torch.tensor([split.labels[i] for i in idx])


@torch.inference_mode()
def predict(model, tokenizer, split: Split, batch_size: int = 64) -> torch.Tensor:
    """Logits for every text of `split`, in its order; texts of similar length share a batch (less padding)."""
    model.eval()
    order = sorted(range(len(split.texts)), key=lambda i: len(split.texts[i]))
    by_length = Split([split.texts[i] for i in order], [split.labels[i] for i in order])
    logits = torch.cat([model(**inputs).logits for inputs, _ in batches(tokenizer, by_length, batch_size)])
    return logits[torch.argsort(torch.tensor(order))]


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()


def run(
    delta_type: str = "lora",
    epochs: int = 2,
    train_size: int = 2000,
    test_size: int = 1000,
    seed: int = 0,
    out: str | os.PathLike = "runs/demo",
    batch_size: int = 32,
    console: Console | None = None,
    show_tree: bool = True,
    lr: float | None = None,
    quantize: str | None = None,
) -> SentimentResult:
    """Train, evaluate, save, reload; return the figures the summary table shows.

    `lr` defaults to the method's entry in LEARNING_RATES; `quantize` (a QUANTIZATIONS name) loads
    the backbone quantized, both for training and for the reload.
    """
    console = console or Console()
    start = time.perf_counter()
    torch.manual_seed(seed)
    train, test = sentiment_splits(train_size, test_size, seed)
    model, tokenizer = load_backbone(quantize)
    loaded = "MiniLM loaded" + (f" ({quantize}, bitsandbytes)" if quantize else "")
    console.print(f"{loaded}; {len(train.texts)} training and {len(test.texts)} held-out tweets")
    accuracy_before = accuracy(predict(model, tokenizer, test), test.labels)
    console.print(f"held-out accuracy before tuning {accuracy_before:.3f}")

    delta = AutoDeltaModel.from_config(
        {"delta_type": delta_type, **DEMO_ARGUMENTS.get(delta_type, {})}, backbone_model=model
    )
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = lr or LEARNING_RATES.get(delta_type, DEFAULT_LR)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * ((len(train.texts) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / max(steps, 1))
    loss_value = float("nan")
    with progress(total=steps, desc=f"training {delta_type}", unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            for inputs, labels in batches(tokenizer, train, batch_size, shuffle_seed=seed + epoch):
                loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = loss.item()
                bar.set_postfix(loss=f"{loss_value:.3f}")
                bar.update()
    tuned_logits = predict(model, tokenizer, test)
    accuracy_after = accuracy(tuned_logits, test.labels)

    out = Path(out)
    replacing = " (replacing the previous run there)" if out.exists() else ""
    console.print(f"held-out accuracy after {accuracy_after:.3f}; saving the delta to {out}{replacing} and reloading it")
    delta.save_finetuned(out)
    checkpoint_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    fresh, _ = load_backbone(quantize)
    model_bytes = sum(p.numel() * p.element_size() for p in fresh.parameters())  # the backbone alone (packed bytes)
    AutoDeltaModel.from_finetuned(out, fresh)
    reload_identical = torch.equal(predict(fresh, tokenizer, test), tuned_logits)

    if show_tree:
        from bigmodelvis import Visualization

        Visualization(model, console=console).structure_graph()
    counts = delta.parameter_counts()
    return SentimentResult(
        delta=delta_type,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        trainable_params=counts["trainable"],
        total_params=counts["total"],
        trainable_share=counts["trainable"] / counts["total"],
        checkpoint_bytes=checkpoint_bytes,
        model_bytes=model_bytes,
        reload_identical=reload_identical,
        seconds=time.perf_counter() - start,
        final_loss=loss_value,
        learning_rate=lr,
        quantize=quantize,
    )


def summary_table(result: SentimentResult) -> Table:
    backbone = f"MiniLM ({result.quantize})" if result.quantize else "MiniLM"
    table = Table(title=f"opendelta demo: {result.delta} on {backbone}, tweet sentiment")
    table.add_column("")
    table.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("held-out accuracy before", f"{result.accuracy_before:.3f}"),
        ("held-out accuracy after", f"{result.accuracy_after:.3f}"),
        ("trainable parameters", f"{result.trainable_params:,} ({100 * result.trainable_share:.2f}%)"),
        ("checkpoint size", f"{result.checkpoint_bytes / 1024:,.1f} KiB"),
        ("backbone size (without the delta)", f"{result.model_bytes / 2**20:,.1f} MiB"),
        ("reloaded predictions identical", "yes" if result.reload_identical else "NO"),
        ("learning rate", f"{result.learning_rate:g}"),
        ("wall time", f"{result.seconds:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def as_json(result: SentimentResult) -> dict[str, Any]:
    return asdict(result)


__all__ = ["QUANTIZATIONS", "SentimentResult", "as_json", "run", "summary_table"]
