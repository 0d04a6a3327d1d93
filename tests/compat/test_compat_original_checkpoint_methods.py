"""Checkpoints written by the real original OpenDelta 0.3.2 (tests/compat/original_checkpoints, made
by its generate.py under transformers 4.40.2) load into opendelta under transformers 5 and give the
original's outputs; what the original computed differently is refused with the reason.

The original's outputs were computed in float64, so the comparison runs in float64 too: the
tolerance is the bare backbone's own difference between the two transformers versions (measured
from the same files) plus float64 rounding, far below any wrong mapping (the deltas move the
logits by 3e-3 to 4)."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from compat_models import IDS, bert_masked_lm, seq2seq_inputs, t5
from safetensors.torch import load_file

from opendelta import AutoDeltaModel
from opendelta.__main__ import main as opendelta_cli
from opendelta.errors import IncompatibleCheckpointError
from opendelta.leniency import OriginalBehaviourWarning, strict_mode
from opendelta.original_format import convert

FOLDERS = Path(__file__).parent / "original_checkpoints"


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[..., :16]


def check_like_the_original(name: str, build, inputs) -> None:
    expected = load_file(FOLDERS / name / "expected.safetensors")
    model = build()
    bare = logits(model.double(), inputs)
    # the backbone alone differs across transformers versions by this much (kernels, op order)
    budget = (bare - expected["bare"]).abs().max().item() + 1e-12 * expected["delta"].abs().max().item()
    model = build()
    with warnings.catch_warnings(), strict_mode():  # a real original checkpoint loads cleanly, even strictly
        warnings.simplefilter("error", OriginalBehaviourWarning)
        delta = AutoDeltaModel.from_finetuned(FOLDERS / name, backbone_model=model)
    assert delta.delta_type == name.split("_t5")[0]
    ours = logits(model.double(), inputs)
    assert ours.shape == expected["delta"].shape
    assert (ours - expected["delta"]).abs().max().item() <= 4 * budget + 1e-10
    delta.detach()
    assert torch.equal(logits(model, inputs), bare)


BERT_INPUTS = {"input_ids": IDS}


# compacter.py / layers/hypercomplex_linear.py: a "compactor" (sic) after attn@.proj@ and ff@.w2@,
# PHM projections with phm_rule (n, n, n), W_left / W_right, bias b
def test_an_original_compacter_checkpoint_gives_the_original_outputs():
    check_like_the_original("compacter", bert_masked_lm, BERT_INPUTS)


# low_rank_adapter.py / layers/low_rank_linear.py: rank-1 W_left, W_right, bias b per projection
def test_an_original_low_rank_adapter_checkpoint_gives_the_original_outputs():
    check_like_the_original("low_rank_adapter", bert_masked_lm, BERT_INPUTS)


# parallel_adapter.py: modified_modules paired as (attn@, attn@), (ff@.w1@, ff@.w2@); the file
# holds each adapter under its start module only, the end comes from the backbone
def test_an_original_parallel_adapter_checkpoint_gives_the_original_outputs():
    check_like_the_original("parallel_adapter", bert_masked_lm, BERT_INPUTS)


# prefix.py, PrefixLayerBert (reparameterize=False): past_key / past_value per attention
def test_an_original_prefix_checkpoint_gives_the_original_outputs():
    check_like_the_original("prefix", bert_masked_lm, BERT_INPUTS)


# soft_prompt.py: soft_prompt_layer.soft_embeds on the model
def test_an_original_soft_prompt_checkpoint_gives_the_original_outputs():
    check_like_the_original("soft_prompt", bert_masked_lm, BERT_INPUTS)


# bitfit.py: BERT's own biases unfrozen (backbone tensors the delta trains)
def test_an_original_bitfit_checkpoint_gives_the_original_outputs():
    check_like_the_original("bitfit", bert_masked_lm, BERT_INPUTS)


# bitfit.py, add_bias_to_others: a BiasLayer "bitfit" after each T5LayerNorm
def test_an_original_bitfit_checkpoint_of_t5_gives_the_original_outputs():
    check_like_the_original("bitfit_t5", t5, seq2seq_inputs())


def test_an_original_reparameterized_prefix_is_refused_with_the_reason():
    model = bert_masked_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleCheckpointError, match="ONE shared MLP"):
        AutoDeltaModel.from_finetuned(FOLDERS / "prefix_reparameterized", backbone_model=model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_an_original_low_rank_adapter_of_rank_two_is_refused(tmp_path):
    folder = tmp_path / "lra"
    shutil.copytree(FOLDERS / "low_rank_adapter", folder)
    config = (folder / "config.json").read_text().replace('"low_rank_rank": 1', '"low_rank_rank": 2')
    (folder / "config.json").write_text(config)
    with pytest.raises(IncompatibleCheckpointError, match="elementwise"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=bert_masked_lm())


def test_opendelta_convert_places_an_original_parallel_adapter_with_its_backbone(tmp_path):
    with pytest.raises(IncompatibleCheckpointError, match="--model"):
        convert(FOLDERS / "parallel_adapter", tmp_path / "no_backbone")
    with torch.device("meta"):
        skeleton = bert_masked_lm()
    convert(FOLDERS / "parallel_adapter", tmp_path / "converted", backbone_model=skeleton)
    model = bert_masked_lm()
    delta = AutoDeltaModel.from_finetuned(tmp_path / "converted", backbone_model=model)
    reference = bert_masked_lm()
    AutoDeltaModel.from_finetuned(FOLDERS / "parallel_adapter", backbone_model=reference)
    assert "bert.encoder.layer.0.intermediate.dense->bert.encoder.layer.0.output.dense" in delta.layers
    assert torch.equal(logits(model, BERT_INPUTS), logits(reference, BERT_INPUTS))


def test_opendelta_convert_cli_builds_the_backbone_from_its_model_folder(tmp_path, capsys):
    assert opendelta_cli(["convert", str(FOLDERS / "bitfit_t5"), str(tmp_path / "out")]) == 1
    assert "--model" in capsys.readouterr().err
    t5().config.save_pretrained(tmp_path / "t5")  # config.json only: no weights are read
    assert opendelta_cli(["convert", str(FOLDERS / "bitfit_t5"), str(tmp_path / "out"), "--model", str(tmp_path / "t5")]) == 0
    model = t5()
    AutoDeltaModel.from_finetuned(tmp_path / "out", backbone_model=model)
    reference = t5()
    AutoDeltaModel.from_finetuned(FOLDERS / "bitfit_t5", backbone_model=reference)
    assert torch.equal(logits(model, seq2seq_inputs()), logits(reference, seq2seq_inputs()))
