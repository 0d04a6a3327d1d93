"""The paper's Figure 4: one real backbone serves several tasks by attaching and detaching deltas.

SmolLM2-135M-Instruct (a 30-layer LLaMA) is loaded once. Each task trains its own small delta,
a different method per task, for a few steps on real tweets; then each task answers a few
held-out inputs by attach -> generate -> detach, beside what the bare backbone answers. The
deltas sit in the upper layers only, so backpropagation stops there and a step costs little
more than a forward pass on two CPU cores.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from opendelta.auto import AutoDeltaModel
from opendelta.demo.progress import progress
from opendelta.delta_base import DeltaBase
from opendelta.demo.assets import smollm2_gguf
from opendelta.demo.tweets import add_typos, short_tweets

#: where the dequantised backbone is kept after the first load
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opendelta" / "smollm2"
#: the chat format SmolLM2-Instruct was tuned on, without the default system prompt (shorter sequences)
PROMPT = "<|im_start|>user\n{instruction}: {text}<|im_end|>\n<|im_start|>assistant\n"
END = "<|im_end|>"
UPPER = r"layers\.(2[0-9])"  # the upper ten of SmolLM2's thirty layers
MAX_WORDS = 14


@dataclass(frozen=True)
class Task:
    """A task: its instruction, the delta that learns it, and how to make (input, answer) pairs from tweets."""

    name: str
    instruction: str
    delta: dict[str, Any]
    lr: float
    max_new_tokens: int
    make: Callable[[list[tuple[str, str]], random.Random], list[tuple[str, str]]]


def spelling_pairs(rows: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """A tweet with two injected typos -> the tweet."""
    pairs = [(add_typos(text, rng), text) for text, _ in rows]
    return [(noisy, text) for noisy, text in pairs if noisy != text]


def sentiment_pairs(rows: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """A positive or negative tweet -> its label as a word, alternating labels."""
    by_label = {label: [text for text, s in rows if s == label] for label in ("positive", "negative")}
    return [pair for p, n in zip(by_label["positive"], by_label["negative"]) for pair in ((p, "positive"), (n, "negative"))]


def hashtag_pairs(rows: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """A tweet -> its hashtags in order, or "none"; tweets with and without hashtags alternate."""
    tagged = [(text, " ".join(re.findall(r"#\w+", text))) for text, _ in rows if "#" in text]
    plain = [(text, "none") for text, _ in rows if "#" not in text]
    return [pair for t, p in zip(tagged, plain) for pair in (t, p)]


TASKS = (
    Task(
        "spelling",
        "Fix the spelling",
        {"delta_type": "lora", "modified_modules": [rf"[r]{UPPER}\.self_attn\.(q_proj|v_proj)"], "lora_r": 8},
        lr=1e-2,
        max_new_tokens=32,
        make=spelling_pairs,
    ),
    Task(
        "sentiment",
        "Is this tweet positive or negative",
        {"delta_type": "prefix", "modified_modules": [rf"[r]{UPPER}\.self_attn"], "prefix_token_num": 4,
         "embed_dim": 64, "mid_dim": 64},
        lr=3e-3,
        max_new_tokens=3,
        make=sentiment_pairs,
    ),
    Task(
        "hashtags",
        "List the hashtags",
        {"delta_type": "ia3", "modified_modules": [rf"[r]{UPPER}\.(self_attn\.(k_proj|v_proj)|mlp\.down_proj)"],
         "feedforward_modules": [rf"[r]{UPPER}\.mlp\.down_proj"]},
        lr=3e-2,
        max_new_tokens=16,
        make=hashtag_pairs,
    ),
)


@dataclass
class Answer:
    input: str
    expected: str
    tuned: str
    bare: str


@dataclass
class TaskResult:
    task: str
    method: str
    trainable_params: int
    checkpoint_bytes: int
    steps: int
    train_seconds: float
    first_loss: float
    final_loss: float
    answers: list[Answer] = field(default_factory=list)

    @property
    def matches(self) -> int:
        return sum(a.tuned == a.expected for a in self.answers)

    @property
    def bare_matches(self) -> int:
        return sum(a.bare == a.expected for a in self.answers)


@dataclass
class MultitaskResult:
    load_source: str
    load_seconds: float
    backbone_params: int
    tasks: list[TaskResult]
    backbone_restored: bool
    seconds: float


def load_backbone(cache_dir: Path | None, console: Console) -> tuple[Any, Any, str]:
    """SmolLM2 and its tokenizer: from `cache_dir` if it holds them, else dequantised from the GGUF
    (and then saved to `cache_dir`, when one is given). Returns (model, tokenizer, where it came from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if cache_dir is not None and (cache_dir / "model.safetensors").is_file():
        with console.status(f"loading SmolLM2 from the cache {cache_dir}"):
            return AutoModelForCausalLM.from_pretrained(cache_dir), AutoTokenizer.from_pretrained(cache_dir), "cache"
    gguf = smollm2_gguf()
    with console.status(f"dequantising {gguf.name} (once; later runs load the cache)"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if cache_dir is not None:
        try:
            save_cache(model, tokenizer, cache_dir)
        except OSError as exc:
            console.print(f"[yellow]could not cache the backbone in {cache_dir}: {exc}; continuing without[/]")
    return model, tokenizer, "gguf"


def save_cache(model: Any, tokenizer: Any, cache_dir: Path) -> None:
    """Write the dequantised model as plain safetensors (config, weights, tokenizer), atomically.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights are written
    with safetensors directly and the config loses its GGUF quantisation entry (the weights are
    already plain floats).
    """
    import copy

    from safetensors.torch import save_model

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir.parent))
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        staging.rename(cache_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def encode_batch(tokenizer: Any, prompts: list[str], answers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask and positions of prompt (+ answer + end) texts; with answers, also
    `labels`: the answer tokens at the right edge, -100 elsewhere (so only the last logits are needed)."""
    texts = [p if answers is None else p + a + END for p, a in zip(prompts, answers or prompts)]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask}
    if answers is not None:
        answer_lengths = [len(r) - len(tokenizer(p, add_special_tokens=False)["input_ids"]) for r, p in zip(rows, prompts)]
        keep = max(answer_lengths)
        labels = torch.full((len(rows), keep), -100)
        for i, n in enumerate(answer_lengths):
            labels[i, keep - n :] = ids[i, width - n :]
        batch["labels"] = labels
    return batch


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer tokens; the LM head runs on the answer positions only."""
    labels = batch["labels"]
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=positions,
        logits_to_keep=labels.shape[1] + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def train(model: Any, tokenizer: Any, task: Task, delta: DeltaBase, pairs: list[tuple[str, str]],
          steps: int, batch_size: int) -> tuple[float, float, float]:
    """A few AdamW steps on the delta's parameters; returns (seconds, first loss, last loss)."""
    params = list(delta.delta_parameters())
    optimizer = torch.optim.AdamW(params, lr=task.lr, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    model.train()
    with progress(total=steps, desc=f"training {task.name} ({delta.delta_type})", unit="step") as bar:
        for step in range(steps):
            chunk = [pairs[(step * batch_size + i) % len(pairs)] for i in range(batch_size)]
            batch = encode_batch(tokenizer, [PROMPT.format(instruction=task.instruction, text=x) for x, _ in chunk],
                                 [y for _, y in chunk])
            loss = lm_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    model.eval()
    return time.perf_counter() - start, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan")


@torch.no_grad()
def answer(model: Any, tokenizer: Any, task: Task, inputs: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to `inputs`, one batched generate() call."""
    batch = encode_batch(tokenizer, [PROMPT.format(instruction=task.instruction, text=x) for x in inputs])
    end_id = tokenizer.convert_tokens_to_ids(END)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


@torch.no_grad()
def probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    return model(**encode_batch(tokenizer, [PROMPT.format(instruction="Say hi", text="hello")])).logits


def run(
    steps: int = 12,
    batch_size: int = 8,
    examples: int = 3,
    max_new_tokens: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = DEFAULT_CACHE,
    out: str | os.PathLike = "runs/multitask",
    console: Console | None = None,
) -> MultitaskResult:
    """Load once, train one delta per task, then answer held-out inputs with each delta attached."""
    console = console or Console()
    start = time.perf_counter()
    torch.manual_seed(seed)
    loaded = time.perf_counter()
    model, tokenizer, source = load_backbone(cache_dir, console)
    load_seconds = time.perf_counter() - loaded
    model.eval()
    console.print(f"SmolLM2-135M-Instruct from {source} in {load_seconds:.1f} s")
    before = probe_logits(model, tokenizer)

    if Path(out).exists():
        console.print(f"writing the task deltas to {out}, replacing the previous run there")
    rows = short_tweets(MAX_WORDS, seed)
    held_out, pool = rows[:400], rows[400:]
    rng = random.Random(seed)
    results, deltas = [], {}
    for task in TASKS:
        delta = AutoDeltaModel.from_config(task.delta, backbone_model=model, name=task.name)
        delta.freeze_module(exclude=["deltas"], set_state_dict=False)
        seconds, first, last = train(model, tokenizer, task, delta, task.make(pool, rng), steps, batch_size)
        delta.detach()
        target = Path(out) / task.name
        delta.save_finetuned(target)
        deltas[task.name] = delta
        results.append(TaskResult(
            task=task.name, method=delta.delta_type, trainable_params=sum(p.numel() for p in delta.delta_parameters()),
            checkpoint_bytes=sum(f.stat().st_size for f in target.iterdir() if f.is_file()), steps=steps,
            train_seconds=seconds, first_loss=first, final_loss=last,
        ))

    for task, result in progress(list(zip(TASKS, results)), desc="answering (attach -> generate -> detach)"):
        pairs = task.make(held_out, random.Random(seed))[:examples]
        inputs = [x for x, _ in pairs]
        limit = task.max_new_tokens if max_new_tokens is None else min(max_new_tokens, task.max_new_tokens)
        deltas[task.name].attach()
        tuned = answer(model, tokenizer, task, inputs, limit)
        deltas[task.name].detach()
        bare = answer(model, tokenizer, task, inputs, limit)
        result.answers = [Answer(x, y, t, b) for (x, y), t, b in zip(pairs, tuned, bare)]

    restored = torch.equal(probe_logits(model, tokenizer), before)
    return MultitaskResult(
        load_source=source, load_seconds=load_seconds, backbone_params=sum(p.numel() for p in model.parameters()),
        tasks=results, backbone_restored=restored, seconds=time.perf_counter() - start,
    )


def answers_table(result: MultitaskResult) -> Table:
    table = Table(title="one SmolLM2 backbone, one delta per task: attach -> generate -> detach", show_lines=True)
    for name in ("task (delta)", "input", "expected", "with the delta", "bare backbone"):
        table.add_column(name, overflow="fold")
    for task in result.tasks:
        for a in task.answers:
            mark = "[green]" if a.tuned == a.expected else ""
            table.add_row(f"{task.task} ({task.method})", a.input, a.expected, f"{mark}{a.tuned}", a.bare)
    return table


def summary_table(result: MultitaskResult) -> Table:
    table = Table(title=f"opendelta demo multitask: {result.backbone_params / 1e6:.0f}M-parameter backbone, "
                        f"loaded from {result.load_source} in {result.load_seconds:.1f} s")
    for name in ("task", "delta", "trainable params", "checkpoint", "steps", "train time", "loss first -> last",
                 "exact answers (delta / bare)"):
        table.add_column(name, justify="right")
    for t in result.tasks:
        table.add_row(
            t.task, t.method, f"{t.trainable_params:,} ({100 * t.trainable_params / result.backbone_params:.2f}%)",
            f"{t.checkpoint_bytes / 1024:,.0f} KiB", str(t.steps), f"{t.train_seconds:.1f} s",
            f"{t.first_loss:.2f} -> {t.final_loss:.2f}", f"{t.matches}/{len(t.answers)} / {t.bare_matches}/{len(t.answers)}",
        )
    table.caption = (f"backbone restored bit for bit after every detach: {'yes' if result.backbone_restored else 'NO'}"
                     f"; wall time {result.seconds:.1f} s")
    return table


def as_json(result: MultitaskResult) -> dict[str, Any]:
    return asdict(result)


__all__ = ["DEFAULT_CACHE", "TASKS", "MultitaskResult", "Task", "answers_table", "as_json", "load_backbone", "run",
           "summary_table"]
