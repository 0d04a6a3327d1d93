"""Delta arithmetic: combine() equals PEFT's add_weighted_adapter, and is exact where PEFT is not (rsLoRA, DoRA)."""

from __future__ import annotations

import peft
import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from support.numerics import MARGIN, assert_changed, float32_noise, max_abs_diff, noise_bound

from opendelta import DeltaConfigError, IA3Model, LoraModel, UnsupportedModuleError, combine, negate

WEIGHTS = [0.7, -0.4]


def _inputs() -> dict[str, torch.Tensor]:
    batch = tiny_batch()
    batch.pop("labels")
    return batch


def _peft_pair(tmp_path, **options):
    """A PEFT model with LoRA adapters 'a' (query, value) and 'b' (query, value, key), both with `options`
    (e.g. use_dora), saved, and the same two loaded as opendelta deltas on a fresh backbone."""
    tuned = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], **options),
                                adapter_name="a")
    tuned.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=6, target_modules=["query", "value", "key"], **options))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "magnitude" in name:  # a trained DoRA magnitude stays near the weight's norms
                p.mul_(1 + torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    tuned.save_pretrained(tmp_path)  # adapters other than 'default' go to sub-folders by name
    model = tiny_bert()
    ours = [LoraModel.from_finetuned(tmp_path / n, model, name=n) for n in ("a", "b")]
    return tuned, model, ours


def _peft_updates(tuned, adapter: str) -> dict[str, torch.Tensor]:
    """Each module's effective weight update B A s of a PEFT adapter, by module path."""
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight(adapter).detach()
        for name, module in tuned.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer) and adapter in module.lora_A
    }


def _updates(delta) -> dict[str, torch.Tensor]:
    return {path: (layer.lora_B @ layer.lora_A) * layer.scaling for path, layer in delta.layers.items()}


def _combined_in_float64(deltas, *args, **kwargs):
    """The same combination of the deltas' factors on float64 plain-LoRA copies (on a float64 backbone): the
    rounding reference."""
    wide = tiny_bert().double()
    twins = []
    for d in deltas:
        twin = LoraModel(wide, modified_modules=list(d.layers), lora_r=d.config.lora_r, lora_alpha=d.config.lora_alpha,
                         name=d.name, use_rslora=d.config.use_rslora)
        with torch.no_grad():
            for path, layer in d.layers.items():
                twin.layers[path].lora_A.copy_(layer.lora_A.double())
                twin.layers[path].lora_B.copy_(layer.lora_B.double())
        twins.append(twin)
    return combine(twins, *args, **kwargs)


def _combine_both(tuned, ours, combination_type, options, monkeypatch):
    """PEFT's add_weighted_adapter ('mix') and combine() of the same deltas with WEIGHTS: our result."""
    # DARE's masks from one random stream, restarted for each side: PEFT also draws its new adapter's initial
    # weights from torch's global stream before the masks, so the global seed alone would give other masks
    masks = torch.Generator()
    real_bernoulli = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p, generator=None: real_bernoulli(p, generator=masks))
    masks.manual_seed(11)
    tuned.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=combination_type, **options)
    masks.manual_seed(11)
    mixed = combine(ours, WEIGHTS, combination_type, **options)
    monkeypatch.undo()
    return mixed


def _assert_updates_equal_peft(tuned, ours, mixed, combination_type, options) -> None:
    """Each module's update s B A of `mixed` equals that of PEFT's 'mix' within float32 rounding."""
    # the rounding reference: the same combination in float64; DARE's masks depend on the dtype they are drawn
    # in, so for DARE the reference is its deterministic core, the linear combination (same sums of products)
    measured = "linear" if combination_type.startswith("dare") else combination_type
    measured_options = {} if measured == "linear" else options
    wide = _updates(_combined_in_float64(ours, WEIGHTS, measured, **measured_options))
    narrow = _updates(combine(ours, WEIGHTS, measured, **measured_options))

    want = _peft_updates(tuned, "mix")
    got = _updates(mixed)
    assert sorted(got) == sorted(want)
    for path in want:
        step = torch.finfo(torch.float32).eps * max(wide[path].abs().max().item(), want[path].abs().max().item())
        noise = max(max_abs_diff(narrow[path], wide[path]), step)
        assert max_abs_diff(got[path], want[path]) <= MARGIN * noise, (path, max_abs_diff(got[path], want[path]), noise)


@pytest.mark.parametrize(
    ("combination_type", "options"),
    [
        ("linear", {}),
        ("cat", {}),
        ("svd", {}),
        ("ties", {"density": 0.5}),
        ("ties", {"density": 0.6, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.5}),
        ("dare_linear", {"density": 0.5}),
        ("dare_ties", {"density": 0.7}),
    ],
)
def test_combine_equals_peft_add_weighted_adapter(tmp_path, combination_type, options, monkeypatch):
    tuned, model, ours = _peft_pair(tmp_path)
    mixed = _combine_both(tuned, ours, combination_type, options, monkeypatch)
    _assert_updates_equal_peft(tuned, ours, mixed, combination_type, options)
    assert not mixed.is_attached and all(d.is_attached for d in ours)


@pytest.mark.parametrize(("combination_type", "options"), [("linear", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5})])
def test_dora_factors_combine_as_peft_combines_them_and_the_magnitudes_peft_drops_combine_around_the_weight_norms(
    tmp_path, combination_type, options, monkeypatch
):
    """PEFT issue 3761: PEFT's combined DoRA keeps its new adapter's fresh magnitude ||W||, whatever the
    deltas trained; ours combines the magnitudes' changes m_i - ||W|| with the same weights and rule."""
    tuned, model, ours = _peft_pair(tmp_path, use_dora=True)
    mixed = _combine_both(tuned, ours, combination_type, options, monkeypatch)
    _assert_updates_equal_peft(tuned, ours, mixed, combination_type, options)  # DARE's masks too: the magnitudes draw last
    for path, layer in mixed.layers.items():
        norms = layer.base_norm(model.get_submodule(path))
        theirs = tuned.base_model.model.get_submodule(path).lora_magnitude_vector["mix"].weight.detach()
        assert max_abs_diff(theirs, norms) <= noise_bound(norms)  # PEFT: the norms, the trained magnitudes gone
        trained = [(d.layers[path].magnitude, w) for d, w in zip(ours, WEIGHTS) if path in d.layers]
        assert_changed(layer.magnitude, norms)
        if combination_type == "linear":  # ours: ||W|| + sum w_i (m_i - ||W||)
            want = norms + sum(w * (m.double() - norms.double()) for m, w in trained)
            assert max_abs_diff(layer.magnitude, want) <= noise_bound(layer.magnitude)


def test_one_dora_delta_at_weight_one_comes_back_bit_for_bit_where_peft_resets_its_magnitude(tmp_path):
    tuned, model, (a, b) = _peft_pair(tmp_path, use_dora=True)
    b.detach()
    expected = model(**_inputs()).logits
    tuned.set_adapter("a")
    tuned.add_weighted_adapter(["a"], [1.0], "one", combination_type="linear")
    tuned.set_adapter("one")
    peft_once = tuned(**_inputs()).logits.detach()
    assert_changed(peft_once, expected, float32_noise(model, lambda m, _: m(**_inputs()).logits))  # PEFT's differs
    again = combine([a], [1.0])
    for path, layer in a.layers.items():
        assert torch.equal(again.layers[path].magnitude, layer.magnitude)
        assert torch.equal(again.layers[path].lora_A, layer.lora_A) and torch.equal(again.layers[path].lora_B, layer.lora_B)
    a.switch(again)
    assert torch.equal(model(**_inputs()).logits, expected)


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
@pytest.mark.parametrize(
    "options",
    [{}, {"use_rslora": True}, {"rank_pattern": {"layer.0.attention.self.query": 2}, "alpha_pattern": {"value": 3.0}}],
    ids=["plain", "rslora", "per-module-rank-alpha"],
)
def test_one_delta_with_weight_one_comes_back_bit_for_bit(combination_type, options):
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4, lora_alpha=8, **options)
    randomize_deltas(delta)
    expected = model(**_inputs()).logits
    same = combine([delta], [1.0], combination_type)
    for path, layer in delta.layers.items():
        assert torch.equal(same.layers[path].lora_A, layer.lora_A)
        assert torch.equal(same.layers[path].lora_B, layer.lora_B)
        assert same.layers[path].scaling == layer.scaling
    delta.switch(same)
    assert torch.equal(model(**_inputs()).logits, expected)


def test_peft_rslora_combination_scales_by_sqrt_r_where_ours_keeps_the_update(tmp_path):
    """PEFT issue 3761: the combined adapter gets alpha = r, which rsLoRA turns into scaling sqrt(r)."""
    tuned = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["query"]), adapter_name="a")
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.add_(0.1)
    tuned.save_pretrained(tmp_path)
    delta = LoraModel.from_finetuned(tmp_path / "a", tiny_bert(), name="a")
    tuned.add_weighted_adapter(["a"], [1.0], "one", combination_type="linear")
    peft_update = _peft_updates(tuned, "one")
    ours = _updates(combine([delta], [1.0]))
    for path, update in _updates(delta).items():
        assert torch.equal(ours[path], update)
        assert max_abs_diff(peft_update[path], update * 2) < 1e-4 * update.abs().max().item()  # sqrt(4) = 2 times


def test_negate_is_exact_and_cancels_the_delta():
    model = tiny_bert()
    bare = model(**_inputs()).logits
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    randomize_deltas(delta)
    opposite = negate(delta)
    for path, layer in delta.layers.items():
        assert torch.equal(opposite.layers[path].lora_A, -layer.lora_A)
        assert torch.equal(opposite.layers[path].lora_B, layer.lora_B)
    both = combine([delta, delta], [1.0, -1.0], "linear")
    delta.switch(both)
    assert torch.equal(model(**_inputs()).logits, bare)  # A - A is exactly zero


def test_modules_only_one_delta_has_combine_that_delta_alone(tmp_path):
    _, _, (a, b) = _peft_pair(tmp_path)
    mixed = combine([a, b], [1.0, 1.0], "cat")
    key = "bert.encoder.layer.0.attention.self.key"
    assert key in mixed.layers and key not in a.layers
    assert torch.equal(mixed.layers[key].lora_B, b.layers[key].lora_B)


def test_bad_arguments_are_typed_errors_naming_the_fix():
    model = tiny_bert()
    lora = LoraModel(model, modified_modules=["query"], lora_r=4)
    other = LoraModel(model, modified_modules=["query"], lora_r=2, name="small")
    with pytest.raises(DeltaConfigError, match="Did you mean 'ties'"):
        combine([lora], [1.0], "tie")
    with pytest.raises(DeltaConfigError, match="one finite number per delta"):
        combine([lora], [float("nan")])
    with pytest.raises(DeltaConfigError, match="density"):
        combine([lora], [1.0], "ties")
    with pytest.raises(DeltaConfigError, match="one rank"):
        combine([lora, other], [1.0, 1.0], "linear")
    with pytest.raises(DeltaConfigError, match="deltas of one method"):
        combine([lora, IA3Model(model, modified_modules=["key"])], [1.0, 1.0])
    assert combine([lora, other], [1.0, 1.0], "cat").layers["bert.encoder.layer.0.attention.self.query"].lora_A.shape[0] == 6


def test_a_lora_with_tensors_beyond_its_factors_is_refused():
    model = tiny_bert()
    lora = LoraModel(model, modified_modules=["query"], lora_r=4)
    layer = next(iter(lora.layers.values()))
    layer.register_parameter("magnitude", torch.nn.Parameter(torch.ones(32)))
    with pytest.raises(UnsupportedModuleError, match="magnitude"):
        combine([lora], [1.0])


def test_dare_with_a_seeded_generator_is_reproducible_and_keeps_about_density_of_the_entries():
    model = tiny_bert()
    deltas = [LoraModel(model, modified_modules=["query"], lora_r=4, name=f"t{i}") for i in range(2)]
    for i, d in enumerate(deltas):
        randomize_deltas(d, seed=i)
    first = combine(deltas, [1.0, 1.0], "dare_linear", density=0.5, generator=torch.Generator().manual_seed(1))
    again = combine(deltas, [1.0, 1.0], "dare_linear", density=0.5, generator=torch.Generator().manual_seed(1))
    for path, layer in first.layers.items():
        assert torch.equal(layer.lora_A, again.layers[path].lora_A)
