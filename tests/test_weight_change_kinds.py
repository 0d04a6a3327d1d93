"""LoHa, LoKr, AdaLoRA and OFT beyond linear layers (opendelta.layer_kinds.WeightMap): convolutions, and
OFT on embeddings; exact lifecycle, and PEFT's format both ways where PEFT computes the same."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas
from support.numerics import assert_within_noise, batching_noise, float32_noise
from support.rows import each_row_alone
from torch import nn

from opendelta import AdaLoraModel, AutoDeltaModel, LoHaModel, LoKrModel, LoraModel, OftModel, mixed_batch
from opendelta.errors import PeftFormatError, UnsupportedModuleError

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """An embedding, a Conv1d and two Conv2d (1x1, and 3x3 strided), fed from token ids."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 8)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.p = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 6, 3, stride=2, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c1(self.emb(ids).transpose(1, 2))
        h = self.p(torch.relu(h).unsqueeze(-1).expand(-1, -1, -1, 4))
        return self.c3(torch.relu(h)).flatten(1)


IDS = torch.tensor([[1, 5, 7, 2, 9], [4, 4, 8, 1, 0], [11, 2, 3, 3, 7]])
#: method -> (class, our arguments, PEFT's config class, its arguments, the modules)
METHODS = {
    "loha": (LoHaModel, {"r": 2, "alpha": 4}, "LoHaConfig", {"r": 2, "alpha": 4}, ["c1", "p", "c3"]),
    "lokr": (LoKrModel, {"r": 1, "alpha": 2}, "LoKrConfig", {"r": 1, "alpha": 2}, ["c1", "p", "c3"]),  # W2 low-rank
    "adalora": (AdaLoraModel, {"init_r": 3, "target_r": 2, "total_step": 10}, "AdaLoraConfig",
                {"init_r": 3, "target_r": 2, "total_step": 10}, ["p", "c3"]),
    "oft": (OftModel, {"r": 0, "oft_block_size": 4}, "OFTConfig", {"r": 0, "oft_block_size": 4}, ["emb", "p"]),
}


def out(model: nn.Module, rows: slice = slice(None)) -> torch.Tensor:
    return model(IDS[rows])


def build(method: str, model: nn.Module, modules: list[str] | None = None, **extra):
    cls, kwargs, _, _, places = METHODS[method]
    return cls(model, modified_modules=modules or places, **kwargs, **extra)


@pytest.mark.parametrize("method", METHODS)
def test_fresh_changes_nothing_detach_merge_unmerge_are_bit_exact_and_reload_is_exact(method, tmp_path):
    model = Net()
    modules = [*METHODS[method][4], *(["c1"] if method in ("adalora", "oft") else [])]  # Conv1d on our side too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bare = out(model)
    delta = build(method, model, modules)
    assert torch.equal(out(model), bare)
    randomize_deltas(delta)
    tuned = out(model)
    assert not torch.allclose(tuned, bare)
    delta.save_finetuned(tmp_path)
    delta.merge()
    assert_within_noise(out(model), tuned, float32_noise(model, out))
    delta.unmerge()
    assert torch.equal(out(model), tuned)
    delta.detach()
    assert torch.equal(out(model), bare)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    other = Net()
    AutoDeltaModel.from_finetuned(tmp_path, other)
    assert torch.equal(out(other), tuned)


def test_loha_on_convolutions_mixes_batches_row_by_row():
    model = Net()
    noise = batching_noise(model, out, len(IDS)), float32_noise(model, out)
    deltas = [build("loha", model, name=f"task{i}") for i in range(2)]
    for i, d in enumerate(deltas):
        randomize_deltas(d, seed=10 + i)
    rows = [1, -1, 0]
    with torch.no_grad(), mixed_batch(deltas, rows):
        mixed = out(model)
    alone = each_row_alone(deltas, rows, lambda i: out(model, slice(i, i + 1)))
    assert_within_noise(mixed, alone, *noise)


@pytest.mark.parametrize("method", METHODS)
def test_peft_round_trip_both_ways_gives_equal_outputs(method, tmp_path):
    """Ours saved as PEFT loads in PeftModel with equal outputs, and PEFT's folder loads into us."""
    cls, kwargs, peft_config, peft_kwargs, places = METHODS[method]
    model = Net()
    noise = float32_noise(model, out)
    delta = build(method, model)
    randomize_deltas(delta)
    with torch.no_grad():
        ours = out(model)
    delta.save_finetuned(tmp_path / "ours", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
        reference = peft.get_peft_model(Net(), getattr(peft, peft_config)(target_modules=places, **peft_kwargs))
    with torch.no_grad():
        assert_within_noise(theirs_model(IDS), ours, noise)
        factors = [p for n, p in reference.named_parameters() if any(t in n for t in ("hada_", "lokr_", "lora_", "oft_"))]
        generator = torch.Generator().manual_seed(7)
        for p in factors:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        want = reference(IDS)
    reference.save_pretrained(tmp_path / "theirs")
    loaded = Net()
    AutoDeltaModel.from_finetuned(tmp_path / "theirs", loaded)
    with torch.no_grad():
        assert_within_noise(out(loaded), want, noise)


# ----------------------------------------------------------------- what PEFT computes differently, and refusals


def test_lokr_on_conv1d_with_a_whole_w2_is_refused_in_peft_format_both_ways(tmp_path):
    """PEFT 0.21.2 misaligns a 3-D W2 against W1 (make_kron): refused, never silently different."""
    delta = LoKrModel(Net(), modified_modules=["c1"], r=4)  # r >= half of W2's size: W2 whole, (b, d, kernel)
    with pytest.raises(PeftFormatError, match="make_kron"):
        delta.save_finetuned(tmp_path / "ours", format="peft")
    peft.get_peft_model(Net(), peft.LoKrConfig(r=4, target_modules=["c1"])).save_pretrained(tmp_path / "theirs")
    with pytest.raises(PeftFormatError, match="make_kron"):
        AutoDeltaModel.from_finetuned(tmp_path / "theirs", Net())


def test_oft_on_a_wide_kernel_is_ours_only_and_rotates_the_kernel(tmp_path):
    """PEFT's OFT forward on a 3x3 Conv2d folds rotated patches back with their overlaps summed (a fresh adapter
    already changes its outputs), unlike its own merge W R^T; ours computes W R^T, and refuses PEFT's format."""
    model = Net()
    delta = OftModel(model, modified_modules=["c3"], r=0, oft_block_size=8)
    randomize_deltas(delta)
    layer = delta.layers["c3"]
    kernel = model.c3.weight
    want = (layer.matrix() @ kernel.flatten(1).t()).t().reshape(kernel.shape)
    assert torch.equal(layer.changed_parameters(model.c3, {"weight": kernel})["weight"], want)
    with pytest.raises(PeftFormatError, match="1x1"):
        delta.save_finetuned(tmp_path, format="peft")


@pytest.mark.parametrize("method", ["loha", "adalora"])
def test_convolutions_peft_does_not_take_are_refused_when_saving_as_peft(method, tmp_path):
    model = nn.Sequential(nn.Conv3d(2, 4, 1) if method == "loha" else nn.Conv1d(2, 4, 3))
    delta = build(method, model, ["0"])
    with pytest.raises(PeftFormatError, match="Conv"):
        delta.save_finetuned(tmp_path, format="peft")


@pytest.mark.parametrize("method", METHODS)
def test_a_convolution_that_is_not_zero_padded_is_refused_and_the_model_is_left_alone(method):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(UnsupportedModuleError, match="padding_mode='reflect'"):
        build(method, model, ["0"])
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_scale_refusal_names_the_weight_swap_not_a_prompt():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True)})
    delta = LoraModel(model, modified_modules=["attn"], lora_r=2)
    with pytest.raises(UnsupportedModuleError, match="stand in for the weights") as error:
        delta.scale(0.5)
    assert "prompt" not in str(error.value)
