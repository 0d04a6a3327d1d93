"""Every method x {merge, export, PEFT out, PEFT in, arithmetic}, each cell of tests/support/shipping.py
checked on a tiny model: it works (with the equalities below), or it raises its typed error and changes nothing.

- merge: merged outputs within the measured float32 noise of the unmerged ones, unmerge exact;
- export: ``export_merged`` reloaded with ``from_pretrained`` equals the merged model bit for bit;
- PEFT out: our PEFT folder loads in ``peft.PeftModel.from_pretrained`` with equal outputs;
- PEFT in: PEFT's folder of that method loads into us with equal outputs;
- arithmetic: one delta at weight 1.0 comes back bit for bit (a PiSSA/OLoRA LoRA as its plain rank-2r form);
  where PEFT has ``add_weighted_adapter`` (and gets it right) a 2-delta linear combination equals PEFT's.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.ecosystem_fixtures import randomize_deltas
from support.methods import builtin_delta_types
from support.numerics import assert_changed, assert_within_noise
from support.shipping import BEGIN, CAPABILITIES, END, ROWS, Absent, Refused, Row, render
from support.three_families import noise, out, perturb_trainable
from torch import nn

from opendelta import AutoDeltaConfig, AutoDeltaModel, DeltaBase, PeftFormatError, combine
from opendelta.peft_format import PEFT_TYPES

DOC = Path(__file__).resolve().parents[1] / "docs" / "shipping.md"
CELLS = [pytest.param(row, key, id=f"{row.label.replace(', ', '-')}-{key}") for row in ROWS for key in CAPABILITIES]


def build(row: Row, model: nn.Module | None = None, seed: int = 2) -> tuple[nn.Module, DeltaBase]:
    """The row's delta on a fresh tiny model (or `model`), every tensor given non-zero values."""
    model = row.model() if model is None else model
    config = AutoDeltaConfig.from_dict({"delta_type": row.delta_type, **row.options})
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    randomize_deltas(delta, seed=seed)
    return model, delta


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_refused(outcome: Refused, model: nn.Module, act) -> None:
    """`act()` raises the outcome's error and leaves the model's outputs and tensors as they were."""
    before, tensors = out(model), state(model)
    with pytest.raises(outcome.error, match=outcome.match):
        act()
    assert torch.equal(out(model), before)
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())


def assert_moved(tuned: torch.Tensor, bare: torch.Tensor) -> None:
    """The delta changes the outputs at the input's positions (a prompt's own positions come first)."""
    assert_changed(tuned[:, -bare.shape[1]:], bare)


def test_every_registered_method_has_a_row():
    assert {row.delta_type for row in ROWS} == set(builtin_delta_types())


def test_the_docs_table_is_the_tested_table():
    text = DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == render(), "docs/shipping.md is stale: run `PYTHONPATH=src python scripts/shipping_table.py`"


@pytest.mark.parametrize("row, key", CELLS)
def test_cell(row: Row, key: str, tmp_path: Path) -> None:
    CHECKS[key](row, row.outcomes[key], tmp_path)


def check_merge(row: Row, outcome, tmp_path: Path) -> None:
    model, delta = build(row)
    if isinstance(outcome, Refused):
        assert_refused(outcome, model, delta.merge)
        assert not delta.is_merged
        return
    tuned = out(model)
    rounding = noise(model)  # the tuned model's own float32 rounding, measured
    delta.merge()
    assert_within_noise(out(model), tuned, rounding)
    delta.unmerge()
    assert torch.equal(out(model), tuned)


def check_export(row: Row, outcome, tmp_path: Path) -> None:
    model, delta = build(row)
    if isinstance(outcome, Refused):
        assert_refused(outcome, model, lambda: delta.export_merged(tmp_path / "out"))
        assert not (tmp_path / "out").exists()
        return
    tuned, tensors = out(model), state(model)
    delta.merge()
    merged, merged_tensors = out(model), state(model)
    delta.unmerge()
    delta.export_merged(tmp_path)
    assert torch.equal(out(model), tuned)  # the model in memory is as it was, bit for bit
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())
    # the file holds the merged model's tensors (save_pretrained leaves out tied copies)
    written = load_file(tmp_path / "model.safetensors")
    assert written and all(torch.equal(v, merged_tensors[k]) for k, v in written.items())
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(out(reloaded), merged)


def check_peft_out(row: Row, outcome, tmp_path: Path) -> None:
    model, delta = build(row)
    if isinstance(outcome, Refused):
        with pytest.raises(outcome.error, match=outcome.match):
            delta.save_finetuned(tmp_path, format="peft")
        assert not any(tmp_path.iterdir())
        return
    expected = out(model)
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(row.model(), tmp_path).eval()
    assert_within_noise(out(loaded), expected, noise(loaded))
    assert_moved(expected, out(row.model()))


def _peft_folder(row: Row, folder: Path) -> torch.Tensor:
    """A PEFT adapter of the row's kind with random values, saved to `folder`; its outputs."""
    made = peft.get_peft_model(row.model(), row.peft_config())
    if row.peft_converts:
        made.save_pretrained(folder / "initial")
        made.save_pretrained(folder / "unconverted")  # PEFT's conversion rewrites the initial folder's config
        made.peft_config["default"].init_lora_weights = True  # PEFT's docs do this before converting
    perturb_trainable(made, std=0.1)
    made.eval()
    expected = out(made)
    if row.peft_converts:
        made.save_pretrained(folder, path_initial_model_for_weight_conversion=folder / "initial")
    else:
        made.save_pretrained(folder)
    return expected


def check_peft_in(row: Row, outcome, tmp_path: Path) -> None:
    if isinstance(outcome, Absent):
        assert row.delta_type not in PEFT_TYPES.values() and row.peft_config is None
        return
    expected = _peft_folder(row, tmp_path)
    if row.peft_converts:  # an unconverted folder holds factors of a rewritten weight
        assert_refused(Refused(PeftFormatError, "path_initial_model_for_weight_conversion", ""), bare := row.model(),
                       lambda: AutoDeltaModel.from_finetuned(tmp_path / "unconverted", backbone_model=bare))
    model = row.model()
    delta = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert delta.delta_type == row.delta_type
    assert_within_noise(out(model), expected, noise(model))
    assert_moved(expected, out(row.model()))


def check_arithmetic(row: Row, outcome, tmp_path: Path) -> None:
    model, delta = build(row)
    if isinstance(outcome, Refused):
        assert_refused(outcome, model, lambda: combine([delta], [1.0]))
        return
    tuned = out(model)
    same = combine([delta], [1.0], "linear")
    assert same.delta_type == delta.delta_type and set(same.layers) == set(delta.layers)
    for path, layer in delta.layers.items():
        theirs, mine = _combined_tensors(same.layers[path]), _combined_tensors(layer)
        assert theirs.keys() == mine.keys() and all(torch.equal(theirs[name], value) for name, value in mine.items())
        assert getattr(same.layers[path], "scaling", None) == getattr(layer, "scaling", None)
    delta.switch(same)
    assert torch.equal(out(model), tuned)
    if row.peft_combines is not None:
        _equals_peft_weighted_sum(row, tmp_path)


def _combined_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A layer's saved tensors as arithmetic combines them: a LoRA's factors in their plain form (a PiSSA/OLoRA
    layer's rank-2r one, which the combined delta holds instead of the factors and the starting ones)."""
    tensors = dict(layer.state_dict())
    if "lora_A0" in tensors:
        del tensors["lora_A0"], tensors["lora_B0"]
        tensors["lora_A"], tensors["lora_B"] = layer.factors()
    return tensors


def _equals_peft_weighted_sum(row: Row, tmp_path: Path, weights: tuple[float, float] = (0.6, 0.4)) -> None:
    """combine([a, b], weights, "linear") computes what PEFT's add_weighted_adapter of the same two does."""
    made = peft.get_peft_model(row.model(), row.peft_config(), adapter_name="a")
    made.add_adapter("b", row.peft_config())
    perturb_trainable(made, std=0.1)
    made.save_pretrained(tmp_path)  # adapters other than 'default' go to sub-folders by name
    made.add_weighted_adapter(["a", "b"], list(weights), "mixed", **row.peft_combines)
    made.set_adapter("mixed")
    expected = out(made.eval())
    model = row.model()
    a, b = (AutoDeltaModel.from_finetuned(tmp_path / n, backbone_model=model, name=n) for n in ("a", "b"))
    b.detach()
    a.switch(combine([a, b], list(weights), "linear"))
    assert_within_noise(out(model), expected, noise(model))
    assert_moved(expected, out(row.model()))


CHECKS = {"merge": check_merge, "export": check_export, "peft_out": check_peft_out, "peft_in": check_peft_in,
          "arithmetic": check_arithmetic}
assert set(CHECKS) == set(CAPABILITIES)
