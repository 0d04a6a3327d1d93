"""The original OpenDelta's common-structure names with a layer index (``block@.0.attn@.q@``, its
tail ``0.attn@.q@``, ``decoder@.block@.1.attn@.q@``): the original kept a layer's index in the
key it matched against (utils/structure_mapping.py, ``transform``: ``$`` copies the original
element), so such a name addresses that layer of every stack, on every family we map."""

import pytest
from support.families import FAMILIES, fresh

from opendelta import LoraModel
from opendelta.errors import StructureError
from opendelta.targets import resolve


def paths(model, names):
    return [t.path for t in resolve(model, names)]


@pytest.mark.parametrize("key", [f.key for f in FAMILIES])
def test_an_indexed_name_addresses_that_layer_of_every_stack(key):
    model = fresh(key)
    layers = paths(model, ["block@.0"])
    first = paths(model, ["block@.0.attn@.q@"])
    assert layers and all(layer.rpartition(".")[2] == "0" for layer in layers)
    assert first and all(any(p.startswith(layer + ".") for layer in layers) for p in first)
    assert set(first) <= set(paths(model, ["attn@.q@"]))
    assert paths(model, ["0.attn@.q@"]) == first


def test_a_stack_and_layer_index_name_one_module_of_t5():
    model = fresh("t5")
    delta = LoraModel(model, modified_modules=["decoder@.block@.1.attn@.q@", "encoder@.block@.0.ff@.w2@"])
    assert sorted(delta.layers) == ["decoder.block.1.layer.0.SelfAttention.q", "encoder.block.0.layer.1.DenseReluDense.wo"]


def test_a_layer_the_model_does_not_have_is_a_structure_error():
    with pytest.raises(StructureError, match="layer 7"):
        LoraModel.plan(fresh("bert"), modified_modules=["block@.7.attn@.q@"])
