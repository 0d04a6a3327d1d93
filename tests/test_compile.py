"""torch.compile: LoRA and adapter models compile into one graph (no graph breaks) and match eager mode."""

from __future__ import annotations

import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from support.numerics import assert_changed

from opendelta import LoraModel


class CountingBackend:
    """A torch.compile backend that records every graph dynamo hands it and runs it eagerly."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs.append(gm)
        return gm.forward


def _lora_bert():
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value", "output.dense"])
    delta.freeze_module(exclude=["deltas"])
    randomize_deltas(delta)
    return model, delta


def test_lora_model_compiles_into_one_graph_without_breaks():
    torch._dynamo.reset()
    model, _ = _lora_bert()
    backend = CountingBackend()
    batch = tiny_batch()
    compiled = torch.compile(model, backend=backend)

    out = compiled(**batch)

    assert len(backend.graphs) == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert torch.allclose(out.logits, model(**batch).logits, atol=1e-6)


def test_compiled_lora_training_step_matches_eager_loss_and_gradients():
    torch._dynamo.reset()
    batch = tiny_batch()
    results = []
    for compile_it in (False, True):
        model, delta = _lora_bert()
        model.train()
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compile_it else model
        loss = run(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-6)
    assert set(compiled_grads) == set(eager_grads)
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, atol=1e-6), name


def test_compiled_model_follows_detach_and_attach_when_hooks_are_guarded():
    # dynamo does not guard on module hooks by default (torch._dynamo.config.skip_nnmodule_hook_guards),
    # so a model compiled before attach()/detach() needs hook guards to notice them (docs/scaling_out.md)
    torch._dynamo.reset()
    model, delta = _lora_bert()
    batch = tiny_batch()
    original = tiny_bert()(**batch).logits
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        compiled = torch.compile(model, backend=CountingBackend())
        tuned = compiled(**batch).logits
        delta.detach()
        detached = compiled(**batch).logits
        delta.attach()
        reattached = compiled(**batch).logits
    assert torch.allclose(detached, original, atol=1e-6)
    assert torch.allclose(reattached, tuned, atol=1e-6)
    assert_changed(tuned, original)


def test_adapter_model_compiles_and_matches_eager():
    from opendelta import AdapterModel

    torch._dynamo.reset()
    model = tiny_bert()
    delta = AdapterModel(model, modified_modules=["attention.output.dense", "layer.0.output.dense"])
    delta.freeze_module(exclude=["deltas"])
    randomize_deltas(delta)
    batch = tiny_batch()
    backend = CountingBackend()
    out = torch.compile(model, backend=backend)(**batch)
    assert len(backend.graphs) == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert torch.allclose(out.logits, model(**batch).logits, atol=1e-6)
