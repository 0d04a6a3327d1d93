"""The runnable snippets of the original's docs/source/notes/*.md, one test per note. Only model
loading changed (tiny models from configs); two typos of the notes themselves (``Visualizaiton``
in autodelta.md, ``intermdiate`` in inspect.md) fail in the original too and are written correctly."""

import torch
import torch.nn as nn
import transformers as tf
from compat_models import IDS, bart_classifier, bert_masked_lm, outputs, roberta_classifier, t5, train_a_little

from bigmodelvis import Visualization


def test_quickstart_adapter_on_a_classifier(tmp_path):
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=2, intermediate_size=37, num_labels=2))
    from opendelta import AdapterModel

    delta_model = AdapterModel(model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(input_ids=IDS).logits, torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    delta_model.save_finetuned(str(tmp_path / "finetuned_bert"))
    assert {n.split(".")[0] for n in delta_model.trainable_parameters_names()} == {"bert", "classifier"}


def test_autodelta_config_dict():
    from opendelta import AutoDeltaConfig, AutoDeltaModel

    backbone_model = t5()
    config_dict = {"delta_type": "lora", "modified_modules": ["SelfAttention.q", "SelfAttention.v", "SelfAttention.o"], "lora_r": 4}
    delta_config = AutoDeltaConfig.from_dict(config_dict)
    delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=backbone_model)
    Visualization(backbone_model).structure_graph()
    assert len(delta_model.layers) == 3 * 4  # encoder and decoder, 2 layers each


def test_namebasedaddr_custom_network():
    class MyNet1(nn.Module):
        def __init__(self,):
            super().__init__()
            self.name_a = nn.Linear(5, 5)

        def forward(self, hiddens):
            return self.name_a(hiddens)

    class MyNet2(nn.Module):
        def __init__(self,):
            super().__init__()
            self.embedding = nn.Embedding(10, 5)
            self.name_b = nn.Sequential(MyNet1(), MyNet1())

        def forward(self, input_ids):
            hiddens = self.embedding(input_ids)
            return self.name_b(hiddens)

    root = MyNet2()
    print(root.name_b[0].name_a)
    Visualization(root).structure_graph()
    from opendelta import AdapterModel

    delta = AdapterModel(backbone_model=root, modified_modules=['name_b.0.name_a'])
    Visualization(root).structure_graph()
    assert list(delta.layers) == ["name_b.0.name_a"]


def test_pluginunplug():
    model = bart_classifier()
    inputs = {"input_ids": torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 2]])}  # BART classifies at </s> (2)
    bare = outputs(model, inputs)
    from opendelta import LoraModel

    delta_model = LoraModel(backbone_model=model, modified_modules=['fc2'])
    delta_model.log()
    delta_model.freeze_module()
    train_a_little(model, inputs)
    with_lora = outputs(model, inputs)
    delta_model.detach()
    delta_model.log()
    assert torch.equal(outputs(model, inputs)[0], bare[0])
    delta_model.attach()
    delta_model.log()
    from opendelta import AdapterModel

    delta_model2 = AdapterModel(backbone_model=model, modified_modules=['fc1'])
    delta_model2.log()
    delta_model.detach()
    delta_model.log()
    delta_model2.detach()
    delta_model.attach()
    delta_model.log()
    assert torch.equal(outputs(model, inputs)[0], with_lora[0])


def test_composition():
    model = roberta_classifier()
    from opendelta import AdapterModel, LoraModel, LowRankAdapterModel

    delta_model = LoraModel(backbone_model=model, modified_modules=['key'], lora_r=1)
    delta_model2 = AdapterModel(backbone_model=model, modified_modules=['output'], bottleneck_dim=12)
    delta_model.log()
    model = bart_classifier()
    delta_model = AdapterModel(backbone_model=model, modified_modules=['fc2'])
    delta_model2 = AdapterModel(backbone_model=model, modified_modules=['fc2'], bottleneck_dim=12)
    delta_model3 = LowRankAdapterModel(backbone_model=model, modified_modules=['fc2'], reduction_factor=12)
    delta_model.log()
    assert delta_model2.name != delta_model.name and set(delta_model3.layers) == set(delta_model.layers)


def test_inspect():
    backbone_model = bert_masked_lm()
    print(backbone_model)
    model_vis = Visualization(backbone_model)
    model_vis.structure_graph()
    print(backbone_model.bert.encoder.layer[0].intermediate)
    from opendelta import LowRankAdapterModel

    delta_model = LowRankAdapterModel(backbone_model)
    delta_model.freeze_module(exclude=["cls", "intermediate", "LayerNorm"])
    Visualization(backbone_model).structure_graph()
    Visualization(backbone_model).structure_graph(keep_non_params=True)
    assert any(n.startswith("cls.") for n in delta_model.trainable_parameters_names())
