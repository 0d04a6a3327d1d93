"""VeRA, LoHa and LoKr: their equations, exact merge/unmerge, mixed batches, VeRA's shared pair, the
LyCORIS dropouts, and the PEFT format both ways (PEFT as the judge).

The method matrix, the family sweep and the multi-task tests run these methods too (fresh = identity,
gradients, detach, save/load on every tiny family); this file checks what is particular to them.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization
from safetensors import safe_open
from support.lifecycle import assert_exact_lifecycle
from support.numerics import assert_changed, assert_within_noise, float32_noise
from support.rows import assert_mixed_batch_is_each_row_alone
from torch import nn

from opendelta import AutoDeltaModel, DeltaConfigError, LoHaModel, LoKrModel, PeftFormatError, VeraModel
from opendelta.methods.lokr import factorization

from conftest import tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
#: linear layers on every family (GPT-2's are Conv1D), of several shapes (LLaMA's v_proj is 32 -> 16)
PLACES = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "output.dense"]}
#: small sizes that still take each method's every path (LoKr: W1 and W2 both factorised)
METHODS = {"vera": (VeraModel, {"r": 4}), "loha": (LoHaModel, {"r": 2}), "lokr": (LoKrModel, {"r": 1, "decompose_both": True})}
IDS = torch.randint(1, 99, (4, 7), generator=torch.Generator().manual_seed(3))


def out(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def build(method: str, family: str, model: nn.Module | None = None, **kwargs):
    cls, args = METHODS[method]
    model = BUILDERS[family]() if model is None else model
    return model, cls(model, modified_modules=PLACES[family], **{**args, **kwargs})


def randomize(delta, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def as_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


# ------------------------------------------------------------------ the equations


def test_loha_is_the_hadamard_product_of_two_low_rank_weights():
    model = nn.Sequential(nn.Linear(6, 5))
    delta = LoHaModel(model, modified_modules=["0"], r=3, alpha=6)
    randomize(delta)
    layer, x = delta.layers["0"], torch.randn(4, 6, dtype=torch.float64)
    w1 = layer.hada_w1_a.double() @ layer.hada_w1_b.double()
    w2 = layer.hada_w2_a.double() @ layer.hada_w2_b.double()
    want = F.linear(x, model[0].weight.double() + 2.0 * w1 * w2, model[0].bias.double())
    assert_within_noise(model(x.float()), want, float32_noise(model, lambda m, _: m(x.to(m[0].weight.dtype))))


@pytest.mark.parametrize("r", [1, 3])
def test_loha_gradients_are_those_of_its_equation_bit_for_bit(r):
    # backward recomputes the two products in autograd's own order of operations
    delta = LoHaModel(nn.Sequential(nn.Linear(12, 10)), modified_modules=["0"], r=r, alpha=6)
    randomize(delta)
    layer = delta.layers["0"]
    factors = [layer.hada_w1_a, layer.hada_w1_b, layer.hada_w2_a, layer.hada_w2_b]
    upstream = torch.randn(10, 12, generator=torch.Generator().manual_seed(4))
    change, equation = layer.weight_change(), (factors[0] @ factors[1]) * (factors[2] @ factors[3]) * (6 / r)
    assert torch.equal(change, equation)
    got, want = (torch.autograd.grad(c, factors, upstream) for c in (change, equation))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_loha_keeps_its_factors_not_their_products_for_backward():
    # as PEFT: of the layer's out x in tensors, only dW (which F.linear needs for the input's gradient) is kept
    delta = LoHaModel(nn.Sequential(nn.Linear(12, 10)), modified_modules=["0"], r=3)
    layer, x = delta.layers["0"], torch.randn(4, 12, requires_grad=True)
    known = {t.untyped_storage().data_ptr() for t in (x, *layer.parameters())}
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        layer(x)
    others = {s.data_ptr(): s.nbytes() for s in (t.untyped_storage() for t in kept) if s.data_ptr() not in known}
    assert list(others.values()) == [10 * 12 * 4]  # dW's storage (F.linear keeps its transpose)


@pytest.mark.parametrize("decompose_both", [False, True])
def test_lokr_is_the_kronecker_product_of_its_factors(decompose_both):
    model = nn.Sequential(nn.Linear(64, 24))
    delta = LoKrModel(model, modified_modules=["0"], r=2, alpha=3, decompose_both=decompose_both)
    randomize(delta)
    layer = delta.layers["0"]
    # 24 = 4 x 6 and 64 = 8 x 8; W2 (6 x 8) is rank 2 since 2 < 8 / 2, W1 (4 x 8) too with decompose_both
    assert layer.lokr_w2_a.shape == (6, 2) and layer.lokr_w2_b.shape == (2, 8)
    w1 = layer.lokr_w1_a @ layer.lokr_w1_b if decompose_both else layer.lokr_w1
    assert w1.shape == (4, 8)
    x = torch.randn(3, 64, dtype=torch.float64)
    change = torch.kron(w1.double(), (layer.lokr_w2_a @ layer.lokr_w2_b).double()) * 1.5
    want = F.linear(x, model[0].weight.double() + change, model[0].bias.double())
    assert_within_noise(model(x.float()), want, float32_noise(model, lambda m, _: m(x.to(m[0].weight.dtype))))


def test_lokr_keeps_w2_whole_when_r_is_not_below_half_its_size():
    delta = LoKrModel(nn.Sequential(nn.Linear(32, 32)), modified_modules=["0"], r=8)  # 32 = 4 x 8: 8 >= 8 / 2
    assert {n for n, _ in delta.layers["0"].named_parameters()} == {"lokr_w1", "lokr_w2"}


def test_lokr_factorization_is_peft_s():
    cases = [(d, f) for d in range(1, 300) for f in (-1, 0, 1, 3, 4, 8, 1000)]
    assert [factorization(d, f) for d, f in cases] == [peft_factorization(d, f) for d, f in cases]


def test_vera_scales_the_shared_projections_by_its_vectors():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 9))
    delta = VeraModel(model, modified_modules=["0", "1"], r=4)
    randomize(delta)
    x = torch.randn(3, 6, dtype=torch.float64)
    a, b = delta.layers["0"].projection.vera_A.double(), delta.layers["0"].projection.vera_B.double()
    assert a.shape == (4, 6) and b.shape == (9, 4)  # the largest input and output
    h = x
    for i, linear in enumerate(model):
        layer = delta.layers[str(i)]
        lam_b, lam_d = layer.vera_lambda_b.double(), layer.vera_lambda_d.double()
        change = (lam_b.unsqueeze(1) * b[: linear.out_features]) @ (lam_d.unsqueeze(1) * a[:, : linear.in_features])
        h = F.linear(h, linear.weight.double() + change, linear.bias.double())
    assert_within_noise(model(x.float()), h, float32_noise(model, lambda m, _: m(x.to(m[0].weight.dtype))))


def test_vera_starts_as_peft_does_and_trains_only_its_vectors():
    model = tiny_llama().train()
    delta = VeraModel(model, r=4, d_initial=0.25)
    for layer in delta.layers.values():
        assert torch.equal(layer.vera_lambda_b, torch.zeros_like(layer.vera_lambda_b))
        assert torch.equal(layer.vera_lambda_d, torch.full((4,), 0.25))
    randomize(delta)
    pair = {k: v.clone() for k, v in next(iter(delta.layers.values())).projection.state_dict().items()}
    delta.freeze_module(exclude=["deltas"])
    model(input_ids=IDS).logits.square().mean().backward()
    trained = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"vera_lambda_b", "vera_lambda_d"}
    projection = next(iter(delta.layers.values())).projection
    assert all(not t.requires_grad and torch.equal(t, pair[k]) for k, t in projection.state_dict().items())


# ------------------------------------------------------------------ VeRA's one shared pair


def test_vera_layers_share_one_pair_through_moves_and_copies():
    model, delta = build("vera", "llama")
    projections = {id(layer.projection) for layer in delta.layers.values()}
    assert len(projections) == 1
    model.double()
    pairs = {(layer.projection.vera_A.data_ptr(), layer.projection.vera_A.dtype) for layer in delta.layers.values()}
    assert len(pairs) == 1 and next(iter(pairs))[1] == torch.float64
    copied = copy.deepcopy(model)
    assert len({id(m) for n, m in copied.named_modules(remove_duplicate=False) if n.endswith("projection")}) == 1


def test_vera_checkpoint_holds_the_pair_once_and_reloads_exactly(tmp_path):
    model, delta = build("vera", "llama", projection_prng_key=7)
    randomize(delta)
    tuned = out(model)
    delta.save_finetuned(tmp_path)
    meta = json.loads((tmp_path / "delta_config.json").read_text())
    stored = [k for f in tmp_path.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    assert sum("vera_A" in k for k in stored) == 1 and sum("vera_B" in k for k in stored) == 1
    assert len(meta["shared_tensors"]) == 2 * (len(delta.layers) - 1)  # the other layers' keys name the first's
    other = tiny_llama()
    AutoDeltaModel.from_finetuned(tmp_path, other)
    assert torch.equal(out(other), tuned)


def test_vera_without_saved_projection_redraws_the_pair_from_the_seed(tmp_path):
    model, delta = build("vera", "gpt2", save_projection=False, projection_prng_key=11)
    randomize(delta)
    tuned = out(model)
    delta.save_finetuned(tmp_path)
    stored = [k for f in tmp_path.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    assert not any("vera_A" in k or "vera_B" in k for k in stored)
    other = tiny_gpt2()
    AutoDeltaModel.from_finetuned(tmp_path, other)
    assert torch.equal(out(other), tuned)


def test_vera_seeds_draw_different_pairs():
    _, first = build("vera", "bert", projection_prng_key=1)
    _, second = build("vera", "bert", projection_prng_key=2)
    _, again = build("vera", "bert", projection_prng_key=1)
    pair = lambda d: next(iter(d.layers.values())).projection.vera_A  # noqa: E731
    assert torch.equal(pair(first), pair(again)) and not torch.equal(pair(first), pair(second))


# ------------------------------------------------------------------ lifecycle and batches, on each family


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", BUILDERS)
def test_detach_merge_unmerge_are_bit_exact(method, family):
    def attach(model: nn.Module):
        bare = out(model)
        _, delta = build(method, family, model)
        assert torch.equal(out(model), bare)  # a fresh delta changes nothing
        randomize(delta)
        return delta

    assert_exact_lifecycle(BUILDERS[family](), attach, out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", BUILDERS)
def test_mixed_batch_equals_each_row_alone(method, family):
    def attach(model: nn.Module) -> list:
        deltas = [build(method, family, model, name=f"task{i}")[1] for i in range(2)]
        for i, d in enumerate(deltas):
            randomize(d, seed=10 + i)
        return deltas

    assert_mixed_batch_is_each_row_alone(BUILDERS[family](), attach, [0, 1, -1, 0], out, IDS)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_init_weights_false_starts_with_a_change(method):
    model = tiny_bert()
    bare = out(model)
    build(method, "bert", model, init_weights=False)
    assert_changed(out(model), bare)


def test_lokr_lycoris_init_zeroes_w2_instead_of_w1():
    layer = LoKrModel(nn.Sequential(nn.Linear(64, 64)), modified_modules=["0"], r=2, init_weights="lycoris").layers["0"]
    assert torch.count_nonzero(layer.lokr_w2_b) == 0 and torch.count_nonzero(layer.lokr_w1) > 0


# ------------------------------------------------------------------ the LyCORIS dropouts (training only)


def test_rank_dropout_zeroes_output_rows_of_the_change_and_rescales_the_rest():
    model = nn.Sequential(nn.Linear(8, 40))
    delta = LoHaModel(model, modified_modules=["0"], r=2, rank_dropout=0.5)
    randomize(delta)
    layer, x = delta.layers["0"], torch.randn(3, 8)
    model.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight_change()))  # no dropout in eval
    model.train()
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    kept = (torch.rand(40) > 0.5).float()
    want = F.linear(x, layer.weight_change() * (kept / kept.mean()).unsqueeze(1))
    torch.testing.assert_close(got, want)
    assert 0 < int(kept.sum()) < 40 and torch.equal(got[:, kept == 0], torch.zeros(3, int((kept == 0).sum())))


def test_lokr_rank_dropout_rescales_only_with_rank_dropout_scale():
    model = nn.Sequential(nn.Linear(8, 40)).train()
    delta = LoKrModel(model, modified_modules=["0"], r=2, rank_dropout=0.5)
    randomize(delta)
    layer, x = delta.layers["0"], torch.randn(3, 8)
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    kept = (torch.rand(40) > 0.5).float()
    torch.testing.assert_close(got, F.linear(x, layer.weight_change() * kept.unsqueeze(1)))


def test_module_dropout_skips_the_whole_change_for_a_call():
    model = nn.Sequential(nn.Linear(8, 6)).train()
    delta = LoKrModel(model, modified_modules=["0"], r=2, module_dropout=0.5)
    randomize(delta)
    x = torch.randn(3, 8)
    with torch.no_grad():
        weight, bias = model[0].weight, model[0].bias
        bare, full = F.linear(x, weight, bias), F.linear(x, weight, bias) + F.linear(x, delta.layers["0"].weight_change())
    applied = []
    for seed in range(12):
        torch.manual_seed(seed)
        applied.append(bool(torch.rand(1) > 0.5))  # the draw the layer makes first
        torch.manual_seed(seed)
        got = model(x)
        assert torch.equal(got, full if applied[-1] else bare)
    assert any(applied) and not all(applied)


def test_a_dropout_probability_of_one_is_refused():
    with pytest.raises(DeltaConfigError, match="rank_dropout"):
        LoHaModel(tiny_bert(), rank_dropout=1.0)


# ------------------------------------------------------------------ PEFT, both ways, PEFT as the judge

#: the PEFT configs of each method with the sizes of METHODS
PEFT_CONFIGS = {
    "vera": lambda targets, **kw: peft.VeraConfig(r=4, target_modules=targets, **kw),
    "loha": lambda targets, **kw: peft.LoHaConfig(r=2, alpha=4, target_modules=targets, **kw),
    "lokr": lambda targets, **kw: peft.LoKrConfig(r=1, alpha=3, decompose_both=True, target_modules=targets, **kw),
}


def _peft_roundtrip_cases() -> list:
    cases = [(m, f) for m in METHODS for f in ("llama", "bert")] + [("vera", "gpt2")]
    return [pytest.param(m, f, id=f"{m}-{f}") for m, f in cases]


@pytest.mark.parametrize("method,family", _peft_roundtrip_cases())
def test_saved_as_peft_loads_in_peft_with_equal_outputs(method, family, tmp_path):
    model, delta = build(method, family)
    randomize(delta)
    expected = out(model)
    delta.save_finetuned(tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == method.upper()
    loaded = peft.PeftModel.from_pretrained(BUILDERS[family](), tmp_path)
    got = out(loaded)
    assert_within_noise(got, expected, float32_noise(loaded, lambda m, _: out(m)))
    assert_changed(got, out(BUILDERS[family]()))


@pytest.mark.parametrize("method,family", _peft_roundtrip_cases())
def test_a_peft_folder_loads_with_equal_outputs(method, family, tmp_path):
    wrapped = peft.get_peft_model(BUILDERS[family](), PEFT_CONFIGS[method](PLACES[family]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    expected = out(wrapped)
    wrapped.save_pretrained(tmp_path)
    model = BUILDERS[family]()
    delta = AutoDeltaModel.from_finetuned(tmp_path, model)
    tuned = sorted(n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer))
    assert delta.delta_type == method and sorted(delta.layers) == tuned
    assert_within_noise(out(model), expected, float32_noise(model, lambda m, _: out(m)))
    assert_changed(expected, out(BUILDERS[family]()))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_per_module_rank_and_alpha_cross_to_peft_and_back(method, tmp_path):
    model, delta = build(method, "llama", rank_pattern={"v_proj": 3}, alpha_pattern={"layers.1.self_attn.q_proj": 5.0})
    randomize(delta)
    expected = out(model)
    delta.save_finetuned(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_within_noise(out(loaded), expected, float32_noise(loaded, lambda m, _: out(m)))
    other = tiny_llama()
    back = AutoDeltaModel.from_finetuned(tmp_path, other)
    assert back.config.rank_and_alpha("model.layers.0.self_attn.v_proj")[0] == 3
    assert torch.equal(out(other), out(model))


def test_vera_without_saved_projection_crosses_to_peft_and_back_through_the_seed(tmp_path):
    wrapped = peft.get_peft_model(tiny_llama(), PEFT_CONFIGS["vera"](PLACES["llama"], save_projection=False, projection_prng_key=3))
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.3)
    expected = out(wrapped)
    wrapped.save_pretrained(tmp_path / "peft")
    model = tiny_llama()
    delta = AutoDeltaModel.from_finetuned(tmp_path / "peft", model)  # our draw from seed 3 must be PEFT's
    assert not delta.config.save_projection
    assert_within_noise(out(model), expected, float32_noise(model, lambda m, _: out(m)))
    delta.save_finetuned(tmp_path / "back", format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "back")
    assert_within_noise(out(loaded), expected, float32_noise(loaded, lambda m, _: out(m)))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_loha_and_lokr_on_conv1d_cannot_be_saved_as_peft(method, tmp_path):
    _, delta = build(method, "gpt2")
    with pytest.raises(PeftFormatError, match="Conv1D"):
        delta.save_finetuned(tmp_path, format="peft")
    assert not any(tmp_path.iterdir())


def test_a_peft_loha_of_a_convolution_is_refused_saying_why(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    peft.get_peft_model(model, peft.LoHaConfig(r=2, target_modules=["0"], use_effective_conv2d=True)).save_pretrained(tmp_path)
    with pytest.raises(PeftFormatError, match="convolution"):
        AutoDeltaModel.from_finetuned(tmp_path, nn.Sequential(nn.Conv2d(3, 4, 3)))
