"""Gradient checkpointing: deltas get the same gradients with checkpointing on and off, re-entrant or not."""

from __future__ import annotations

import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import ViTConfig, ViTModel

from opendelta import LoraModel


class CheckpointedStack(nn.Module):
    """A plain model (no transformers) whose blocks run under torch.utils.checkpoint when asked."""

    def __init__(self, use_reentrant: bool | None = None):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.embed = nn.Embedding(99, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(16, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h) if self.use_reentrant is None else checkpoint(block, h, use_reentrant=self.use_reentrant)
        return self.head(h).sum()


def _delta_grads(model: nn.Module, delta, loss_of) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want) and got
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_plain_model_checkpointing_gives_deltas_the_same_gradients(use_reentrant):
    ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in (None, use_reentrant):
        torch.manual_seed(0)
        model = CheckpointedStack(mode)
        delta = LoraModel(model, modified_modules=["blocks.0.0", "blocks.2.0"])
        delta.freeze_module(exclude=["deltas"])
        randomize_deltas(delta)
        grads[mode] = _delta_grads(model, delta, lambda m: m(ids))
    _assert_same(grads[use_reentrant], grads[None])


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_transformers_checkpointing_gives_deltas_the_same_gradients(use_reentrant):
    batch = tiny_batch()
    grads = {}
    for checkpointing in (False, True):
        model = tiny_bert().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        delta = LoraModel(model, modified_modules=["query", "value"])
        delta.freeze_module(exclude=["deltas"])
        randomize_deltas(delta)
        grads[checkpointing] = _delta_grads(model, delta, lambda m: m(**batch).loss)
    _assert_same(grads[True], grads[False])


def test_reentrant_checkpointing_works_on_a_vision_model_transformers_does_not_patch():
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=37, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ViTModel(config, add_pooling_layer=False).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        delta = LoraModel(model, modified_modules=["q_proj", "v_proj"])
        delta.freeze_module(exclude=["deltas"])
        randomize_deltas(delta)
        grads[checkpointing] = _delta_grads(model, delta, lambda m: m(pixel_values=pixels).last_hidden_state.sum())
    _assert_same(grads[True], grads[False])


def test_detach_removes_the_input_grad_hook():
    model = CheckpointedStack(True)
    hooks_before = dict(model.embed._forward_hooks)
    delta = LoraModel(model, modified_modules=["blocks.0.0"])
    assert len(model.embed._forward_hooks) == len(hooks_before) + 1
    delta.detach()
    assert dict(model.embed._forward_hooks) == hooks_before


def test_attached_deltas_share_one_input_grad_hook_and_the_last_detach_removes_it():
    model = CheckpointedStack(True)
    hooks_before = dict(model.embed._forward_hooks)
    deltas = [LoraModel(model, modified_modules=[f"blocks.{i}.0"]) for i in range(3)]
    assert len(model.embed._forward_hooks) == len(hooks_before) + 1
    shared = dict(model.embed._forward_hooks)
    deltas[1].detach()
    deltas[0].detach()
    assert dict(model.embed._forward_hooks) == shared  # still held by the third delta
    deltas[0].attach()
    assert dict(model.embed._forward_hooks) == shared
    deltas[0].detach()
    deltas[2].detach()
    assert dict(model.embed._forward_hooks) == hooks_before
    deltas[2].attach()
    assert len(model.embed._forward_hooks) == len(hooks_before) + 1
    deltas[2].detach()
    assert dict(model.embed._forward_hooks) == hooks_before


def test_the_hook_follows_new_input_embeddings_on_the_next_attach():
    model = CheckpointedStack(True)
    old = model.embed
    hooks_before = dict(old._forward_hooks)
    delta = LoraModel(model, modified_modules=["blocks.0.0"])
    delta.detach()
    model.embed = nn.Embedding(99, 16)
    delta.attach()
    assert dict(old._forward_hooks) == hooks_before and len(model.embed._forward_hooks) == 1
    delta.detach()
    assert dict(model.embed._forward_hooks) == {}


def test_switch_hands_the_input_grad_hook_over():
    model = CheckpointedStack(True)
    hooks_before = dict(model.embed._forward_hooks)
    first = LoraModel(model, modified_modules=["blocks.0.0"])
    second = LoraModel(model, modified_modules=["blocks.1.0"])
    second.detach()
    hooked = dict(model.embed._forward_hooks)
    first.switch(second)
    assert dict(model.embed._forward_hooks) == hooked
    second.detach()
    assert dict(model.embed._forward_hooks) == hooks_before


def test_embedding_output_needs_no_grad_under_no_grad():
    model = CheckpointedStack()
    LoraModel(model, modified_modules=["blocks.0.0"])
    seen = []
    model.embed.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long))
    assert seen == [False]
