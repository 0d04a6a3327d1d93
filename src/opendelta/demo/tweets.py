"""Balanced, reproducible positive/negative splits of the real tweet corpus."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass

from opendelta.demo.assets import tweets_csv

LABELS = ("negative", "positive")


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]


def sentiment_splits(train_size: int, test_size: int, seed: int) -> tuple[Split, Split]:
    """Disjoint train and held-out sets, each half positive and half negative, drawn with `seed`."""
    by_label: dict[int, list[str]] = {0: [], 1: []}
    with open(tweets_csv(), newline="", encoding="utf-8", errors="replace") as handle:
        for row in csv.DictReader(handle):
            if row["sentiment"] in LABELS and row["text"].strip():
                by_label[LABELS.index(row["sentiment"])].append(row["text"].strip())
    rng = random.Random(seed)
    for texts in by_label.values():
        rng.shuffle(texts)
    splits = []
    offset = 0
    for size in (train_size, test_size):
        half = size // 2
        rows = []
        for label, texts in by_label.items():
            if len(texts) < offset + half:
                raise ValueError(f"only {len(texts)} {LABELS[label]} tweets; ask for fewer")
            rows += [(t, label) for t in texts[offset : offset + half]]
        rng.shuffle(rows)
        splits.append(Split([t for t, _ in rows], [y for _, y in rows]))
        offset += half
    return splits[0], splits[1]


def short_tweets(max_words: int, seed: int) -> list[tuple[str, str]]:
    """Every distinct (text, sentiment) of at most `max_words` plain ASCII words without links, shuffled with `seed`.

    Short plain tweets keep a causal LM's sequences short, so a demo trains in seconds per step. A text
    that occurs twice (retweets) is kept once, so a split of the result never shares a text.
    """
    rows, seen = [], set()
    with open(tweets_csv(), newline="", encoding="utf-8", errors="replace") as handle:
        for row in csv.DictReader(handle):
            text = " ".join(row["text"].split())
            if text.isascii() and "http" not in text and 3 <= len(text.split()) <= max_words and text not in seen:
                seen.add(text)
                rows.append((text, row["sentiment"]))
    random.Random(seed).shuffle(rows)
    return rows


def misspell(word: str, rng: random.Random) -> str:
    """`word` (four letters or more) with one typo: two neighbouring letters swapped, one dropped or one doubled."""
    at = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("swap", "drop", "double"))
    if kind == "swap" and word[at] != word[at + 1]:
        return word[:at] + word[at + 1] + word[at] + word[at + 2 :]
    if kind == "double":
        return word[:at] + word[at] + word[at:]
    return word[:at] + word[at + 1 :]

