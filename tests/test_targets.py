"""Resolution of names into targets, once: what plan() and construction act on, spans as values,
checkpoint paths read back, and the one check for a string where a list of names belongs."""

from __future__ import annotations

import pytest
import torch
from support.families import fresh, fresh_base

from opendelta import IA3Model, LoraModel, ParallelAdapterModel, SoftPromptModel, find_modules
from opendelta.config import DeltaConfig
from opendelta.errors import DeltaConfigError, PatternError
from opendelta.structure import resolve_roles
from opendelta.targets import Target, resolve, targets_at


def snapshot(model: torch.nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()])


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    tensors, modules = snapshot(model)
    assert modules == before[1] and tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[k], before[0][k]) for k in tensors)


def test_plan_is_the_paths_of_the_resolved_targets_construction_builds() -> None:
    model = fresh("bert")
    targets = ParallelAdapterModel.resolve_targets(model)
    assert ParallelAdapterModel.plan(model) == [t.path for t in targets] == [str(t) for t in targets]
    delta = ParallelAdapterModel(model, bottleneck_dim=4)
    assert list(delta.layers) == [t.path for t in targets]


def test_a_span_target_holds_its_start_and_end_paths_and_modules() -> None:
    model = fresh("bert")
    (first, second) = resolve(model, ["intermediate.dense->output.dense"])
    assert (first.start, first.end) == ("encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense")
    assert first.is_span and first.sides == (first.start, first.end) and first.path == f"{first.start}->{first.end}"
    assert first.modules == (model.get_submodule(first.start), model.get_submodule(first.end))
    assert first.module is model.get_submodule(first.end)  # the span's layer lives on its end
    assert second.start == "encoder.layer.1.intermediate.dense"


def test_a_module_target_is_one_module_and_a_span_to_itself_is_that_module() -> None:
    model = fresh_base("llama")
    (by_name,) = resolve(model, ["layers.0.mlp"])
    (by_span,) = resolve(model, ["layers.0.mlp->layers.0.mlp"])
    assert by_name == by_span and not by_span.is_span and by_span.sides == ("layers.0.mlp",)
    assert by_span.module is by_span.site is model.get_submodule("layers.0.mlp")


def test_targets_are_immutable_values() -> None:
    (target,) = resolve(fresh("bert"), ["encoder.layer.0.attention.self.query"])
    with pytest.raises(AttributeError):
        target.start = "encoder.layer.1.attention.self.query"  # type: ignore[misc]
    assert hash(target) == hash(Target(target.start, target.end, target.site))


def test_names_and_roles_resolve_to_the_same_targets() -> None:
    model = fresh("bert")
    by_name = resolve(model, ["query", "value", "intermediate.dense->output.dense"])
    by_role = resolve(model, ["attn.q", "attn.v", "ffn.up->ffn.down"], roles=True)
    assert by_name == by_role


@pytest.mark.parametrize("method", [LoraModel, IA3Model, ParallelAdapterModel])
def test_common_structure_none_and_false_resolve_the_same(method) -> None:
    model = fresh("bert")
    names = ["encoder.layer.0.attention.self.query", "value"]
    assert method.plan(model, modified_modules=names, common_structure=None) == method.plan(
        model, modified_modules=names, common_structure=False
    )
    with_none = method(model, modified_modules=names, common_structure=None)
    assert with_none.config.common_structure is False
    assert with_none.config == method.config_class.from_dict({"modified_modules": names, "common_structure": False})


def test_the_soft_prompt_reads_its_embedding_by_role_with_common_structure() -> None:
    by_role = SoftPromptModel(fresh("bert"), modified_modules=["embed"], common_structure=True, soft_token_num=3)
    by_name = SoftPromptModel(fresh("bert"), modified_modules=["word_embeddings"], soft_token_num=3)
    assert by_role.layers[""].embedding[0] is by_role.backbone_model.get_input_embeddings()
    assert by_name.layers[""].embedding[0] is by_name.backbone_model.get_input_embeddings()


def test_saved_paths_resolve_to_the_same_targets_and_name_what_is_missing() -> None:
    model = fresh("bert")
    planned = ParallelAdapterModel.resolve_targets(model)
    found, missing = targets_at(model, [t.path for t in planned] + ["encoder.layer.7.output.dense"])
    assert found == planned and [t.site for t in found if not t.is_span] == [t.site for t in planned if not t.is_span]
    assert missing == ["encoder.layer.7.output.dense"]
    assert targets_at(model, [""])[0][0].module is model  # "" is the model itself


@pytest.mark.parametrize(
    "call",
    [
        lambda m: find_modules(m, "query"),
        lambda m: find_modules(m, ["query"], exclude="layer.0"),
        lambda m: resolve_roles(m, "attn.q"),
        lambda m: resolve(m, "query"),
        lambda m: LoraModel(m, modified_modules="query"),
        lambda m: LoraModel(m, exclude_modules="layer.0"),
        lambda m: IA3Model(m, feedforward_modules="intermediate.dense"),
        lambda m: LoraModel(m, modified_modules=["query"]).freeze_module(exclude="deltas"),
        lambda m: DeltaConfig.from_dict({"unfrozen_modules": "pooler"}),
    ],
    ids=["find_modules", "find_modules exclude", "resolve_roles", "resolve", "modified_modules", "exclude_modules",
         "feedforward_modules", "freeze_module exclude", "config dict"],
)
def test_a_single_string_for_a_list_of_names_is_one_pattern_error_everywhere(call) -> None:
    model = fresh("bert")
    before = snapshot(model)
    with pytest.raises(PatternError, match="must be a list of names, not a single string") as info:
        call(model)
    assert isinstance(info.value, DeltaConfigError)  # what the config layer raises for every bad field
    if "freeze_module" not in info.value.args[0]:
        assert_unchanged(model, before)
