"""A selection of module paths compresses to the shortest patterns that address exactly that set."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import tiny_bert
from opendelta import NoMatchError, find_modules
from opendelta.addressing import backbone_modules
from opendelta.interactive import SelectionCompressor, compress_selection

BERT12 = tiny_bert(num_hidden_layers=12)


def query(i: int) -> str:
    return f"encoder.layer.{i}.attention.self.query"


def test_every_layer_of_one_projection_compresses_to_its_tail():
    assert compress_selection(BERT12, [query(i) for i in range(12)]) == ["query"]


def test_some_layers_compress_to_a_layer_number_regex():
    selection = [query(i) for i in range(6)]
    patterns = compress_selection(BERT12, selection)
    assert patterns == [r"[r]encoder\.layer\.[0-5]\.attention\.self\.query"]
    assert find_modules(BERT12, patterns) == selection


def test_a_tail_that_would_address_unselected_modules_is_not_used():
    selection = ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    patterns = compress_selection(tiny_bert(), selection)
    assert patterns == [r"[r]encoder\.layer\.[01]\.output\.dense"]


def test_a_single_module_keeps_its_full_path():
    assert compress_selection(BERT12, ["pooler.dense"]) == ["pooler.dense"]


def test_a_module_and_its_child_are_both_kept():
    selection = ["encoder.layer.3", "encoder.layer.3.attention"]
    assert compress_selection(BERT12, selection) == selection


def test_patterns_come_in_model_order():
    patterns = compress_selection(BERT12, ["pooler.dense", query(4), "embeddings.word_embeddings"])
    assert patterns == ["embeddings.word_embeddings", query(4), "pooler.dense"]


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Sequential()
        self.b.add_module("a", nn.Linear(2, 2))


def test_a_path_that_is_also_a_deeper_tail_is_anchored_at_the_root():
    patterns = compress_selection(Nested(), ["a"])
    assert patterns == ["[r]^a"]
    assert find_modules(Nested(), patterns) == ["a"]


class Stack(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(1, 1) for _ in range(n))


def test_many_layer_numbers_compress_to_digit_ranges():
    model = Stack(30)
    selection = [f"blocks.{i}" for i in range(24)]
    patterns = compress_selection(model, selection)
    assert patterns == [r"[r]blocks\.(?:[0-9]|1[0-9]|2[0-3])"]
    assert find_modules(model, patterns) == selection


def test_scattered_layer_numbers_compress_to_a_digit_class():
    model = Stack(8)
    assert compress_selection(model, ["blocks.0", "blocks.2", "blocks.4"]) == [r"[r]blocks\.[024]"]


def test_an_unknown_path_is_rejected_with_suggestions():
    with pytest.raises(NoMatchError, match="encoder.layer.0.attention.self.quer'") as info:
        compress_selection(BERT12, ["encoder.layer.0.attention.self.quer"])
    assert "query" in str(info.value)


MODEL4 = tiny_bert(num_hidden_layers=4)
ALL_PATHS = [path for path, _ in backbone_modules(MODEL4)]
COMPRESSOR = SelectionCompressor.for_model(MODEL4)


@settings(max_examples=150, deadline=None)
@given(st.sets(st.sampled_from(ALL_PATHS), min_size=1))
def test_compressed_patterns_address_exactly_the_selection(selection):
    patterns = COMPRESSOR.compress(selection)
    assert find_modules(MODEL4, patterns) == [p for p in ALL_PATHS if p in selection]
    assert len(patterns) <= len(selection)


def test_superscript_digits_are_names_not_layer_numbers():
    # "²".isdigit() is true but int("²") fails: such a segment must be kept as a name
    model = nn.Module()
    for name in ("x²", "²", "2", "3"):
        model.add_module(name, nn.Module())
        model.get_submodule(name).add_module("proj", nn.Linear(2, 2))
    selection = ["².proj", "2.proj", "3.proj"]
    patterns = compress_selection(model, selection)
    assert find_modules(model, patterns) == selection
