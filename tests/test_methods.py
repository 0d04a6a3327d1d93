"""Each module-level method's own promises: default positions, formulas, dtypes, gradient
checkpointing, several methods on one backbone, and errors for modules a method cannot act on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.methods import METHODS
from support.families import MATRIX as FAMILIES, fresh, fresh_base, hidden
from torch import nn

from opendelta import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    CompacterModel,
    DeltaConfigError,
    IA3Model,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    PatternError,
    UnsupportedModuleError,
)
from opendelta.checkpoint import read_checkpoint
from opendelta.methods.compacter import PHMLinear
from opendelta.methods.ia3 import IA3InputLayer, IA3Layer

#: the module-level methods (not the sequence-level ones, nor those outside the method matrix) with the method table's tiny arguments (hidden
#: size 32: Compacter's default bottleneck, 32 // 16 = 2, is not a multiple of n = 4); default positions
DEFAULT_ARGS = {m.model_class: m.tiny for m in METHODS.values() if not m.whole_batch and m.matrix}
METHOD_IDS = [cls.__name__ for cls in DEFAULT_ARGS]
TRANSFORMER_FAMILIES = [name for name, family in FAMILIES.items() if not family.plain]


def perturb(delta, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator).to(p.dtype))


def tails(paths) -> set[str]:
    return {".".join(p.split(".")[-2:]) for p in paths}


# ------------------------------------------------------------------ default positions


@pytest.mark.parametrize("cls", DEFAULT_ARGS, ids=METHOD_IDS)
@pytest.mark.parametrize("name", TRANSFORMER_FAMILIES)
def test_default_positions_attach_exactly_and_detach_exactly(cls, name: str) -> None:
    family = FAMILIES[name]
    model = fresh(name)
    original = hidden(model, family)
    delta = cls(model, **DEFAULT_ARGS[cls])
    assert torch.equal(hidden(model, family), original)
    perturb(delta)
    assert not torch.equal(hidden(model, family), original)
    delta.detach()
    assert torch.equal(hidden(model, family), original)


def test_adapter_defaults_to_the_attention_output_and_ffn_down_projections_of_bert() -> None:
    assert tails(AdapterModel.plan(fresh("bert"))) == {"output.dense"}
    assert len(AdapterModel.plan(fresh("bert"))) == 4  # attention.output.dense and output.dense, two layers


def test_bitfit_defaults_cover_projections_and_norms_including_bias_free_llama_ones() -> None:
    paths = BitFitModel.plan(fresh_base("llama"))
    assert tails(paths) >= {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj", "0.input_layernorm",
                            "0.post_attention_layernorm"}
    assert "norm" in paths


def test_parallel_adapter_defaults_to_the_attention_and_ffn_blocks() -> None:
    assert tails(ParallelAdapterModel.plan(fresh("llama"))) == {"0.self_attn", "0.mlp", "1.self_attn", "1.mlp"}


def test_parallel_adapter_on_bert_spans_the_ffn_from_its_up_to_its_down_projection() -> None:
    assert ParallelAdapterModel.plan(fresh("bert")) == [
        "encoder.layer.0.attention", "encoder.layer.0.intermediate.dense->encoder.layer.0.output.dense",
        "encoder.layer.1.attention", "encoder.layer.1.intermediate.dense->encoder.layer.1.output.dense",
    ]


def test_ia3_scales_key_and_value_outputs_and_the_ffn_down_projection_input() -> None:
    model = fresh_base("llama")
    delta = IA3Model(model)
    kinds = {path.split(".")[-1]: type(layer) for path, layer in delta.layers.items()}
    assert kinds == {"k_proj": IA3Layer, "v_proj": IA3Layer, "down_proj": IA3InputLayer}
    assert delta.layers["layers.0.mlp.down_proj"].scale.shape == (model.config.intermediate_size,)


# ------------------------------------------------------------------ formulas


def test_ia3_on_t5_scales_self_and_cross_attention_keys_and_values() -> None:
    paths = IA3Model.plan(fresh("t5"))
    assert {p.split(".")[-1] for p in paths} == {"k", "v", "wo"}
    assert any("EncDecAttention.k" in p for p in paths) and any("SelfAttention.v" in p for p in paths)


def test_adapter_adds_its_bottleneck_to_the_module_output() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(3, 8)
    delta = AdapterModel(model, modified_modules=["0"], bottleneck_dim=4, dummy_inputs=(x,))
    perturb(delta)
    layer, h = delta.layers["0"], F.linear(x, model[0].weight, model[0].bias)
    expected = h + layer.up(F.gelu(layer.down(h), approximate="tanh"))
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_compacter_weight_is_the_sum_of_kronecker_products_of_rules_and_blocks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    delta = CompacterModel(model, modified_modules=["0"], reduction_factor=2, dummy_inputs=(torch.randn(2, 16),))
    perturb(delta)
    down: PHMLinear = delta.layers["0"].down
    blocks = down.W_left @ down.W_right
    expected = sum(torch.kron(down.phm_rule[i], blocks[i]) for i in range(4))
    assert down.weight().shape == (16, 8)
    assert torch.allclose(down.weight(), expected, atol=1e-7)


def test_compacter_without_learn_phm_keeps_the_rule_fixed() -> None:
    model = fresh("bert")
    delta = CompacterModel(model, reduction_factor=4, learn_phm=False)
    delta.freeze_module()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and not any("phm_rule" in n for n in names)
    assert "down.phm_rule" in delta.layers["encoder.layer.0.attention.output.dense"].state_dict()


def test_compacter_unfactorized_phm_has_full_blocks() -> None:
    delta = CompacterModel(fresh("bert"), reduction_factor=4, factorized_phm=False, phm_rank=3)
    up = delta.layers["encoder.layer.0.attention.output.dense"].up
    assert up.W.shape == (4, 2, 8) and torch.count_nonzero(up.W) == 0


def test_low_rank_adapter_with_rank_three_computes_h_left_right_plus_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    delta = LowRankAdapterModel(model, modified_modules=["0"], reduction_factor=4, low_rank_rank=3,
                                dummy_inputs=(torch.randn(2, 16),))
    perturb(delta)
    down = delta.layers["0"].down
    assert down.W_left.shape == (16, 3) and down.W_right.shape == (3, 4)
    h = torch.randn(2, 5, 16)
    assert torch.allclose(down(h), h @ down.W_left @ down.W_right + down.bias, atol=1e-6)


def test_parallel_adapter_output_change_scales_with_scaled() -> None:
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    changes = []
    for scaled in (1.0, 3.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8))
        base = model(x)
        delta = ParallelAdapterModel(model, modified_modules=["0"], bottleneck_dim=4, scaled=scaled, dummy_inputs=(x,))
        perturb(delta)
        changes.append(model(x) - base)
    assert torch.allclose(changes[1], 3 * changes[0], atol=1e-6)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_ia3_folded_into_the_weight_reproduces_the_scaled_module(feedforward: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    delta = IA3Model(model, modified_modules=["0"], feedforward_modules=["0"] if feedforward else None)
    perturb(delta)
    x = torch.randn(4, 6)
    folded = delta.layers["0"].scaled_weight(model[0].weight)
    assert torch.allclose(model(x), x @ folded.T, atol=1e-6)


def test_ia3_feedforward_modules_outside_the_modified_ones_are_an_error() -> None:
    with pytest.raises(PatternError, match="feedforward_modules"):
        IA3Model(fresh("bert"), modified_modules=["key"], feedforward_modules=["value"])


def test_bitfit_leaves_an_existing_bias_frozen_and_untouched() -> None:
    model = fresh("bert")
    original = model.encoder.layer[0].attention.self.query.bias.clone()
    delta = BitFitModel(model)
    delta.freeze_module()
    perturb(delta)
    hidden(model, FAMILIES["bert"]).sum().backward()
    query = model.encoder.layer[0].attention.self.query
    assert not query.bias.requires_grad and torch.equal(query.bias, original)


def test_bitfit_adds_a_bias_after_a_parameter_free_layer_norm() -> None:
    model = nn.Sequential(nn.LayerNorm(6, elementwise_affine=False))
    x = torch.randn(2, 6)
    delta = BitFitModel(model, modified_modules=["0"])
    perturb(delta)
    assert torch.allclose(model(x), F.layer_norm(x, (6,)) + delta.layers["0"].bias, atol=1e-6)


def test_bitfit_checkpoint_holds_only_the_bias_deltas(tmp_path) -> None:
    model = fresh("llama")
    delta = BitFitModel(model)
    delta.save_finetuned(tmp_path)
    tensors = read_checkpoint(tmp_path).tensors
    assert len(tensors) == len(delta.layers)
    assert all(k.startswith("delta.") and k.endswith(".bias") and v.dim() == 1 for k, v in tensors.items())


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "cls,bad",
    [
        (AdapterModel, {"bottleneck_dim": 0}),
        (AdapterModel, {"non_linearity": "gelu_old"}),
        (CompacterModel, {"phm_c_init": "zeros"}),
        (CompacterModel, {"hypercomplex_division": 0}),
        (CompacterModel, {"hypercomplex_nonlinearity": "he"}),
        (LowRankAdapterModel, {"low_rank_rank": 0}),
        (LowRankAdapterModel, {"low_rank_w_init": "kaiming"}),
        (ParallelAdapterModel, {"scaled": "big"}),
        (IA3Model, {"feedforward_modules": "fc2"}),
    ],
)
def test_bad_arguments_raise_a_config_error_naming_them(cls, bad: dict) -> None:
    with pytest.raises(DeltaConfigError, match=next(iter(bad))):
        cls(fresh("bert"), **bad)


@pytest.mark.parametrize("delta_type", ["adapter", "bitfit", "compacter", "low_rank_adapter", "parallel_adapter", "ia3"])
def test_auto_delta_builds_each_method_by_its_delta_type(delta_type: str) -> None:
    args = {"reduction_factor": 4} if delta_type == "compacter" else {}
    config = AutoDeltaConfig.from_dict({"delta_type": delta_type, "modified_modules": ["attention.output.dense"], **args})
    delta = AutoDeltaModel.from_config(config, fresh("bert"))
    assert delta.delta_type == delta_type and len(delta.layers) == 2


# ------------------------------------------------------------------ unsupported modules


class ArgmaxHead(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.argmax(-1)


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.head = ArgmaxHead()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(h))


UNSUPPORTED = [
    pytest.param(BitFitModel, "bert", ["embeddings.dropout"], {}, "Dropout", id="bitfit-nothing-to-bias"),
    pytest.param(IA3Model, "bert", ["embeddings.LayerNorm"], {}, "linear layer", id="ia3-norm"),
    pytest.param(IA3Model, "bert", ["embeddings.word_embeddings"], {"feedforward_modules": ["word_embeddings"]},
                 "token ids", id="ia3-embedding-input"),
    pytest.param(CompacterModel, "bert", ["encoder.layer.0.attention.output.dense"], {}, "hypercomplex_division",
                 id="compacter-indivisible"),
    pytest.param(LowRankAdapterModel, "bert", ["encoder.layer.0.attention.output.dense"], {"reduction_factor": 64},
                 "reduction_factor", id="low-rank-no-bottleneck"),
    pytest.param(ParallelAdapterModel, "bert", ["embeddings.word_embeddings"], {}, "floating-point tensor input",
                 id="parallel-token-ids"),
    pytest.param(AdapterModel, "tagger", ["head"], {"dummy_inputs": (torch.zeros(1, 3, 32),)},
                 "floating-point tensor output", id="adapter-integer-output"),
    pytest.param(AdapterModel, "plain", ["blocks"], {"dummy_inputs": (torch.zeros(1, 3, 32),)}, "nn.Sequential",
                 id="adapter-sequential"),
]


@pytest.mark.parametrize("cls,name,modules,args,needs", UNSUPPORTED)
def test_a_module_the_method_cannot_act_on_raises_naming_it_and_leaves_the_model_alone(
    cls, name: str, modules: list[str], args: dict, needs: str
) -> None:
    model = Tagger() if name == "tagger" else fresh(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=needs) as info:
        cls(model, modified_modules=modules, **args)
    assert modules[0] in str(info.value)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cls", DEFAULT_ARGS, ids=METHOD_IDS)
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_delta_parameters_follow_the_backbone_dtype_and_forward_runs(cls, name: str, dtype: torch.dtype) -> None:
    model = fresh(name, dtype)
    delta = cls(model, **DEFAULT_ARGS[cls])
    perturb(delta)
    assert {p.dtype for p in delta.delta_parameters()} == {dtype}
    out = hidden(model, FAMILIES[name])
    assert out.dtype == dtype and torch.isfinite(out).all()


# ------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("cls", DEFAULT_ARGS, ids=METHOD_IDS)
@pytest.mark.parametrize("name", ["bert", "llama", "vit"])
def test_gradient_checkpointing_gives_the_same_delta_gradients(cls, name: str, reentrant: bool) -> None:
    grads = []
    for checkpointing in (False, True):
        model = fresh(name).train()
        for module in model.modules():  # identical forward passes with and without recomputation
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        torch.manual_seed(0)
        delta = cls(model, **DEFAULT_ARGS[cls])
        perturb(delta)
        delta.freeze_module()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        hidden(model, FAMILIES[name]).pow(2).sum().backward()
        grads.append([p.grad for p in delta.delta_parameters()])
    assert all(g is not None for g in grads[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], grads[1]))


# ------------------------------------------------------------------ several methods on one backbone

STACK = [
    (LoraModel, {}),
    (BitFitModel, {}),
    (AdapterModel, {}),
    (IA3Model, {}),
    (ParallelAdapterModel, {}),
]


@pytest.mark.parametrize("removed", range(len(STACK)), ids=[cls.__name__ for cls, _ in STACK])
def test_each_of_several_methods_on_one_backbone_detaches_alone(removed: int, tmp_path) -> None:
    family = FAMILIES["bert"]
    model = fresh("bert")
    deltas = []
    for i, (cls, args) in enumerate(STACK):
        delta = cls(model, **args)
        perturb(delta, seed=i)
        deltas.append(delta)
    deltas[removed].detach()
    out = hidden(model, family)
    # the same backbone with only the others, loaded from their checkpoints in the same order
    reference = fresh("bert")
    for i, delta in enumerate(deltas):
        if i != removed:
            delta.save_finetuned(tmp_path / str(i))
            type(delta).from_finetuned(tmp_path / str(i), reference)
    assert torch.equal(out, hidden(reference, family))
    for i, delta in enumerate(deltas):
        if i != removed:
            delta.detach()
    assert torch.equal(hidden(model, family), hidden(fresh("bert"), family))
