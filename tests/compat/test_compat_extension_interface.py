"""The original's extension interface (docs: "Custom Usage" / the paper's re-routing section): a
method written the original's way (DeltaBase.__init__, add_all_delta_to_backbone, update_module
calling insert_sequential_module / insert_parallel_module / replace_module) attaches, detaches bit
for bit, saves and loads like a built-in one, because each insertion is a layer on the engine's routes."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from compat_models import IDS, bert, outputs, train_a_little

from opendelta import AutoDeltaModel
from opendelta.basemodel import DeltaBase
from opendelta.delta_configs import BaseDeltaConfig
from opendelta.utils.signature import get_arg_names_inside_func


@dataclass
class ScaleConfig(BaseDeltaConfig):
    how: str = "sequential"
    init: float = 1.0


class Scale(nn.Module):
    """post_forward rewrites the output (sequential); forward is the parallel branch."""

    def __init__(self, dim, init):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def post_forward(self, output):
        return output * self.scale

    def forward(self, hidden):
        return hidden * (self.scale - 1)


class ScaledLinear(nn.Module):
    """A replacement for a Linear that uses its weight (held without registering the Linear)."""

    def __init__(self, linear, init):
        super().__init__()
        object.__setattr__(self, "linear", linear)
        self.scale = nn.Parameter(torch.full((linear.out_features,), float(init)))

    def forward(self, x):
        return F.linear(x, self.linear.weight, self.linear.bias) * self.scale


class ScaleModel(DeltaBase):
    delta_type = "compat_scale"
    config_class = ScaleConfig
    default_modified_modules = ["attn@.q@", "attn@.v@"]

    def __init__(self, backbone_model, how="sequential", init=1.0, modified_modules=None, exclude_modules=None,
                 unfrozen_modules=None, common_structure=False, interactive_modify=False, backend="hf"):
        DeltaBase.__init__(self, backbone_model, modified_modules=modified_modules, exclude_modules=exclude_modules,
                           unfrozen_modules=unfrozen_modules, common_structure=common_structure,
                           interactive_modify=interactive_modify, backend=backend)
        arg_names = get_arg_names_inside_func(self.__init__)
        for arg_name in arg_names:
            if not hasattr(self, arg_name):
                setattr(self, arg_name, locals()[arg_name])
        self.delta_modules = nn.ModuleList()
        self.add_all_delta_to_backbone(self.backbone_model, self.modified_modules)

    def update_module(self, module, key):
        parent, child_name, child = self.find_module(module, key)
        if self.how == "replace":
            self.replace_module(parent, child_name, child, ScaledLinear(child, self.init), delta_name="scale")
        elif self.how == "parallel":
            self.insert_parallel_module(child, delta_module=Scale(child.out_features, self.init), delta_name="scale")
        else:
            self.insert_sequential_module(child, delta_module=Scale(child.out_features, self.init), delta_name="scale")


INPUTS = {"input_ids": IDS}


@pytest.mark.parametrize("how", ["sequential", "parallel", "replace"])
def test_a_method_written_the_original_way_attaches_detaches_saves_and_loads(how, tmp_path):
    model = bert()
    bare = outputs(model, INPUTS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    delta = ScaleModel(model, how=how, init=1.5)
    assert sorted(delta.layers) == [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    assert delta.config.how == how and delta.config.init == 1.5
    delta.freeze_module(exclude=["deltas"])
    train_a_little(model, INPUTS)
    tuned = outputs(model, INPUTS)
    assert not torch.equal(tuned[0], bare[0])

    delta.detach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, INPUTS), bare))
    assert list(model.state_dict()) == list(state) and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    delta.attach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, INPUTS), tuned))

    delta.save_finetuned(tmp_path / "ckpt")
    fresh = bert()
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", backbone_model=fresh)
    assert type(loaded) is ScaleModel and loaded.config.how == how
    assert all(torch.equal(a, b) for a, b in zip(outputs(fresh, INPUTS), tuned))


def test_insert_calls_extend_a_built_in_delta_on_any_module():
    """insert_sequential_module on an existing delta adds a layer that leaves with it."""
    from opendelta import LoraModel

    model = bert()
    bare = outputs(model, INPUTS)
    delta = LoraModel(model, modified_modules=["query"])
    dense = model.encoder.layer[1].output.dense
    delta.insert_sequential_module(dense, delta_module=Scale(dense.out_features, 2.0), delta_name="scale")
    assert "encoder.layer.1.output.dense" in delta.layers
    assert not torch.equal(outputs(model, INPUTS)[0], bare[0])
    delta.detach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, INPUTS), bare))
