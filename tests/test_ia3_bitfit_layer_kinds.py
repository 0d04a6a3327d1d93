"""(IA)^3 and BitFit on convolutions (channels first) and embeddings, through the layer-kind table."""

from __future__ import annotations

import peft
import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas
from support.numerics import assert_within_noise, float32_noise
from test_lora_layer_kinds import ConvNet, Encoder
from torch import nn

from opendelta import AutoDeltaModel, BitFitModel, IA3Model, PeftFormatError
from opendelta.errors import UnsupportedModuleError

X = torch.randn(3, 3, 4, 6, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[1, 5, 7, 2], [4, 4, 8, 1]])


def _noise(model: nn.Module) -> float:
    return float32_noise(model, lambda m, _: m(X.to(next(m.parameters()).dtype)))


@pytest.mark.parametrize(
    "build",
    [
        lambda m: IA3Model(m, modified_modules=["conv1", "conv2", "conv3"]),
        lambda m: IA3Model(m, modified_modules=["conv1", "conv2", "conv3"], feedforward_modules=["conv2", "conv3"]),
        lambda m: BitFitModel(m, modified_modules=["conv1", "conv2", "conv3"]),
    ],
    ids=["ia3-out", "ia3-in", "bitfit"],
)
def test_channel_deltas_on_convolutions_are_exact_to_detach_and_merge_like_the_layer(build):
    model = ConvNet()
    bare = model(X)
    delta = build(model)
    assert torch.equal(model(X), bare)
    randomize_deltas(delta)
    tuned = model(X)
    assert not torch.allclose(tuned, bare)
    if isinstance(delta, BitFitModel):  # conv3 has no bias of its own to merge into
        delta.detach()
        assert torch.equal(model(X), bare)
        return
    delta.merge()
    assert_within_noise(model(X), tuned, _noise(model))
    delta.unmerge()
    assert torch.equal(model(X), tuned)
    delta.detach()
    assert torch.equal(model(X), bare)


def test_ia3_scales_a_convolutions_output_channels():
    model = ConvNet()
    delta = IA3Model(model, modified_modules=["conv2"])
    randomize_deltas(delta)
    scale = delta.layers["conv2"].scale
    h = torch.randn(2, 4, 4, 6)
    got = model.conv2(h)
    delta.detach()
    assert torch.allclose(got, model.conv2(h) * scale.view(1, -1, 1, 1))


def test_bitfit_shifts_a_convolutions_channels_and_an_embeddings_features():
    model = Encoder()
    delta = BitFitModel(model, modified_modules=["embed"])
    randomize_deltas(delta)
    got = model.embed(IDS)
    delta.detach()
    assert torch.equal(got, model.embed(IDS) + delta.layers["embed"].bias)


def test_ia3_scales_an_embeddings_output_and_merges_into_its_columns():
    model = Encoder().eval()
    delta = IA3Model(model, modified_modules=["embed"])
    randomize_deltas(delta)
    tuned = model.embed(IDS)
    delta.merge()
    assert torch.allclose(model.embed(IDS), tuned, atol=1e-6)
    delta.unmerge()
    assert torch.equal(model.embed(IDS), tuned)


def test_ia3_cannot_scale_an_embeddings_token_ids():
    with pytest.raises(UnsupportedModuleError, match="token ids"):
        IA3Model(Encoder(), modified_modules=["embed"], feedforward_modules=["embed"])


@pytest.mark.parametrize("feedforward", [None, ["conv2"]])
def test_ia3_on_a_conv2d_round_trips_through_peft_both_ways(tmp_path, feedforward):
    model = ConvNet()
    delta = IA3Model(model, modified_modules=["conv2"], feedforward_modules=feedforward)
    randomize_deltas(delta)
    expected = model(X)
    delta.save_finetuned(tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(ConvNet(), tmp_path / "ours")
    assert_within_noise(theirs(X), expected, _noise(model))

    theirs.save_pretrained(tmp_path / "theirs")
    other = ConvNet()
    back = AutoDeltaModel.from_finetuned(tmp_path / "theirs", other)
    assert back.layers["conv2"].route == ("before" if feedforward else "after")
    assert_within_noise(other(X), expected, _noise(model))


@pytest.mark.parametrize("make", [lambda: IA3Model(Encoder(), modified_modules=["embed"]),
                                  lambda: IA3Model(ConvNet(), modified_modules=["conv1"])], ids=["embedding", "conv1d"])
def test_ia3_where_peft_has_none_cannot_be_saved_as_peft(tmp_path, make):
    with pytest.raises(PeftFormatError, match="no IA3"):
        make().save_finetuned(tmp_path, format="peft")
