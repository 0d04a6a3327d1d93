"""Port of the original README's "Must Try" (examples/unittest/must_try.py) and of
examples/unittest/test_parallel_adapter.py. Only model loading changed (tiny T5 from a config, 24
layers like t5-large); every opendelta call is the original's. ``transformers.AdamW`` no longer
exists in transformers 5, so the optimizer is torch's AdamW."""

import os
import shutil

import pytest
import torch
import torch.nn as nn
from compat_models import IDS, outputs, seq2seq_inputs, t5, train_a_little

from opendelta import AutoDeltaConfig, AutoDeltaModel
from opendelta.errors import CheckpointNotFoundError


class WrappedModel(nn.Module):
    def __init__(self, inner_model):
        super().__init__()
        self.inner = inner_model

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_the_deltacenter_checkpoint_name_is_a_clear_error():
    with pytest.raises(CheckpointNotFoundError, match="DeltaCenter, which no longer exists"):
        AutoDeltaModel.from_finetuned("thunlp/Spelling_Correction_T5_LRAdapter_demo", backbone_model=t5())


@pytest.mark.skip(reason="needs the defunct DeltaCenter: thunlp/Spelling_Correction_T5_LRAdapter_demo cannot be downloaded")
def test_must_try_spelling_correction_checkpoint_from_the_deltacenter():
    """The README's trained low-rank adapter; the flow below stands in a freshly trained one."""


def test_must_try(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t5_model = t5(layers=24)
    inputs = seq2seq_inputs()
    bare = outputs(t5_model, inputs)
    t5_model.generate(IDS[:1], max_new_tokens=3)

    # in place of the DeltaCenter checkpoint: a low-rank adapter trained here
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": "low_rank_adapter"}), backbone_model=t5_model)
    delta.freeze_module()
    delta.log()
    train_a_little(t5_model, inputs)
    tuned = outputs(t5_model, inputs)
    assert not torch.equal(tuned[0], bare[0])

    delta.save_finetuned(".tmp")
    assert "delta_config.json" in os.listdir(".tmp")

    t5_model = t5(layers=24)
    delta1 = AutoDeltaModel.from_finetuned(".tmp", backbone_model=t5_model)
    shutil.rmtree(".tmp")
    assert all(torch.equal(a, b) for a, b in zip(outputs(t5_model, inputs), tuned))

    delta1.detach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(t5_model, inputs), bare))

    wrapped_model = WrappedModel(WrappedModel(t5_model))
    delta_config = AutoDeltaConfig.from_dict({"delta_type": "lora"})
    delta2 = AutoDeltaModel.from_config(delta_config, backbone_model=wrapped_model)
    delta2.log()
    assert sorted({p.rsplit(".", 1)[-1] for p in delta2.layers}) == ["q", "v"]
    delta2.detach()

    delta_config3 = AutoDeltaConfig.from_dict({"delta_type": "lora", "modified_modules": ["[r]decoder.*((20)|(21)|(22)|(23)).*DenseReluDense\\.wi"], "lora_r": 5})
    delta3 = AutoDeltaModel.from_config(delta_config3, backbone_model=wrapped_model)
    delta3.freeze_module()
    delta3.log()
    assert sorted(delta3.layers) == [f"inner.inner.decoder.block.{i}.layer.2.DenseReluDense.wi" for i in (20, 21, 22, 23)]

    optimizer = torch.optim.AdamW(wrapped_model.parameters(), lr=3e-3)
    from opendelta.utils.inspect import inspect_optimizer_statistics

    stats = inspect_optimizer_statistics(optimizer)
    assert stats["param_group_0"]["trainable_parameters"] == delta3.num_trainable_parameters() == 4 * 5 * (32 + 37)


def test_parallel_adapter_on_a_wrapped_t5():
    """examples/unittest/test_parallel_adapter.py: default positions found inside a user's wrapper."""
    t5_model = t5()
    inputs = seq2seq_inputs()
    bare = outputs(t5_model, inputs)
    wrapped_model = WrappedModel(WrappedModel(t5_model))
    delta_config = AutoDeltaConfig.from_dict({"delta_type": "parallel_adapter"})
    delta2 = AutoDeltaModel.from_config(delta_config, backbone_model=wrapped_model)
    delta2.log()
    assert delta2.layers and all(p.startswith("inner.inner.") for p in delta2.layers)
    delta2.detach()
    delta2.log()
    assert all(torch.equal(a, b) for a, b in zip(outputs(t5_model, inputs), bare))


@pytest.mark.parametrize("delta_type", ["adapter", "compacter", "low_rank_adapter", "prefix", "parallel_adapter"])
def test_default_configs_on_a_wrapper_find_the_inner_models_dummy_inputs(delta_type):
    """Runtime initialisation through a wrapper whose forward takes ``*args, **kwargs``, and through a
    container of two backbones with no usable forward, as the original did."""
    wrapped = WrappedModel(WrappedModel(t5(d_model=64)))
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": delta_type}), backbone_model=wrapped)
    with torch.no_grad():
        wrapped(**seq2seq_inputs())

    class Mymodel(nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a = a
            self.b = b

    two = Mymodel(t5(d_model=64), t5(d_model=64))
    both = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": delta_type}), backbone_model=two)
    assert {p.split(".")[0] for p in both.layers} == {"a", "b"}
    assert len(both.layers) == 2 * len(delta.layers)
