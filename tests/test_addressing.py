"""Name-based addressing: full paths, dot-boundary tails, [r] regexes, exclusion, errors."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from opendelta import NoMatchError, OpenDeltaError, find_modules
from opendelta.errors import PatternError

from conftest import tiny_bert

BERT = tiny_bert()


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["encoder.layer.1.attention.self.query"], ["encoder.layer.1.attention.self.query"]),
        (["query"], ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]),
        (
            ["output.dense"],
            [
                "encoder.layer.0.attention.output.dense",
                "encoder.layer.0.output.dense",
                "encoder.layer.1.attention.output.dense",
                "encoder.layer.1.output.dense",
            ],
        ),
        (["[r]layer\\.[0-0]\\.attention"], ["encoder.layer.0.attention"]),
        (
            ["[r]encoder\\.layer\\.[0-5]\\.attention\\.self\\.(query|value)"],
            [
                "encoder.layer.0.attention.self.query",
                "encoder.layer.0.attention.self.value",
                "encoder.layer.1.attention.self.query",
                "encoder.layer.1.attention.self.value",
            ],
        ),
        (["[r](query|key)"], [f"encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "key")]),
        (["pooler"], ["pooler"]),
    ],
)
def test_patterns_address_exactly_the_documented_modules(patterns, expected):
    assert find_modules(BERT, patterns) == expected


def test_tail_match_respects_dot_boundaries():
    with pytest.raises(NoMatchError):
        find_modules(BERT, ["uery"])


def test_regex_must_match_a_whole_tail_not_a_substring():
    with pytest.raises(NoMatchError):
        find_modules(BERT, ["[r]quer"])
    # a full tail that ends elsewhere does not count either
    with pytest.raises(NoMatchError):
        find_modules(BERT, ["[r]layer\\.0\\.attention\\.sel"])


def test_exclude_removes_matches_and_everything_under_excluded_modules():
    paths = find_modules(BERT, ["query", "value"], exclude=["layer.0", "[r].*value"])
    assert paths == ["encoder.layer.1.attention.self.query"]


def test_unknown_name_raises_typed_error_with_suggestions():
    with pytest.raises(NoMatchError) as info:
        find_modules(BERT, ["qeury"])
    err = info.value
    assert isinstance(err, OpenDeltaError) and isinstance(err, KeyError)
    assert err.pattern == "qeury"
    assert "query" in err.suggestions and len(err.suggestions) <= 5
    assert "'qeury'" in str(err) and "'query'" in str(err)


def test_unknown_exclude_name_is_an_error_too():
    with pytest.raises(NoMatchError, match="exclude_modules"):
        find_modules(BERT, ["query"], exclude=["layer.9"])


def test_non_strict_skips_patterns_that_match_nothing():
    assert find_modules(BERT, ["query", "wi_0"], strict=False) == find_modules(BERT, ["query"])


@pytest.mark.parametrize("bad", [[""], [3], ["[r]"], ["[r](unclosed"], "query"])
def test_malformed_patterns_raise_pattern_error(bad):
    with pytest.raises(PatternError):
        find_modules(BERT, bad)


def test_delta_layers_are_never_addressed():
    from opendelta import LoraModel

    model = tiny_bert()
    LoraModel(model, modified_modules=["query"])
    assert find_modules(model, ["[r].*lora.*"], strict=False) == []
    assert all(".lora" not in p for p in find_modules(model, ["[r].*"]))


# ---------------------------------------------------------------- property test


def reference(paths: list[str], pattern: str) -> set[str]:
    """The definition: a pattern addresses a path if it equals the path or a dot-boundary tail."""
    parts_of = {p: p.split(".") for p in paths}
    hits = set()
    for path, parts in parts_of.items():
        tails = {".".join(parts[i:]) for i in range(len(parts))}
        if pattern.startswith("[r]"):
            rx = re.compile(pattern[3:])
            if any(rx.fullmatch(t) for t in tails):
                hits.add(path)
        elif pattern in tails:
            hits.add(path)
    return hits


NAMES = st.sampled_from(["a", "b", "attn", "q", "layer", "0", "1", "out"])


@st.composite
def trees(draw, depth=0):
    """A random module tree, as nested dicts name -> subtree."""
    if depth >= 3:
        return {}
    names = draw(st.lists(NAMES, max_size=3, unique=True))
    return {n: draw(trees(depth=depth + 1)) for n in names}


def build(tree: dict) -> nn.Module:
    module = nn.Module()
    for name, sub in tree.items():
        module.add_module(name, build(sub))
    return module


@st.composite
def patterns(draw):
    parts = draw(st.lists(NAMES, min_size=1, max_size=3))
    text = ".".join(parts)
    kind = draw(st.sampled_from(["plain", "regex", "regex-alt"]))
    if kind == "plain":
        return text
    if kind == "regex":
        return "[r]" + re.escape(text).replace(re.escape("0"), "[0-9]")
    return "[r](" + "|".join(re.escape(p) for p in parts) + ")"


@settings(max_examples=200, deadline=None)
@given(tree=trees(), pattern=patterns())
def test_addressing_agrees_with_reference_definition(tree, pattern):
    model = build(tree)
    paths = [p for p, _ in model.named_modules() if p]
    expected = reference(paths, pattern)
    try:
        got = find_modules(model, [pattern])
    except NoMatchError:
        assert expected == set()
    except OpenDeltaError:
        raise AssertionError("only NoMatchError is expected for well-formed patterns")
    else:
        assert set(got) == expected and len(got) == len(expected)
        assert got == [p for p in paths if p in expected]  # model order


def test_an_empty_modified_modules_list_says_so_and_points_to_none_for_the_defaults():
    from opendelta import LoraModel

    with pytest.raises(PatternError) as info:
        LoraModel(tiny_bert(), modified_modules=[])
    assert "modified_modules is an empty list" in str(info.value)
    assert "modified_modules=None" in str(info.value)
    assert "exclude_modules" not in str(info.value)


def _bert_with_alias() -> nn.Module:
    model = tiny_bert()
    model.alias = model.encoder.layer[0]  # the same module object under a second path
    return model


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("alias.attention.self.query", ["encoder.layer.0.attention.self.query"]),
        ("[r]alias\\.attention\\.self\\.(query|value)",
         ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]),
        ("alias", ["encoder.layer.0"]),
    ],
)
def test_a_module_registered_twice_is_addressed_by_either_path_as_its_canonical_path(pattern, expected):
    assert find_modules(_bert_with_alias(), [pattern]) == expected


def test_exclude_modules_may_name_a_module_by_its_alias_path():
    model = _bert_with_alias()
    assert find_modules(model, ["dense"], exclude=["alias"]) == [
        p for p in find_modules(model, ["dense"]) if not p.startswith("encoder.layer.0.")
    ]


def test_a_delta_addressed_through_an_alias_acts_on_the_shared_module():
    from opendelta import LoraModel

    model = _bert_with_alias()
    delta = LoraModel(model, modified_modules=["alias.attention.self.query"])
    assert list(delta.layers) == ["encoder.layer.0.attention.self.query"]
    # a delta layer is unaddressable under the alias path too
    with pytest.raises(NoMatchError):
        find_modules(model, ["alias.attention.self.query.lora"])
    delta.detach()


def test_an_unknown_name_under_an_alias_path_still_raises_no_match():
    with pytest.raises(NoMatchError, match="'alias.attention.self.quer'"):
        find_modules(_bert_with_alias(), ["alias.attention.self.quer"])
