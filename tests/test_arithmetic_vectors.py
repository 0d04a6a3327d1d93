"""Arithmetic for IA3 and BitFit: their task vectors (l - 1, b) combine linearly, as PEFT does for IA3."""

from __future__ import annotations

import peft
import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from torch import nn

from opendelta import AdapterModel, BitFitModel, DeltaConfigError, IA3Model, LoraModel, combine, negate

KEY = "bert.encoder.layer.0.attention.self.key"


class Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _ia3(model: nn.Module, values: list[float], name: str) -> IA3Model:
    delta = IA3Model(model, modified_modules=["proj"], name=name)
    with torch.no_grad():
        delta.layers["proj"].scale.copy_(torch.tensor(values))
    return delta


def test_ia3_linear_with_weights_summing_to_one_equals_peft_add_weighted_adapter_bit_for_bit(tmp_path):
    tuned = peft.get_peft_model(tiny_bert(), peft.IA3Config(target_modules=["key", "value"], feedforward_modules=[]),
                                adapter_name="a")
    tuned.add_adapter("b", peft.IA3Config(target_modules=["key", "value"], feedforward_modules=[]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    tuned.save_pretrained(tmp_path)
    model = tiny_bert()
    a, b = (IA3Model.from_finetuned(tmp_path / n, model, name=n) for n in ("a", "b"))
    ours = combine([a, b], [0.25, 0.75])
    tuned.add_weighted_adapter(["a", "b"], [0.25, 0.75], "mixed")
    theirs = {
        name.removeprefix("base_model.model."): module.ia3_l["mixed"].detach().reshape(-1)
        for name, module in tuned.named_modules()
        if isinstance(module, peft.tuners.ia3.IA3Layer) and "mixed" in module.ia3_l
    }
    assert sorted(theirs) == sorted(ours.layers)
    for path, layer in ours.layers.items():
        assert torch.equal(layer.scale, theirs[path]), path


def test_ia3_combinations_act_on_l_minus_one_as_computed_by_hand():
    model = Projection()
    a = _ia3(model, [1.5, 0.75, 1.0, 1.125], "a")
    b = _ia3(model, [0.5, 0.875, 1.25, 1.375], "b")
    # linear: 1 + 0.5 (l_a - 1) - 0.25 (l_b - 1); every value here is a short binary fraction, so exact
    linear = combine([a, b], [0.5, -0.25]).layers["proj"].scale
    assert torch.equal(linear, torch.tensor([1.375, 0.90625, 0.9375, 0.96875]))
    # ties, density 0.5: tau_a = [.5, -.25, 0, .125] keeps [.5, -.25, 0, 0]; tau_b = [-.5, -.125, .25, .375] keeps
    # [-.5, 0, 0, .375]; elected signs (sums >= 0 are +): (+, -, +, +); the agreeing entries' means: [.5, -.25, 0, .375]
    ties = combine([a, b], [1.0, 1.0], "ties", density=0.5).layers["proj"].scale
    assert torch.equal(ties, torch.tensor([1.5, 0.75, 1.0, 1.375]))


def test_ia3_negation_subtracts_the_weight_change_the_delta_makes():
    model = Projection()
    a = _ia3(model, [1.5, 0.75, 1.0, 1.25], "a")
    negated = negate(a)
    assert torch.equal(negated.layers["proj"].scale, torch.tensor([0.5, 1.25, 1.0, 0.75]))
    weight = model.proj.weight.detach().clone()
    a.merge()
    changed = model.proj.weight.detach() - weight
    a.detach()
    negated.attach()
    negated.merge()
    assert torch.allclose(model.proj.weight.detach() - weight, -changed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["ia3", "bitfit"])
def test_one_delta_with_weight_one_comes_back_bit_for_bit(method):
    model = tiny_bert()
    cls = IA3Model if method == "ia3" else BitFitModel
    delta = cls(model, modified_modules=["key", "value"])
    randomize_deltas(delta, seed=5)
    again = combine([delta], [1.0])
    assert type(again) is cls and not again.is_attached
    tensor = "scale" if method == "ia3" else "bias"
    for path, layer in delta.layers.items():
        assert torch.equal(getattr(again.layers[path], tensor), getattr(layer, tensor))
    delta.detach()
    again.attach()
    batch = tiny_batch()
    batch.pop("labels")
    with torch.no_grad():
        got = model(**batch).logits
        again.detach()
        delta.attach()
        assert torch.equal(got, model(**batch).logits)


def test_bitfit_combination_is_the_weighted_sum_of_biases_and_negation_flips_them():
    model = tiny_bert()
    a, b = (BitFitModel(model, modified_modules=["key", "value"], name=n) for n in ("a", "b"))
    randomize_deltas(a, seed=1)
    randomize_deltas(b, seed=2)
    mixed = combine([a, b], [0.5, 2.0])
    for path, layer in mixed.layers.items():
        assert torch.equal(layer.bias, a.layers[path].bias * 0.5 + b.layers[path].bias * 2.0)
    assert all(torch.equal(layer.bias, -a.layers[p].bias) for p, layer in negate(a).layers.items())


def test_a_combination_runs_no_forward_when_the_deltas_proved_their_targets():
    model = tiny_bert()
    deltas = [LoraModel(model, modified_modules=["query"], lora_r=4, name=f"t{i}") for i in range(2)]
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    merged = combine(deltas, [0.5, 0.5])
    handle.remove()
    assert calls == [] and merged.proven_targets().keys() == merged.layers.keys()


def test_a_combination_of_unproven_deltas_leaves_its_proof_to_the_first_forward():
    model = Projection()  # no dummy input can be made for it: the deltas wait for the first forward
    a, b = _ia3(model, [1.0] * 4, "a"), _ia3(model, [2.0] * 4, "b")
    assert a.proven_targets() == {}
    merged = combine([a, b], [0.5, 0.5])
    assert merged.proven_targets() == {}
    a.detach()
    b.detach()
    merged.attach()
    model(torch.ones(1, 4))
    assert list(merged.proven_targets()) == ["proj"]


def test_methods_without_a_meaningful_combination_are_refused_naming_the_supported_ones():
    model = tiny_bert()
    adapter = AdapterModel(model, modified_modules=["attention.output.dense"])
    with pytest.raises(DeltaConfigError, match="lora, ia3, bitfit.*non-linear"):
        combine([adapter], [1.0])
    ia3 = IA3Model(model, modified_modules=["key"], name="out")
    with pytest.raises(DeltaConfigError, match="vectors"):
        combine([ia3], [1.0], "svd")
    ia3_in = IA3Model(model, modified_modules=["key"], feedforward_modules=["key"], name="in")
    with pytest.raises(DeltaConfigError, match="different sides"):
        combine([ia3, ia3_in], [1.0, 1.0])
