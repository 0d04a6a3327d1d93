"""docs/adding_a_method.md holds: its toy method, defined exactly as the page shows, is a full method."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert

from opendelta import AutoDeltaConfig, AutoDeltaModel, DeltaBase, registry

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"
MODULE = "scale_shift_from_the_docs"


@pytest.fixture(scope="module")
def scale_shift():
    """The page's first code block run as a module of its own; unregistered again afterwards."""
    source = re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)
    module = types.ModuleType(MODULE)
    sys.modules[MODULE] = module  # dataclasses look their module up while the class is made
    try:
        exec(compile(source, str(PAGE), "exec"), module.__dict__)
        yield module
    finally:
        sys.modules.pop(MODULE, None)
        if "scale_shift" in registry.known_delta_types():
            registry.unregister("scale_shift")


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in tiny_batch().items() if k != "labels"}).logits


def test_the_toy_method_is_about_thirty_lines():
    source = re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)
    code = [line for line in source.splitlines() if line.strip()]
    assert len(code) <= 35


def test_defining_the_class_registers_its_delta_type(scale_shift):
    config = AutoDeltaConfig.from_dict({"delta_type": "scale_shift"})
    assert type(config) is scale_shift.ScaleShiftConfig
    delta = AutoDeltaModel.from_config(config, tiny_bert())
    assert type(delta) is scale_shift.ScaleShiftModel


def test_it_goes_to_its_default_roles_and_a_fresh_delta_changes_nothing(scale_shift):
    model = tiny_bert()
    before = logits(model)
    delta = scale_shift.ScaleShiftModel(model)
    assert sorted(delta.layers) == sorted(
        f"bert.encoder.layer.{i}.{part}" for i in range(2) for part in ("attention.output.dense", "output.dense")
    )
    assert torch.equal(logits(model), before)


def test_detach_restores_and_attach_reproduces_the_tuned_model(scale_shift):
    model = tiny_bert()
    before = logits(model)
    delta = scale_shift.ScaleShiftModel(model)
    randomize_deltas(delta)
    tuned = logits(model)
    assert not torch.equal(tuned, before)
    delta.detach()
    assert torch.equal(logits(model), before)
    delta.attach()
    assert torch.equal(logits(model), tuned)


def test_only_its_parameters_train_after_freezing(scale_shift):
    model = tiny_bert()
    delta = scale_shift.ScaleShiftModel(model)
    delta.freeze_module(exclude=["deltas"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if n.rsplit(".", 1)[-1] in ("scale", "shift")}
    assert len(trainable) == 2 * len(delta.layers)


def test_save_then_load_into_a_fresh_backbone_reproduces_the_tuned_output(scale_shift, tmp_path):
    model = tiny_bert()
    delta = scale_shift.ScaleShiftModel(model)
    randomize_deltas(delta)
    tuned = logits(model)
    delta.save_finetuned(tmp_path / "ckpt")
    other = tiny_bert()
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", other)
    assert isinstance(loaded, DeltaBase) and type(loaded) is scale_shift.ScaleShiftModel
    assert torch.equal(logits(other), tuned)
    loaded.detach()
    assert torch.equal(logits(other), logits(tiny_bert()))


def test_every_constructor_runs_prepare_once_before_new_layer_with_the_targets_set(scale_shift, monkeypatch, tmp_path):
    method = scale_shift.ScaleShiftModel
    method(tiny_bert()).save_finetuned(tmp_path / "ckpt")
    calls: list[tuple] = []
    build_layer = method.new_layer

    def prepare(self, observations):
        calls.append(("prepare", list(self.targets), sorted(observations)))

    def new_layer(self, path, module, observation):
        calls.append(("new_layer", path))
        return build_layer(self, path, module, observation)

    monkeypatch.setattr(method, "prepare", prepare)
    monkeypatch.setattr(method, "new_layer", new_layer)
    for build in (
        lambda: method(tiny_bert()),
        lambda: method.from_config({}, tiny_bert()),
        lambda: method.from_finetuned(tmp_path / "ckpt", tiny_bert()),
    ):
        calls.clear()
        delta = build()
        paths = list(delta.layers)
        assert calls == [("prepare", paths, sorted(paths)), *(("new_layer", p) for p in paths)]


def test_the_targets_a_method_sees_are_read_only(scale_shift):
    delta = scale_shift.ScaleShiftModel(tiny_bert())
    path = next(iter(delta.targets))
    with pytest.raises(TypeError):
        delta.targets[path] = torch.nn.Identity()  # type: ignore[index]
    assert list(delta.targets) == list(delta.layers)
