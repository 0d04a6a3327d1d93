"""Specification of the sibling-name compression and the short counts used on tree lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodelvis import format_count
from bigmodelvis.names import compress_names


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ([str(i) for i in range(12)], "0-11"),
        (["1", "2", "3", "5", "6", "7"], "1-3,5-7"),
        (["0", "2"], "0,2"),
        (["0", "1"], "0,1"),
        (["query", "key", "value"], "query,key,value"),
        (["01", "02", "03"], "01,02,03"),
        (["7"], "7"),
        (["1", "²", "3"], "1,²,3"),  # "²".isdigit() is true, but it is a name, not a number
    ],
)
def test_compress_names_folds_runs_of_three_or_more_integers(
    names: list[str], expected: str
) -> None:
    assert compress_names(names) == expected


def _expand(compressed: str) -> list[int]:
    numbers: list[int] = []
    for part in compressed.split(","):
        low, _, high = part.partition("-")
        numbers.extend(range(int(low), int(high or low) + 1))
    return numbers


@given(st.sets(st.integers(min_value=0, max_value=200), min_size=1))
def test_compressed_integer_names_expand_back_to_the_same_names(numbers: set[int]) -> None:
    ordered = sorted(numbers)
    assert _expand(compress_names([str(n) for n in ordered])) == ordered


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0"),
        (512, "512"),
        (1000, "1K"),
        (147_840, "148K"),
        (999_999, "1M"),
        (22_713_216, "22.7M"),
        (6_738_415_616, "6.74B"),
        (1_234_567_890_123, "1.23T"),
    ],
)
def test_format_count_keeps_three_significant_digits(n: int, expected: str) -> None:
    assert format_count(n) == expected
