"""The registry is strict: a delta_type names one pair of classes, taken over only on request."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from support.families import fresh

from opendelta import AutoDeltaModel, DeltaBase, DeltaConfig, DuplicateDeltaTypeError, LoraConfig, LoraModel
from opendelta.errors import DeltaConfigError
from opendelta.registry import known_delta_types, lookup, register, unregister
from opendelta.runtime_init import synthesize_inputs


@pytest.fixture
def lora_restored():
    """Whatever a test does to 'lora', LoraModel serves it again afterwards."""
    yield
    register("lora", LoraConfig, LoraModel, replace=True)


def test_a_subclass_declaring_a_taken_delta_type_is_refused_naming_both_classes_and_the_override():
    with pytest.raises(DuplicateDeltaTypeError, match=r"'lora'.*LoraModel.*MyLora.*replace=True"):

        class MyLora(LoraModel):
            delta_type = "lora"

    assert lookup("lora") == (LoraConfig, LoraModel)


def test_registering_other_classes_under_a_taken_delta_type_is_refused():
    class OtherLora(LoraModel):
        pass

    with pytest.raises(DuplicateDeltaTypeError, match=r"'lora'.*LoraModel.*OtherLora.*replace=True"):
        AutoDeltaModel.register("lora", LoraConfig, OtherLora)
    assert lookup("lora") == (LoraConfig, LoraModel)


def test_replace_true_on_the_class_takes_the_delta_type_over(lora_restored, tmp_path):
    class MyLora(LoraModel, replace=True):
        delta_type = "lora"

    assert lookup("lora") == (LoraConfig, MyLora)
    model = fresh("BERT")
    delta = LoraModel(model, modified_modules=["query"])
    delta.save_finetuned(tmp_path / "native")
    delta.save_finetuned(tmp_path / "peft", format="peft")
    assert type(AutoDeltaModel.from_finetuned(tmp_path / "native", fresh("BERT"))) is MyLora
    assert type(AutoDeltaModel.from_finetuned(tmp_path / "peft", fresh("BERT"))) is MyLora  # PEFT asks the registry too


def test_replace_true_on_register_takes_the_delta_type_over(lora_restored):
    class MyLora(LoraModel):
        pass

    AutoDeltaModel.register("lora", LoraConfig, MyLora, replace=True)
    assert lookup("lora") == (LoraConfig, MyLora)


def test_replace_true_without_a_delta_type_is_an_error():
    with pytest.raises(DeltaConfigError, match="replace=True.*no delta_type"):

        class Vague(LoraModel, replace=True):
            pass


def test_registering_the_same_classes_again_changes_nothing():
    before = known_delta_types()
    AutoDeltaModel.register("lora", LoraConfig, LoraModel)
    assert lookup("lora") == (LoraConfig, LoraModel) and known_delta_types() == before


def test_a_registered_class_keeps_its_one_delta_type():
    with pytest.raises(DuplicateDeltaTypeError, match=r"LoraModel.*'lora2'.*delta_type = 'lora'"):
        AutoDeltaModel.register("lora2", LoraConfig, LoraModel)
    assert "lora2" not in known_delta_types()


def test_the_base_classes_cannot_be_registered():
    with pytest.raises(DeltaConfigError, match="subclass of DeltaConfig"):
        AutoDeltaModel.register("anything", DeltaConfig, LoraModel)
    assert "anything" not in known_delta_types()


@dataclass
class EchoConfig(DeltaConfig):
    pass


class EchoModel(DeltaBase):
    default_modified_modules = ("attn.o",)


def test_register_writes_no_class_attribute_and_the_classes_learn_their_type_from_the_registry():
    before = (dict(vars(EchoConfig)), dict(vars(EchoModel)))
    AutoDeltaModel.register("echo", EchoConfig, EchoModel)
    try:
        assert (dict(vars(EchoConfig)), dict(vars(EchoModel))) == before
        assert (EchoConfig.delta_type, EchoModel.delta_type, EchoModel.config_class) == ("echo", "echo", EchoConfig)
        assert EchoConfig().to_dict()["delta_type"] == "echo"
    finally:
        unregister("echo")
    assert (EchoConfig.delta_type, EchoModel.delta_type, EchoModel.config_class) == ("", "", DeltaConfig)


def test_a_subclass_without_its_own_delta_type_inherits_it_and_registers_nothing(tmp_path):
    before = known_delta_types()

    class QuietLora(LoraModel):
        pass

    assert known_delta_types() == before and lookup("lora") == (LoraConfig, LoraModel)
    assert (QuietLora.delta_type, QuietLora.config_class) == ("lora", LoraConfig)
    model = fresh("BERT")
    delta = QuietLora(model, modified_modules=["query"], lora_r=2)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.normal_()
        inputs = synthesize_inputs(model)
        tuned = model(**inputs).last_hidden_state
    delta.save_finetuned(tmp_path)
    other = fresh("BERT")
    loaded = LoraModel.from_finetuned(tmp_path, other)
    with torch.no_grad():
        assert torch.equal(other(**inputs).last_hidden_state, tuned)
    assert type(loaded) is LoraModel
