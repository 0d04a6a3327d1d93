"""Runtime initialisation: hidden-state shapes from one dummy forward, on real and meta devices."""

from __future__ import annotations

import pytest
import torch

from opendelta import RuntimeInitError
from opendelta.runtime_init import observe

from conftest import FACTORIES, PlainNet

PROBES = {
    "bert": ("encoder.layer.0.attention.output.dense", 32),
    "gpt2": ("transformer.h.0.mlp.c_proj", 32),
    "t5": ("decoder.block.1.layer.0.SelfAttention.o", 32),
    "llama": ("model.layers.1.mlp.down_proj", 32),
}


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_observes_hidden_sizes_from_a_synthesised_input(kind):
    model = FACTORIES[kind]()
    path, size = PROBES[kind]
    obs = observe(model, [path])[path]
    assert obs.output_shape[-1] == size and obs.dtype == torch.float32 and obs.device.type == "cpu"


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_runs_on_the_meta_device(kind):
    from transformers import AutoModel

    real = FACTORIES[kind]()
    with torch.device("meta"):
        skeleton = type(real)(real.config)
    path, size = PROBES[kind]
    obs = observe(skeleton, [path])[path]
    assert obs.output_shape[-1] == size and obs.device.type == "meta"
    del AutoModel


def test_dtype_follows_the_backbone():
    model = FACTORIES["llama"]().to(torch.bfloat16)
    obs = observe(model, ["model.layers.0.self_attn.o_proj"])["model.layers.0.self_attn.o_proj"]
    assert obs.dtype == torch.bfloat16


def test_user_dummy_inputs_win():
    model = PlainNet()
    obs = observe(model, ["encoder.2"], dummy_inputs=(torch.zeros(5, 8),))["encoder.2"]
    assert obs.input_shape == (5, 16) and obs.output_shape == (5, 16)


def test_a_module_with_no_guessable_input_asks_for_dummy_inputs():
    with pytest.raises(RuntimeInitError, match="dummy_inputs"):
        observe(PlainNet(), ["encoder.2"])


def test_a_failing_dummy_pass_is_a_typed_error_and_removes_its_hooks():
    model = PlainNet()
    with pytest.raises(RuntimeInitError, match="failed"):
        observe(model, ["encoder.2"], dummy_inputs=(torch.zeros(5, 3),))
    assert all(not m._forward_hooks for m in model.modules())


class _NormNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(8)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


def test_the_dummy_pass_changes_neither_the_model_nor_the_random_stream():
    net = _NormNet().train()
    net.drop.eval()  # a mixed train/eval state must come back as it was
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 8)
    rng = torch.get_rng_state()
    seen = observe(net, ["fc"], x)
    assert seen["fc"].input_shape[-1] == 8
    assert torch.equal(torch.get_rng_state(), rng)  # so a delta's initial values do not depend on dropout
    assert all(torch.equal(net.state_dict()[k], v) for k, v in buffers.items())  # BatchNorm statistics untouched
    assert net.training and net.norm.training and not net.drop.training
