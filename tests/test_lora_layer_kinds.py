"""LoRA on every layer kind (opendelta.layer_kinds): embeddings, convolutions, MultiheadAttention and
fused MoE expert parameters, each with the lifecycle promises of LoRA on linear layers."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas
from support.families import fresh
from support.numerics import assert_within_noise, batching_noise, float32_noise
from support.rows import each_row_alone
from torch import nn

from opendelta import AutoDeltaModel, LoraModel, mixed_batch
from opendelta.errors import MixedBatchError, NoMatchError, UnsupportedModuleError


class ConvNet(nn.Module):
    """One convolution of each dimension, fed from one input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1, dilation=1)
        self.conv3 = nn.Conv3d(5, 2, (1, 3, 3), padding=(0, 1, 1), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x.flatten(2)).view(x.shape[0], 4, *x.shape[2:])
        h = self.conv2(torch.relu(h))
        return self.conv3(h.unsqueeze(2)).flatten(1)


class Encoder(nn.Module):
    """Token embeddings into PyTorch's TransformerEncoderLayer, whose self-attention is an nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layer(self.embed(ids))


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: torch.Tensor
    places: dict  # LoraModel arguments that address the layer kind
    row_wise: bool = True
    float64: bool = True  # whether the model runs in float64 (grouped_mm experts do not)

    def noise(self, model: nn.Module) -> float:
        """The model's own rounding noise: float32 against float64, or batched against row by row."""
        if self.float64:
            return float32_noise(model, lambda m, _: self.out(m))
        return batching_noise(model, self.out, len(self.inputs))

    def out(self, model: nn.Module, rows: slice = slice(None)) -> torch.Tensor:
        x = self.inputs[rows]
        if x.is_floating_point():  # float32_noise runs a float64 copy of the model
            x = x.to(next(model.parameters()).dtype)
        result = model(x)
        return result.logits if hasattr(result, "logits") else result


_IDS = torch.tensor([[1, 5, 7, 2, 9, 3], [4, 4, 8, 1, 0, 6], [11, 2, 3, 3, 7, 1]])
CASES = {
    "embedding": Case(lambda: fresh("llama").eval(), _IDS, {"modified_modules": ["embed_tokens"]}),
    "conv": Case(lambda: ConvNet().eval(), torch.randn(3, 3, 4, 6, generator=torch.Generator().manual_seed(1)),
                 {"modified_modules": ["conv1", "conv2", "conv3"]}),
    "attention": Case(lambda: Encoder().train(), _IDS, {"modified_modules": ["layer.self_attn"]}, row_wise=False),
    "experts": Case(lambda: fresh("mixtral").eval(), _IDS,
                    {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}, row_wise=False, float64=False),
}


def lora(case: Case, model: nn.Module, **kwargs) -> LoraModel:
    return LoraModel(model, lora_r=2, lora_alpha=4, **case.places, **kwargs)


@pytest.mark.parametrize("kind", CASES)
def test_fresh_lora_changes_nothing_and_detach_merge_unmerge_are_bit_exact(kind):
    case = CASES[kind]
    model = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bare = case.out(model)
    delta = lora(case, model)
    assert torch.equal(case.out(model), bare)
    randomize_deltas(delta)
    tuned = case.out(model)
    assert not torch.allclose(tuned, bare)
    delta.merge()
    assert_within_noise(case.out(model), tuned, case.noise(model))
    delta.unmerge()
    assert torch.equal(case.out(model), tuned)
    delta.detach()
    assert torch.equal(case.out(model), bare)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(p) is nn.Parameter for p in model.parameters())


@pytest.mark.parametrize("kind", CASES)
def test_gradients_reach_only_the_delta(kind):
    case = CASES[kind]
    model = case.build()
    delta = lora(case, model)
    randomize_deltas(delta)
    delta.freeze_module(exclude=["deltas"])
    case.out(model).square().mean().backward()
    ours = {id(p) for p in delta.delta_parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in ours)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.delta_parameters())


@pytest.mark.parametrize("kind", CASES)
def test_save_and_reload_give_the_same_outputs(kind, tmp_path):
    case = CASES[kind]
    model = case.build()
    delta = lora(case, model)
    randomize_deltas(delta)
    tuned = case.out(model)
    delta.save_finetuned(tmp_path)
    other = case.build()
    AutoDeltaModel.from_finetuned(tmp_path, other)
    assert torch.equal(case.out(other), tuned)


@pytest.mark.parametrize("kind", [k for k, c in CASES.items() if c.row_wise])
def test_mixed_batch_equals_each_row_alone(kind):
    case = CASES[kind]
    model = case.build()
    noise = batching_noise(model, case.out, len(case.inputs)), case.noise(model)
    deltas = [lora(case, model, name=f"task{i}") for i in range(2)]
    for i, d in enumerate(deltas):
        randomize_deltas(d, seed=10 + i)
    rows = [1, -1, 0]
    with torch.no_grad(), mixed_batch(deltas, rows):
        mixed = case.out(model)
    alone = each_row_alone(deltas, rows, lambda i: case.out(model, slice(i, i + 1)))
    assert_within_noise(mixed, alone, *noise)


@pytest.mark.parametrize("kind", [k for k, c in CASES.items() if not c.row_wise])
def test_lora_on_weights_refuses_part_of_a_mixed_batch_but_acts_on_all_of_it(kind):
    case = CASES[kind]
    model = case.build()
    delta = lora(case, model)
    randomize_deltas(delta)
    with torch.no_grad():
        tuned = case.out(model)
    with pytest.raises(MixedBatchError, match="whole"), torch.no_grad(), mixed_batch([delta], [0, -1, 0]):
        case.out(model)
    with torch.no_grad(), mixed_batch([delta], [0, 0, 0]):
        assert torch.equal(case.out(model), tuned)


def test_attention_lora_acts_on_the_fused_fast_path_and_the_slow_path_alike():
    """nn.MultiheadAttention takes its native fused kernel in eval mode without grad, its Python path
    otherwise: both read the LoRA-changed weights."""
    model = Encoder().eval()
    delta = lora(CASES["attention"], model)
    randomize_deltas(delta)
    slow = model(_IDS)  # grad enabled and LoRA factors need grad: the Python path
    with torch.no_grad():
        fast = model(_IDS)
        bare_slow = model.layer.self_attn(*[model.embed(_IDS)] * 3)[0]
        delta.detach()
        fast_bare = model(_IDS)
    assert not torch.allclose(fast, fast_bare)
    assert_within_noise(fast, slow, float32_noise(model, lambda m, _: m(_IDS)))
    assert bare_slow.shape == (3, 6, 16)


def test_attention_lora_changes_in_proj_and_out_proj_as_w_plus_s_b_a():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2, batch_first=True)
    holder = nn.ModuleDict({"attn": attention})
    delta = LoraModel(holder, modified_modules=["attn"], lora_r=2, lora_alpha=4)
    randomize_deltas(delta)
    layer = delta.layers["attn"]
    assert layer.parameter_names == ("in_proj_weight", "out_proj.weight")
    x = torch.randn(2, 5, 16)
    got = attention(x, x, x, need_weights=False)[0]
    delta.detach()
    reference = copy.deepcopy(attention)
    with torch.no_grad():
        reference.in_proj_weight += 2.0 * layer.lora_B["0"] @ layer.lora_A["0"]
        reference.out_proj.weight += 2.0 * layer.lora_B["1"] @ layer.lora_A["1"]
    want = reference(x, x, x, need_weights=False)[0]
    noise = float32_noise(reference, lambda m, _: m(*[x.to(m.in_proj_weight.dtype)] * 3, need_weights=False)[0])
    assert_within_noise(got, want, noise)


def test_a_forward_that_raises_leaves_the_attention_weights_in_place():
    model = Encoder().train()
    delta = lora(CASES["attention"], model)
    randomize_deltas(delta)
    weight = model.layer.self_attn.in_proj_weight
    with pytest.raises(Exception):
        model.layer.self_attn(torch.randn(2, 3, 16), torch.randn(2, 3, 7), torch.randn(2, 3, 16))
    assert model.layer.self_attn._parameters["in_proj_weight"] is weight
    assert type(model.layer.self_attn.out_proj._parameters["weight"]) is nn.Parameter
    delta.detach()
    assert model.layer.self_attn.in_proj_weight is weight


def test_threads_running_one_attention_module_each_get_the_lora_result():
    model = Encoder().train()
    delta = lora(CASES["attention"], model)
    randomize_deltas(delta)
    with torch.no_grad():
        want = model(_IDS)
    results: list[torch.Tensor] = []

    def run() -> None:
        with torch.no_grad():
            for _ in range(5):
                results.append(model(_IDS))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 15 and all(torch.equal(r, want) for r in results)
    assert type(model.layer.self_attn._parameters["in_proj_weight"]) is nn.Parameter


def test_the_experts_role_addresses_mixtrals_fused_experts():
    model = fresh("mixtral")
    delta = LoraModel(model, modified_modules=["experts"], common_structure=True, lora_r=2)
    assert sorted(delta.layers) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    layer = delta.layers["model.layers.0.mlp.experts"]
    assert layer.parameter_names == ("gate_up_proj", "down_proj")
    assert layer.lora_A["0"].shape == (2 * 2, 32)  # r x experts rows, as PEFT lays them out
    assert layer.lora_B["1"].shape == (32, 2 * 2)


def test_target_parameters_on_a_3d_stack_computes_w_plus_s_b_a_per_expert():
    model = fresh("mixtral")
    delta = LoraModel(model, target_parameters=["layers.0.mlp.experts.down_proj"], lora_r=2, lora_alpha=2)
    assert list(delta.layers) == ["model.layers.0.mlp.experts"]
    randomize_deltas(delta)
    experts = model.model.layers[0].mlp.experts
    layer = delta.layers["model.layers.0.mlp.experts"]
    changed = layer.changed_parameters(experts, {"down_proj": experts.down_proj})["down_proj"]
    a, b = layer.lora_A["0"], layer.lora_B["0"]
    for e in range(experts.down_proj.shape[0]):
        want = experts.down_proj[e] + b[:, e::2] @ a[2 * e : 2 * e + 2]
        assert torch.allclose(changed[e], want, atol=1e-6)


# ----------------------------------------------------------------- what is refused


def test_unknown_target_parameter_names_the_close_ones():
    with pytest.raises(NoMatchError, match="gate_up_proj"):
        LoraModel(fresh("mixtral"), target_parameters=["experts.gate_up"])


def test_a_grouped_convolution_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UnsupportedModuleError, match="groups=2"):
        LoraModel(model, modified_modules=["0"], dummy_inputs=torch.randn(1, 4, 5, 5))
    assert not any(True for _ in model[0]._forward_hooks)


@pytest.mark.parametrize("option", [{"use_dora": True}, {"init_lora_weights": "pissa"}])
def test_dora_and_data_aware_inits_are_refused_beyond_linear_layers(option):
    with pytest.raises(UnsupportedModuleError, match="linear layers only"):
        LoraModel(ConvNet(), modified_modules=["conv1"], **option)


def test_dropout_is_refused_where_lora_acts_on_weights_or_token_ids():
    with pytest.raises(UnsupportedModuleError, match="lora_dropout"):
        LoraModel(Encoder(), modified_modules=["embed"], lora_dropout=0.1)
    with pytest.raises(UnsupportedModuleError, match="lora_dropout"):
        LoraModel(Encoder(), modified_modules=["self_attn"], lora_dropout=0.1)


def test_a_module_still_unsupported_names_the_supported_kinds():
    model = nn.ModuleDict({"norm": nn.LayerNorm(4)})
    with pytest.raises(UnsupportedModuleError, match="nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention"):
        LoraModel(model, modified_modules=["norm"])


def test_two_loras_on_one_attention_compose_in_a_fixed_order_whatever_the_attach_order():
    model = Encoder().train()
    first, second = (lora(CASES["attention"], model, name=f"task{i}") for i in range(2))
    randomize_deltas(first, seed=1)
    randomize_deltas(second, seed=2)
    both = model(_IDS)
    first.detach()
    second.detach()
    second.attach()
    first.attach()
    assert torch.equal(model(_IDS), both)


def test_a_deep_copy_with_an_attention_lora_attached_computes_the_same():
    model = Encoder().train()
    delta = lora(CASES["attention"], model)
    randomize_deltas(delta)
    copied = copy.deepcopy(model)
    assert torch.equal(copied(_IDS), model(_IDS))
    delta.detach()
    assert not torch.equal(copied(_IDS), model(_IDS))


# ----------------------------------------------------------------- some projections of a MultiheadAttention


@pytest.mark.parametrize("chosen", [["q"], ["k", "v"], ["q", "out"]])
def test_attention_projections_change_only_their_rows_and_detach_exactly(chosen, tmp_path):
    model = Encoder().train()
    bare = model(_IDS)
    attention = model.layer.self_attn
    weights = {name: attention.get_parameter(name).detach().clone() for name in ("in_proj_weight", "out_proj.weight")}
    delta = lora(CASES["attention"], model, attention_projections=chosen)
    randomize_deltas(delta)
    tuned = model(_IDS)
    assert not torch.allclose(tuned, bare)
    delta.save_finetuned(tmp_path)
    delta.merge()
    third = attention.embed_dim
    for i, projection in enumerate("qkv"):
        rows = slice(i * third, (i + 1) * third)
        changed = not torch.equal(attention.in_proj_weight[rows], weights["in_proj_weight"][rows])
        assert changed == (projection in chosen)
    assert torch.equal(attention.out_proj.weight, weights["out_proj.weight"]) == ("out" not in chosen)
    delta.unmerge()
    assert torch.equal(model(_IDS), tuned)
    delta.detach()
    assert torch.equal(model(_IDS), bare)
    assert all(torch.equal(attention.get_parameter(n), w) for n, w in weights.items())
    other = Encoder().train()
    AutoDeltaModel.from_finetuned(tmp_path, other)
    assert torch.equal(other(_IDS), tuned)


def test_attention_projections_must_name_projections():
    from opendelta.errors import DeltaConfigError

    with pytest.raises(DeltaConfigError, match="attention_projections"):
        LoraModel(Encoder(), modified_modules=["self_attn"], attention_projections=["query"])
