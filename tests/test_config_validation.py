"""Every argument of every registered method is checked in the config layer: a bad value (wrong
type, NaN, infinity, out of range, a truthy string for a bool) is a DeltaConfigError naming the
field and the value, raised before the model is touched, from keyword arguments, a dict or JSON.

The bad values are derived from each field's annotation, so a new method or field is covered
by registering it; range limits beyond the type are listed per field below, and a test fails
when a numeric field has no entry there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from typing import Any

import numpy
import pytest
import torch
from support.methods import METHODS as METHOD_TABLE
from support.methods import builtin_delta_types
from support.families import fresh

from opendelta import AutoDeltaConfig, AutoDeltaModel, DeltaConfigError, LoraModel, SoftPromptModel
from opendelta.config import MAX_SIZE
from opendelta.registry import lookup

#: the methods opendelta ships (a test may register its own types; they are not ours to check)
METHODS = builtin_delta_types()
#: what a method needs to build on the tiny BERT (hidden size 32) quickly: the method table's small arguments
BUILD_ARGS: dict[str, dict[str, Any]] = {t: m.small for t, m in METHOD_TABLE.items()}
#: values outside each number field's range (beyond NaN, infinity and wrong types, which every
#: number field refuses); a field whose every finite value is valid lists []
RANGE_BAD: dict[tuple[str, str], list[Any]] = {
    ("lora", "lora_alpha"): [0, 0.0, -16],
    ("lora", "lora_dropout"): [-0.1, 1.0, 1.5],
    ("lora", "alpha_pattern"): [0.0, -1.0],
    ("parallel_adapter", "scaled"): [0.0, -1.0],
    ("soft_prompt", "init_range"): [0, -0.5],
    ("compacter", "phm_init_range"): [0.0, -1e-4],
    **{(t, f): [0, 0.0, -8] for t in ("loha", "lokr") for f in ("alpha", "alpha_pattern")},
    **{(t, f): [-0.1, 1.0, 1.5] for t in ("loha", "lokr") for f in ("rank_dropout", "module_dropout")},
    ("vera", "vera_dropout"): [-0.1, 1.0, 1.5],
    ("vera", "d_initial"): [],
    ("adalora", "beta1"): [0.0, 1.0, -0.5],
    ("adalora", "beta2"): [0.0, 1.0, 1.5],
    ("adalora", "orth_reg_weight"): [-0.5],
    ("adalora", "lora_alpha"): [0, -8],
    ("adalora", "lora_dropout"): [-0.1, 1.0],
    ("oft", "eps"): [0, -1e-5],
    ("oft", "module_dropout"): [-0.1, 0.5, 1.0],
}
#: integer fields that are not sizes: the values of the usual bad list that they accept
INT_VALID: dict[tuple[str, str], list[Any]] = {
    ("lokr", "decompose_factor"): [-1, 0],  # -1: near the square root, 0: no split (PEFT's meanings)
    ("vera", "projection_prng_key"): [0, 2**62, MAX_SIZE + 1],  # any seed torch takes, as in PEFT
}
#: whole-number fields whose range is not a size's (1 to MAX_SIZE): their out-of-range values
INT_RANGE_BAD: dict[tuple[str, str], list[Any]] = {
    ("oft", "r"): [-1, MAX_SIZE + 1],  # 0: the number of blocks follows from oft_block_size
    ("oft", "oft_block_size"): [-1, MAX_SIZE + 1],
    ("adalora", "tinit"): [-1, 2**62],  # step counts
    ("adalora", "tfinal"): [-1, 2**62],
    ("adalora", "total_step"): [-1, 0, 2**62],
}
#: list fields that hold numbers, not module names: their bad values, each with what the error must show of it
LIST_BAD: dict[tuple[str, str], list[tuple[Any, str]]] = {
    ("trainable_tokens", "token_indices"): [("3", "'3'"), (["a"], "'a'"), ([-1], "-1"), ([True], "True"), ([1.5], "1.5"), (5, "5")],
    ("lora", "trainable_token_indices"): [("3", "'3'"), (["a"], "'a'"), ([-1], "-1"), ([True], "True"), ([1.5], "1.5"), (5, "5")],
}
#: whole-number fields left out of the check that sets every such field to one value (they constrain each other)
NOT_ALL_AT_ONCE = {("oft", "r"), ("adalora", "tinit"), ("adalora", "tfinal")}
#: fields where None is valid although the annotation does not say Optional (documented: None means False)
NONE_MEANS_FALSE = {"common_structure"}


def shown(value: Any) -> str:
    """What an error message must show of `value` (long values are shortened to their start)."""
    try:
        return repr(value)[:60]
    except ValueError:  # an int with more digits than Python converts to text
        return "-bit number>"


#: the annotation ``bool | str``: True, False or one of the field's named choices (LoRA's init_lora_weights)
SWITCH_OR_NAME = "bool | str"


def fields_of(delta_type: str) -> list[tuple[str, Any, bool]]:
    """(name, annotation without None, whether None is allowed) of each field of the method's config."""
    config_cls = lookup(delta_type)[0]
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        optional = False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            optional = len(args) < len(typing.get_args(kind))
            kind = args[0] if len(args) == 1 else SWITCH_OR_NAME if set(args) == {bool, str} else kind
        out.append((f.name, kind, optional or f.name in NONE_MEANS_FALSE))
    return out


def scalar_bad(delta_type: str, name: str, kind: Any) -> list[Any]:
    """Bad values for a field (or a dict field's values) of scalar type `kind`."""
    if kind is bool:
        return ["no", "false", "False", "yes", "", 1, 0, 1.0, [True]]
    if kind is int:
        out_of_range = INT_RANGE_BAD.get((delta_type, name), [-1, 0, 2**62, MAX_SIZE + 1])
        values = ["8", "abc", 8.7, 0.5, True, [8], {}, math.nan, math.inf, -math.inf, *out_of_range, 10**5000]
        return [v for v in values if v not in INT_VALID.get((delta_type, name), [])]
    if kind is float:
        return ["16", "abc", True, [1.0], math.nan, math.inf, -math.inf, 10**400, *RANGE_BAD[(delta_type, name)]]
    if kind is str:
        return [5, True, ["gelu"], "", "no-such-choice"]
    if kind == SWITCH_OR_NAME:
        return [5, 1.0, "true", "", "no-such-choice", ["gaussian"]]
    raise AssertionError(f"{delta_type}.{name}: add bad values for fields of type {kind}")


def bad_cases(delta_type: str) -> list[tuple[str, Any, str]]:
    """(field, bad value, the text the error must show of it) for every field of the method."""
    cases = []
    for name, kind, none_ok in fields_of(delta_type):
        origin = typing.get_origin(kind)
        if (delta_type, name) in LIST_BAD:
            cases += [(name, v, text) for v, text in LIST_BAD[(delta_type, name)]]
        elif origin is list:
            values = ["query", [3], [None], [["query"]], ("query", 3), {"query"}, {"query": 1}, 5, True]
            cases += [(name, v, shown(v)) for v in values]
        elif origin is dict:
            (_, item) = typing.get_args(kind)
            cases += [(name, v, shown(v)) for v in ["query", ["query"], 5]]
            cases.append((name, {5: 1}, "5"))
            cases += [(name, {"query": v}, shown(v)) for v in [*scalar_bad(delta_type, name, item), None]]
        else:
            cases += [(name, v, shown(v)) for v in scalar_bad(delta_type, name, kind)]
        if not none_ok:
            cases.append((name, None, "None"))
    return cases


#: one test per (method, field) over all its bad values: a test per value spent most of its time on pytest's
#: per-test work and on copying the model (about 1,700 values, 3 tests each)
def by_field() -> dict[tuple[str, str], list[tuple[Any, str]]]:
    """(method, field) -> its bad values, each with the text the error must show of it."""
    fields: dict[tuple[str, str], list[tuple[Any, str]]] = {}
    for delta_type in METHODS:
        for name, value, text in bad_cases(delta_type):
            fields.setdefault((delta_type, name), []).append((value, text))
    return fields


FIELDS = by_field()
CASES = [pytest.param(t, name, id=f"{t}-{name}") for t, name in FIELDS]


def refused(make: Callable[[], object], name: str, value: Any, text: str, must_be: bool = False) -> str | None:
    """None when ``make()`` raises a DeltaConfigError whose message names the field `name` and shows `text`
    (and says what it ``must be``, with `must_be`); otherwise what went wrong, naming the bad value."""
    try:
        make()
    except DeltaConfigError as exc:
        message = str(exc)
        if name in message and text in message and (not must_be or "must be" in message):
            return None
        return f"{shown(value)}: the message does not name {name!r} and show {text!r}: {message[:200]}"
    except Exception as exc:  # noqa: BLE001 - every value's outcome is reported, not only the first failure
        return f"{shown(value)}: {type(exc).__name__} instead of DeltaConfigError: {str(exc)[:200]}"
    return f"{shown(value)}: accepted"


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a delta could change: tensors, trainability, children, hooks."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "trainable": {k: p.requires_grad for k, p in model.named_parameters()},
        "modules": [(n, type(m), tuple(m._modules), len(m._forward_hooks), len(m._forward_pre_hooks),
                     m.forward.__func__ if hasattr(m.forward, "__func__") else m.forward)
                    for n, m in model.named_modules()],
    }


def snapshot_differs(model: torch.nn.Module, before: dict[str, Any]) -> bool:
    """Whether the model differs from its `before` snapshot in anything `snapshot` records."""
    after = snapshot(model)
    return not (
        after["modules"] == before["modules"] and after["trainable"] == before["trainable"]
        and after["tensors"].keys() == before["tensors"].keys()
        and all(torch.equal(after["tensors"][k], before["tensors"][k]) for k in before["tensors"])
    )


def assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    assert not snapshot_differs(model, before)


# ------------------------------------------------------------------ the table covers every method


def test_every_shipped_method_is_in_the_table() -> None:
    assert set(METHODS) >= {"adapter", "bitfit", "compacter", "ia3", "lora", "low_rank_adapter",
                            "parallel_adapter", "prefix", "soft_prompt"}
    assert all(bad_cases(t) for t in METHODS)


def test_every_number_field_declares_its_range_in_the_table() -> None:
    numeric = {(t, name) for t in METHODS for name, kind, _ in fields_of(t)
               if float in (kind, *typing.get_args(kind))}
    assert numeric == set(RANGE_BAD)


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize("delta_type,name", CASES)
def test_a_bad_argument_is_a_config_error_naming_it_and_leaves_the_model_unchanged(delta_type, name) -> None:
    model_cls = lookup(delta_type)[1]
    model = fresh("bert")
    before = snapshot(model)
    problems = []
    for value, text in FIELDS[delta_type, name]:
        problem = refused(lambda: model_cls(model, **{**BUILD_ARGS.get(delta_type, {}), name: value}), name, value, text, True)
        if problem is None and snapshot_differs(model, before):
            problem = f"{shown(value)}: refused, but the model changed"
        if problem is not None:
            problems.append(problem)
            model = fresh("bert")  # the next value starts from an untouched model again
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("delta_type,name", CASES)
def test_a_bad_value_from_a_dict_or_json_is_the_same_config_error(delta_type, name) -> None:
    problems = []
    for value, text in FIELDS[delta_type, name]:
        values = {"delta_type": delta_type, name: value}
        sources = [values]
        try:
            as_json = json.loads(json.dumps(values))  # NaN and infinity as Python's json writes them
        except (TypeError, ValueError):  # a set, an int of 5,000 digits: JSON cannot hold it
            as_json = None
        if as_json is not None and repr(as_json) == repr(values):  # JSON keeps it (tuples would become lists, int keys strings)
            sources.append(as_json)
        problems += [p for source in sources if (p := refused(lambda: AutoDeltaConfig.from_dict(source), name, value, text))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("delta_type,name", CASES)
def test_assigning_a_bad_value_to_a_built_config_is_the_same_config_error(delta_type, name) -> None:
    problems = []
    for value, text in FIELDS[delta_type, name]:
        config = lookup(delta_type)[0](**BUILD_ARGS.get(delta_type, {}))
        before = config.to_dict()
        problem = refused(lambda: setattr(config, name, value), name, value, text)
        if problem is None and config.to_dict() != before:
            problem = f"{shown(value)}: refused, but the config changed"
        problems += [problem] if problem else []
    assert not problems, "\n".join(problems)


def test_a_checkpoint_whose_json_holds_a_bad_value_is_a_config_error(tmp_path) -> None:
    LoraModel(fresh("bert")).save_finetuned(tmp_path)
    config_file = tmp_path / "delta_config.json"
    meta = json.loads(config_file.read_text())
    for field, value in [("lora_alpha", "16"), ("use_rslora", "false"), ("lora_r", 8.7)]:
        edited = {**meta, "config": {**meta["config"], field: value}}
        config_file.write_text(json.dumps(edited))
        model = fresh("bert")
        before = snapshot(model)
        with pytest.raises(DeltaConfigError, match=field):
            AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
        assert_unchanged(model, before)


@pytest.mark.parametrize("name", [5, "", "not a name", "a.b", ["lora"]])
def test_a_delta_name_that_is_not_an_identifier_is_a_config_error(name) -> None:
    model = fresh("bert")
    before = snapshot(model)
    with pytest.raises(DeltaConfigError, match="name") as info:
        LoraModel(model, name=name)
    assert repr(name) in str(info.value)
    assert_unchanged(model, before)


def test_a_soft_prompt_longer_than_the_backbone_has_positions_is_a_config_error() -> None:
    model = fresh("gpt2")
    n = model.config.max_position_embeddings  # the tiny GPT-2's n_positions
    before = snapshot(model)
    with pytest.raises(DeltaConfigError, match=rf"soft_token_num={n + 4}.*max_position_embeddings={n}") as info:
        SoftPromptModel(model, soft_token_num=n + 4)
    assert_unchanged(model, before)
    with pytest.raises(DeltaConfigError, match=rf"soft_token_num={n}.*max_position_embeddings={n}"):
        SoftPromptModel(model, soft_token_num=n)  # no position would be left for the input
    assert_unchanged(model, before)
    assert f"soft_token_num < {n}" in str(info.value)
    assert SoftPromptModel(model, soft_token_num=n - 1).layers[""].soft_token_num == n - 1


# ------------------------------------------------------------------ good values


@pytest.mark.parametrize("delta_type", METHODS)
def test_the_defaults_build_and_detach_exactly(delta_type) -> None:
    model = fresh("bert")
    before = snapshot(model)
    delta = AutoDeltaModel.from_config({"delta_type": delta_type, **BUILD_ARGS.get(delta_type, {})}, model)
    assert delta.layers
    delta.detach()
    assert_unchanged(model, before)


@pytest.mark.parametrize("delta_type", METHODS)
def test_whole_floats_none_for_common_structure_and_tuples_are_read_as_what_they_mean(delta_type) -> None:
    config_cls = lookup(delta_type)[0]
    ints = [name for name, kind, _ in fields_of(delta_type) if kind is int and (delta_type, name) not in NOT_ALL_AT_ONCE]
    config = config_cls(common_structure=None, modified_modules=("query",), **{n: 4.0 for n in ints})
    assert config.common_structure is False and config.modified_modules == ["query"]
    assert all(type(getattr(config, n)) is int and getattr(config, n) == 4 for n in ints)
    assert config_cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    largest = config_cls(**{n: MAX_SIZE for n in ints})
    assert all(getattr(largest, n) == MAX_SIZE for n in ints)


def test_numbers_keep_their_values_and_numpy_scalars_become_python_numbers_json_can_write() -> None:
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": numpy.int64(4), "lora_alpha": 16,
                                        "lora_dropout": numpy.float32(0.25), "rank_pattern": {"query": 4.0}})
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.rank_pattern) == (4, 16, 0.25, {"query": 4})
    assert [type(v) for v in (config.lora_r, config.lora_alpha, config.lora_dropout, config.rank_pattern["query"])] \
        == [int, int, float, int]
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
