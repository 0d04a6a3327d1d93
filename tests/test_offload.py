"""Deltas on a backbone bigger than memory: accelerate's device_map with layers offloaded to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from opendelta import BitFitModel, LoraModel, MergeError, UnsupportedModuleError
from opendelta.offload import execution_device, is_offloaded

IDS = torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 4]])
#: layers 0 and 1 in memory, 2 and 3 read from disk at every call
DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
    "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def offloaded(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, device_map=DEVICE_MAP, offload_folder=folder / "offload").eval()


def in_memory(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def hooks(model: torch.nn.Module) -> dict[str, object]:
    return {name: m._hf_hook for name, m in model.named_modules() if hasattr(m, "_hf_hook")}


def lora(model: torch.nn.Module) -> LoraModel:
    torch.manual_seed(1)
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj", "down_proj"], lora_r=4)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.05)  # a fresh B is zero: give the delta an effect
    return delta


def test_the_fixture_really_offloads_layers_to_disk(saved: Path) -> None:
    model = offloaded(saved)
    q = model.model.layers[3].self_attn.q_proj
    assert is_offloaded(q) and q.weight.is_meta and execution_device(q) == torch.device("cpu")
    assert not is_offloaded(model.model.layers[0].self_attn.q_proj)


def test_a_delta_on_offloaded_layers_computes_what_it_computes_in_memory(saved: Path) -> None:
    model, reference = offloaded(saved), in_memory(saved)
    delta, expected = lora(model), lora(reference)
    offloaded_layer = delta.layers["model.layers.3.self_attn.q_proj"]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in offloaded_layer.parameters())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
    assert expected.is_attached


def test_every_method_beside_offloaded_layers_computes_what_it_computes_in_memory(saved: Path) -> None:
    from support.methods import METHODS

    model, reference = offloaded(saved), in_memory(saved)
    with torch.no_grad():
        bare = model(IDS).logits
        for name, method in METHODS.items():
            built = []
            for m in (model, reference):
                torch.manual_seed(2)
                delta = method.model_class(m, **method.small)
                for p in delta.delta_parameters():
                    p.add_(0.05)
                built.append(delta)
            assert torch.equal(model(IDS).logits, reference(IDS).logits), name
            for delta in built:
                delta.detach()
            assert torch.equal(model(IDS).logits, bare), name


def test_detach_leaves_the_offloaded_weights_and_the_hooks_as_they_were(saved: Path) -> None:
    model = offloaded(saved)
    before_hooks, forwards = hooks(model), {n: m.forward for n, m in model.named_modules() if hasattr(m, "_hf_hook")}
    weights_map = model.model.layers[3].mlp.down_proj._hf_hook.weights_map
    stored = {"weight": weights_map["weight"].clone()}  # what the hook loads from disk at each call
    with torch.no_grad():
        bare = model(IDS).logits
    delta = lora(model)
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, bare)
    delta.detach()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, bare)
    after = hooks(model)
    assert after.keys() == before_hooks.keys() and all(after[k] is before_hooks[k] for k in after)
    assert all(getattr(model.get_submodule(n), "forward") == f for n, f in forwards.items())
    assert all(torch.equal(weights_map[k], v) for k, v in stored.items())
    assert model.model.layers[3].mlp.down_proj.weight.is_meta
    delta.attach()
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, bare)


def test_training_on_offloaded_layers_equals_training_in_memory_and_reloads_equal(saved: Path, tmp_path: Path) -> None:
    trained = {}
    for kind, model in (("offloaded", offloaded(saved)), ("memory", in_memory(saved))):
        delta = lora(model)
        delta.freeze_module(exclude=["deltas"])
        optimizer = torch.optim.AdamW(delta.delta_parameters(), lr=1e-2)
        for _ in range(3):
            loss = model(IDS, labels=IDS).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        trained[kind] = [p.detach().clone() for p in delta.delta_parameters()]
        if kind == "offloaded":
            assert model.model.layers[3].self_attn.q_proj.weight.is_meta
            delta.save_finetuned(tmp_path)
            with torch.no_grad():
                expected = model(IDS).logits
    assert all(torch.equal(a, b) for a, b in zip(trained["offloaded"], trained["memory"]))
    fresh = offloaded(saved)
    LoraModel.from_finetuned(tmp_path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, expected)


def test_merging_into_an_offloaded_weight_is_refused_and_changes_nothing(saved: Path) -> None:
    model = offloaded(saved)
    delta = lora(model)
    with torch.no_grad():
        before = model(IDS).logits
    with pytest.raises(MergeError, match="offloaded by accelerate"):
        delta.merge()
    assert not delta.is_merged and delta.is_attached
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_training_an_offloaded_backbone_tensor_is_refused(saved: Path) -> None:
    model = offloaded(saved)
    delta = BitFitModel(model, modified_modules=["q_proj"])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModuleError, match="offloaded by accelerate"):
        delta.freeze_module(exclude=["deltas", "model.layers.3.input_layernorm"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    delta.freeze_module(exclude=["deltas", "model.layers.0.input_layernorm"])  # in memory: trainable
    assert model.model.layers[0].input_layernorm.weight.requires_grad


def test_dora_beside_an_offloaded_weight_is_refused(saved: Path) -> None:
    model = offloaded(saved)
    with pytest.raises(UnsupportedModuleError, match="reads the module's weight"):
        LoraModel(model, modified_modules=["q_proj"], use_dora=True)
    assert not any(hasattr(m, "lora") for m in model.modules())


def test_a_delta_inside_a_module_offloaded_whole_is_refused(saved: Path) -> None:
    from accelerate import cpu_offload

    model = in_memory(saved)
    cpu_offload(model, execution_device=torch.device("cpu"), preload_module_classes=["LlamaDecoderLayer"])
    with pytest.raises(UnsupportedModuleError, match="offloads every tensor below it"):
        LoraModel(model, modified_modules=["q_proj"])
