"""No silent no-ops: a delta on a module the backbone's forward never calls is refused, naming it and why.

``nn.MultiheadAttention`` hands ``out_proj.weight`` to ``F.multi_head_attention_forward`` and never
calls ``out_proj``, so a delta living in that module's call would do nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opendelta import (
    AdapterModel,
    BitFitModel,
    DeltaBase,
    IA3Model,
    LoraModel,
    ParallelAdapterModel,
    UnreachedModuleError,
    UnsupportedModuleError,
)

WIDTH = 16
CALL_METHODS = [LoraModel, IA3Model, BitFitModel]


class TokenAttention(nn.Module):
    """Tokens -> embedding -> nn.MultiheadAttention -> head; takes input_ids, so a dummy input is synthesised."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, WIDTH)
        self.mha = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.head(self.mha(h, h, h, need_weights=False)[0])


class PlainAttention(nn.Module):
    """The same without a token interface: no dummy input can be guessed for it."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x, need_weights=False)[0])


class Conditional(nn.Module):
    """`rare` runs only for inputs with a large sum; the dummy input (zeros) never takes that branch."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(WIDTH, WIDTH)
        self.rare = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if x.sum() > 100:
            h = self.rare(h)
        return self.head(h)


def fresh(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def tokens() -> torch.Tensor:
    return torch.tensor([[1, 2, 3, 4, 5]])


def state(model: nn.Module) -> dict:
    """Everything a failed construction must leave as it was."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "modules": [(p, type(m)) for p, m in model.named_modules()],
        "hooks": [(p, len(m._forward_hooks), len(m._forward_pre_hooks)) for p, m in model.named_modules()],
        "forwards": [(p, "forward" in m.__dict__) for p, m in model.named_modules()],
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert {k: after[k] for k in after if k != "tensors"} == {k: before[k] for k in before if k != "tensors"}


@pytest.mark.parametrize("method", CALL_METHODS, ids=lambda c: c.__name__)
def test_out_proj_of_multihead_attention_is_refused_at_construction_and_the_model_is_unchanged(method):
    model = fresh(TokenAttention)
    reference, before = model(tokens()), state(model)
    with pytest.raises(UnsupportedModuleError) as info:
        method(model, modified_modules=["mha.out_proj"])
    message = str(info.value)
    assert isinstance(info.value, UnreachedModuleError)
    assert "'mha.out_proj'" in message and "reads its weights directly" in message and "'mha'" in message
    assert_same_state(model, before)
    assert torch.equal(model(tokens()), reference)


@pytest.mark.parametrize("method", CALL_METHODS, ids=lambda c: c.__name__)
def test_out_proj_is_refused_with_user_dummy_inputs_on_a_plain_module(method):
    model = fresh(PlainAttention)
    before = state(model)
    with pytest.raises(UnreachedModuleError, match=r"'mha\.out_proj'.*reads its weights directly"):
        method(model, modified_modules=["mha.out_proj"], dummy_inputs=(torch.zeros(1, 3, WIDTH),))
    assert_same_state(model, before)


@pytest.mark.parametrize("method", CALL_METHODS, ids=lambda c: c.__name__)
def test_from_config_refuses_out_proj_too(method):
    model = fresh(TokenAttention)
    before = state(model)
    with pytest.raises(UnreachedModuleError, match=r"'mha\.out_proj'"):
        method.from_config({"modified_modules": ["mha.out_proj"]}, model)
    assert_same_state(model, before)


def test_every_unreached_module_is_named_in_one_error():
    model = fresh(Conditional)
    model.mha = nn.MultiheadAttention(WIDTH, 2, batch_first=True)  # never called at all
    with pytest.raises(UnreachedModuleError) as info:
        LoraModel(model, modified_modules=["body", "rare", "mha.out_proj"], dummy_inputs=(torch.zeros(1, WIDTH),))
    message = str(info.value)
    assert "2 addressed module(s)" in message
    assert "'rare'" in message and "'mha.out_proj'" in message and "'body'" not in message


@pytest.mark.parametrize("method", CALL_METHODS, ids=lambda c: c.__name__)
def test_a_module_called_only_conditionally_is_refused_unless_the_dummy_input_reaches_it(method):
    model = fresh(Conditional)
    before = state(model)
    with pytest.raises(UnreachedModuleError, match=r"'rare'.*runs only on some inputs"):
        method(model, modified_modules=["rare"], dummy_inputs=(torch.zeros(1, WIDTH),))
    assert_same_state(model, before)
    delta = method(model, modified_modules=["rare"], dummy_inputs=(torch.full((1, WIDTH), 10.0),))
    assert list(delta.layers) == ["rare"]
    delta.detach()
    assert_same_state(model, before)


def test_a_span_whose_start_is_never_called_is_refused():
    model = fresh(Conditional)
    with pytest.raises(UnreachedModuleError, match=r"'rare'"):
        ParallelAdapterModel(model, modified_modules=["rare->head"], bottleneck_dim=4, dummy_inputs=(torch.zeros(1, WIDTH),))


def test_runtime_init_methods_name_the_module_the_same_way():
    model = fresh(TokenAttention)
    before = state(model)
    with pytest.raises(UnreachedModuleError, match=r"'mha\.out_proj'.*reads its weights directly"):
        AdapterModel(model, modified_modules=["mha.out_proj"], bottleneck_dim=4)
    assert_same_state(model, before)


@pytest.mark.parametrize("method", CALL_METHODS, ids=lambda c: c.__name__)
def test_the_called_neighbours_still_work_and_train(method):
    model = fresh(TokenAttention)
    reference = model(tokens())
    delta = method(model, modified_modules=["head"])
    for p in delta.delta_parameters():
        nn.init.normal_(p)
    out = model(tokens())
    assert not torch.equal(out, reference)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.delta_parameters())
    delta.detach()
    assert torch.equal(model(tokens()), reference)


def test_an_adapter_on_the_attention_module_itself_is_accepted():
    model = fresh(TokenAttention)
    delta = AdapterModel(model, modified_modules=["mha"], bottleneck_dim=4)
    assert list(delta.layers) == ["mha"]


# ---------------------------------------------------------------- no dummy input: checked at the first forward


@pytest.mark.parametrize("method", CALL_METHODS, ids=lambda c: c.__name__)
def test_without_a_dummy_input_the_first_forward_raises_before_its_output_is_used(method):
    model = fresh(PlainAttention)
    x = torch.randn(2, 3, WIDTH)
    reference, before = model(x), state(model)
    delta = method(model, modified_modules=["mha.out_proj"])  # no input can be guessed: checked on first use
    for _ in range(2):  # every forward raises until the delta is detached
        with pytest.raises(UnreachedModuleError, match=r"first forward.*'mha\.out_proj'"):
            model(x)
    delta.detach()
    assert_same_state(model, before)
    assert torch.equal(model(x), reference)


def test_without_a_dummy_input_a_reached_module_passes_the_check_and_its_hooks_go():
    model = fresh(PlainAttention)
    x = torch.randn(2, 3, WIDTH)
    plain_hooks = state(model)["hooks"]
    delta = LoraModel(model, modified_modules=["head"])
    nn.init.normal_(delta.layers["head"].lora_B)
    tuned = model(x)
    hooks_after_check = state(model)["hooks"]
    delta.detach()
    assert state(model)["hooks"] == plain_hooks
    delta.attach()
    assert state(model)["hooks"] == hooks_after_check  # the passed check is not installed again
    assert torch.equal(model(x), tuned)


def test_from_finetuned_refuses_a_checkpoint_on_an_unreached_module(tmp_path):
    model = fresh(PlainAttention)
    delta = LoraModel(model, modified_modules=["mha.out_proj"])  # accepted until the first forward
    delta.save_finetuned(tmp_path / "ckpt")
    delta.detach()
    before = state(model)
    with pytest.raises(UnreachedModuleError, match=r"'mha\.out_proj'"):
        DeltaBase.from_finetuned(tmp_path / "ckpt", model, dummy_inputs=(torch.zeros(1, 3, WIDTH),))
    assert_same_state(model, before)


# ---------------------------------------------------------------- cost: one pass, on the meta device for a skeleton


@pytest.mark.parametrize("method", [LoraModel, IA3Model, BitFitModel, AdapterModel], ids=lambda c: c.__name__)
def test_construction_runs_the_backbone_once(method):
    model = fresh(TokenAttention)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    method(model, modified_modules=["head"])
    handle.remove()
    assert len(calls) == 1  # the runtime-init pass is the reach check: one pass, not two


def test_the_check_runs_on_a_meta_skeleton():
    with torch.device("meta"):
        model = TokenAttention()
    assert LoraModel(model, modified_modules=["head"]).layers["head"].lora_A.is_meta
    with pytest.raises(UnreachedModuleError, match=r"'mha\.out_proj'.*reads its weights directly"):
        LoraModel(model, modified_modules=["mha.out_proj"])
