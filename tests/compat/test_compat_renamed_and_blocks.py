"""Two things the original's example configs address as the original meant them: ViT's ``output``
modules of transformers 4 (now ``attention.o_proj`` and the layer itself) and BitFit on whole
blocks (the bias terms inside them, as the original's bitfit.py ``modify_module`` did)."""

import pytest
import torch
import transformers as tf
from compat_models import IDS, bert, outputs

from opendelta import AdapterModel, BitFitModel
from opendelta.leniency import OriginalBehaviourWarning, strict_mode
from opendelta.errors import NoMatchError


def vit():
    torch.manual_seed(0)
    return tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                    image_size=16, patch_size=8)).eval()


def test_vit_output_of_transformers_4_is_the_attention_projection_and_the_layer():
    # transformers 4.40 ViTSelfOutput = dense + dropout; ViTOutput = dense + dropout + residual, returned by ViTLayer
    with pytest.warns(OriginalBehaviourWarning, match="'output' names no module"):
        planned = AdapterModel.plan(vit(), modified_modules=["output"])
    assert planned == [p for i in (0, 1) for p in (f"layers.{i}", f"layers.{i}.attention.o_proj")]
    with strict_mode(), pytest.raises(NoMatchError, match="'output'"):
        AdapterModel.plan(vit(), modified_modules=["output"])


def test_an_adapter_after_a_vit_layer_adds_to_the_layer_output():
    model = vit()
    pixels = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    bare = outputs(model, {"pixel_values": pixels})
    with pytest.warns(OriginalBehaviourWarning):
        delta = AdapterModel(model, modified_modules=["output"])
    assert outputs(model, {"pixel_values": pixels})[0].shape == bare[0].shape
    delta.detach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, {"pixel_values": pixels}), bare))


def test_bitfit_on_a_block_biases_the_linear_layers_and_layer_norms_inside_it():
    model = bert()
    planned = BitFitModel.plan(model, modified_modules=["encoder.layer.0.attention"])
    inside = "encoder.layer.0.attention"
    assert planned == [f"{inside}.self.query", f"{inside}.self.key", f"{inside}.self.value", f"{inside}.output.dense",
                       f"{inside}.output.LayerNorm"]
    bare = outputs(model, {"input_ids": IDS})
    delta = BitFitModel(model, modified_modules=["encoder.layer.0.attention"])
    with torch.no_grad():
        for layer in delta.layers.values():
            layer.bias.fill_(0.5)
    assert not torch.equal(outputs(model, {"input_ids": IDS})[0], bare[0])
    delta.detach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, {"input_ids": IDS}), bare))
