"""Arithmetic for the LoRA variants and trainable tokens: DoRA (factors and magnitudes), PiSSA/OLoRA-started
LoRA (through its plain rank-2r form, on the original backbone) and trained embedding rows; one delta at
weight 1.0 comes back bit for bit. The comparison with PEFT's add_weighted_adapter is in test_arithmetic.py."""

from __future__ import annotations

import pytest
import torch
from support.ecosystem_fixtures import tiny_batch, tiny_bert
from support.families import fresh
from support.numerics import assert_changed, assert_within_noise, float32_noise
from support.three_families import out

from opendelta import DeltaConfigError, LifecycleError, LoraModel, TrainableTokensModel, combine, negate

VARIANTS = {
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "dora-pissa": {"use_dora": True, "init_lora_weights": "pissa"},
    # rank 3 -> plain rank 6 with rsLoRA: the result's alpha must give the source's scaling exactly
    "pissa-rslora-r3": {"init_lora_weights": "pissa", "lora_r": 3, "lora_alpha": 5, "use_rslora": True},
}
#: the combinations that give one delta back at weight 1.0 (the pruning ones at density 1: nothing pruned)
EXACT = [("linear", {}), ("cat", {})] + [(c, {"density": 1.0}) for c in ("ties", "dare_linear", "dare_ties", "magnitude_prune")]


def _logits(model) -> torch.Tensor:
    batch = tiny_batch()
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits


def _trained(model, options: dict, name: str = "t", seed: int = 2) -> LoraModel:
    """A LoRA variant on query and value moved away from its start as training would: the factors by noise,
    a DoRA magnitude by a few percent (so within a factor of 2 of the weight's norms, as trained ones are)."""
    delta = LoraModel(model, modified_modules=["query", "value"], name=name, **{"lora_r": 4, "lora_alpha": 8, **options})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in delta.layers.values():
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            if options.get("use_dora"):
                layer.magnitude.mul_(1 + torch.randn(layer.magnitude.shape, generator=g) * 0.05)
    return delta


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model, state: dict[str, torch.Tensor]) -> None:
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("combination_type", "options"), EXACT, ids=[c for c, _ in EXACT])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_variant_delta_at_weight_one_comes_back_bit_for_bit_on_the_original_backbone(variant, combination_type, options):
    model = tiny_bert()
    bare = _state(model)
    delta = _trained(model, VARIANTS[variant])
    expected = _logits(model)
    same = combine([delta], [1.0], combination_type, **options)
    assert not same.config.data_aware_init  # a plain LoRA (or DoRA): it adds its update to the original weight
    for path, layer in delta.layers.items():
        a, b = layer.factors()  # a PiSSA/OLoRA layer's plain rank-2r form
        assert torch.equal(same.layers[path].lora_A, a) and torch.equal(same.layers[path].lora_B, b)
        assert same.layers[path].scaling == layer.scaling
        if "use_dora" in VARIANTS[variant]:
            assert torch.equal(same.layers[path].magnitude, layer.magnitude)
    delta.detach()
    _assert_state(model, bare)  # the source's detach restores the original weights
    same.attach()
    assert torch.equal(_logits(model), expected)
    same.detach()
    _assert_state(model, bare)


@pytest.mark.parametrize("variant", ["dora", "pissa"])
def test_svd_of_one_variant_delta_reproduces_it_within_float32_rounding(variant):
    model = tiny_bert()
    delta = _trained(model, VARIANTS[variant])
    expected = _logits(model)
    rounding = float32_noise(model, lambda m, _: _logits(m))  # the tuned model's own float32 rounding, measured
    again = combine([delta], [1.0], "svd")
    delta.switch(again)
    assert_within_noise(_logits(model), expected, rounding)


def test_dora_magnitudes_combine_around_the_weight_norms_and_negate_exactly():
    model = tiny_bert()
    a, b = _trained(model, VARIANTS["dora"], "a", seed=1), _trained(model, VARIANTS["dora"], "b", seed=2)
    mixed = combine([a, b], [0.5, 0.25])
    opposite = negate(a)
    for path, layer in mixed.layers.items():
        norms = layer.base_norm(model.get_submodule(path))
        m_a, m_b = a.layers[path].magnitude, b.layers[path].magnitude
        # sum w_i m_i + (1 - sum w_i) ||W||: ||W|| + sum w_i (m_i - ||W||), and one delta at weight 1.0 exactly itself
        assert torch.equal(layer.magnitude, m_a * 0.5 + m_b * 0.25 + 0.25 * norms)
        assert torch.equal(opposite.layers[path].magnitude, m_a * -1.0 + 2.0 * norms)
        assert torch.equal(opposite.layers[path].lora_A, -a.layers[path].lora_A)


def test_a_delta_and_its_negation_cancel_for_pissa_exactly():
    model = tiny_bert()
    bare_logits = _logits(model)
    delta = _trained(model, VARIANTS["pissa"])
    both = combine([delta, delta], [1.0, -1.0])  # A - A is exactly zero in the plain form
    delta.switch(both)
    assert torch.equal(_logits(model), bare_logits)


def test_pissa_and_plain_lora_of_twice_the_rank_combine_entry_by_entry():
    model = tiny_bert()
    pissa = _trained(model, VARIANTS["pissa"], "pissa")
    plain = _trained(model, {"lora_r": 8, "lora_alpha": 16}, "plain", seed=3)
    mixed = combine([pissa, plain], [1.0, 1.0], "linear")
    assert all(layer.lora_A.shape[0] == 8 for layer in mixed.layers.values())
    with pytest.raises(DeltaConfigError, match="counts twice its r"):
        combine([pissa, _trained(model, {}, "rank4")], [1.0, 1.0], "linear")


def test_dora_beside_plain_lora_and_a_merged_dora_are_refused_leaving_the_model_as_it_was():
    model = tiny_bert()
    dora = _trained(model, VARIANTS["dora"], "dora")
    plain = _trained(model, {}, "plain")
    plain.detach()
    before, state = _logits(model), _state(model)
    with pytest.raises(DeltaConfigError, match="DoRA deltas with DoRA deltas"):
        combine([dora, plain], [0.5, 0.5])
    dora.merge()
    merged, state = _logits(model), _state(model)
    with pytest.raises(LifecycleError, match="unmerge"):
        combine([dora], [1.0])
    assert torch.equal(_logits(model), merged)
    _assert_state(model, state)
    dora.unmerge()
    assert torch.equal(_logits(model), before)


# ----------------------------------------------------------------- trainable tokens

TOKENS = [1, 3, 5]


def _tokens(model, name: str, seed: int, indices: list[int] = TOKENS) -> TrainableTokensModel:
    delta = TrainableTokensModel(model, token_indices=indices, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in delta.layers.values():
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return delta


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2's head is tied to its embedding: its layer follows the rows
def test_trained_rows_at_weight_one_come_back_bit_for_bit(family):
    model = fresh(family)
    bare = _state(model)
    delta = _tokens(model, "t", seed=1)
    expected = out(model)
    same = combine([delta], [1.0])
    assert list(same.layers) == list(delta.layers)
    for path, layer in delta.layers.items():
        assert all(torch.equal(same.layers[path].state_dict()[k], v) for k, v in layer.state_dict().items())
    delta.switch(same)
    assert torch.equal(out(model), expected)
    same.detach()
    _assert_state(model, bare)


def test_trained_rows_combine_linearly_around_the_embedding_and_negation_undoes_the_merged_change():
    model = fresh("llama")  # an untied embedding: the rows merge
    a, b = _tokens(model, "a", seed=1), _tokens(model, "b", seed=2)
    b.detach()
    path = "model.embed_tokens"
    original = model.get_submodule(path).weight.detach()[TOKENS].clone()
    rows_a, rows_b = a.layers[path].trainable_tokens_delta, b.layers[path].trainable_tokens_delta
    mixed = combine([a, b], [0.5, 0.25]).layers[path].trainable_tokens_delta
    assert torch.equal(mixed, rows_a * 0.5 + rows_b * 0.25 + 0.25 * original)  # original + sum w_i (rows_i - original)
    opposite = negate(a)
    assert torch.equal(opposite.layers[path].trainable_tokens_delta, rows_a * -1.0 + 2.0 * original)
    a.merge()
    change = model.get_submodule(path).weight.detach()[TOKENS] - original
    a.unmerge()
    a.switch(opposite)
    assert_changed(out(model), out(fresh("llama")))
    opposite.merge()
    # 2 original - rows, less the original, is -(rows - original) up to a rounding or two at the rows' size
    step = torch.finfo(original.dtype).eps * max(rows_a.abs().max().item(), original.abs().max().item())
    assert_within_noise(model.get_submodule(path).weight.detach()[TOKENS] - original, -change, step)


def test_trained_rows_of_other_tokens_or_of_a_merged_delta_are_refused_leaving_the_model_as_it_was():
    model = fresh("llama")
    a = _tokens(model, "a", seed=1)
    other = _tokens(model, "other", seed=2, indices=[2, 4, 6])
    other.detach()
    with pytest.raises(DeltaConfigError, match="one token_indices"):
        combine([a, other], [0.5, 0.5])
    a.merge()  # the embedding now holds the trained rows: not the rows the delta started from
    merged, state = out(model), _state(model)
    with pytest.raises(DeltaConfigError, match="unmerge"):
        combine([a], [1.0])
    assert torch.equal(out(model), merged)
    _assert_state(model, state)
