"""The configurations compared: full fine-tuning, the frozen/bare backbone, and each delta method
built by opendelta and (where PEFT has it) by PEFT at the same positions with the same arguments.

A method joins the suite with one :func:`register_method` line; it is measured as soon as its
``delta_type`` is registered in opendelta.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from opendelta.registry import known_delta_types, lookup
from opendelta.structure import resolve_roles

BASELINES = ("full", "frozen")


@dataclass(frozen=True)
class MethodSpec:
    """How the suite builds one delta method: its opendelta type and arguments, its positions as
    common-structure roles (None: the method's own defaults), and its PEFT twin, if any."""

    delta_type: str
    roles: tuple[str, ...] | None
    args: dict[str, Any] = field(default_factory=dict)
    peft_config: Callable[[list[str]], Any] | None = None
    #: call PEFT's tuner model rather than the PeftModel: a PeftModel without a task type calls the backbone
    #: directly, skipping the loss term a tuner adds in its forward (AdaLoRA's orthogonal regulariser)
    peft_tuner_forward: bool = False


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, spec: MethodSpec) -> None:
    """Add a method to the suite (it is skipped until opendelta registers `spec.delta_type`)."""
    METHODS[name] = spec


def _peft_lora(targets: list[str]) -> Any:
    import peft

    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)


def _peft_dora(targets: list[str]) -> Any:
    import peft

    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, use_dora=True)


register_method("lora", MethodSpec("lora", ("attn.q", "attn.v"), {"lora_r": 8, "lora_alpha": 16}, _peft_lora))
register_method(
    "dora", MethodSpec("lora", ("attn.q", "attn.v"), {"lora_r": 8, "lora_alpha": 16, "use_dora": True}, _peft_dora)
)
for _name in ("adapter", "bitfit", "parallel_adapter", "low_rank_adapter", "compacter", "prefix", "soft_prompt", "ia3"):
    register_method(_name, MethodSpec(_name, None))


def _peft_twin(name: str, **kwargs: Any) -> Callable[[list[str]], Any]:
    """PEFT's config class `name` at the given targets with `kwargs` (the same arguments as opendelta's)."""

    def config(targets: list[str]) -> Any:
        import peft

        return getattr(peft, name)(target_modules=targets, **kwargs)

    return config


# the weight changes at LoRA's positions with PEFT's default sizes, beside PEFT's same method
register_method("vera", MethodSpec("vera", ("attn.q", "attn.v"), {"r": 256}, _peft_twin("VeraConfig", r=256)))
register_method("loha", MethodSpec("loha", ("attn.q", "attn.v"), {"r": 8, "alpha": 8}, _peft_twin("LoHaConfig", r=8, alpha=8)))
register_method("lokr", MethodSpec("lokr", ("attn.q", "attn.v"), {"r": 8, "alpha": 8}, _peft_twin("LoKrConfig", r=8, alpha=8)))
_OFT = {"r": 0, "oft_block_size": 32, "use_cayley_neumann": True, "num_cayley_neumann_terms": 5}
register_method("oft", MethodSpec("oft", ("attn.q", "attn.v"), _OFT, _peft_twin("OFTConfig", **_OFT)))
# AdaLoRA in its budgeting phase for every measured step (total_step far beyond them, tinit=0, deltaT=1):
# each step after the first prunes: the per-step cost through most of a real training run
_ADALORA = {"init_r": 12, "target_r": 8, "lora_alpha": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 1000}
register_method(
    "adalora",
    MethodSpec(
        "adalora", ("attn.q", "attn.v"), _ADALORA, _peft_twin("AdaLoraConfig", **_ADALORA), peft_tuner_forward=True
    ),
)


def available_methods() -> list[str]:
    """Registered suite methods whose delta type opendelta knows, LoRA first."""
    known = set(known_delta_types())
    return [name for name, spec in METHODS.items() if spec.delta_type in known]


def variants(methods: list[str], with_peft: bool = True) -> list[str]:
    """Names of the training configurations: baselines, then ``opendelta:<m>`` and ``peft:<m>``."""
    names = list(BASELINES)
    for method in methods:
        names.append(f"opendelta:{method}")
        if with_peft and METHODS[method].peft_config is not None:
            names.append(f"peft:{method}")
    return names


@dataclass
class Built:
    """A configuration ready to run: the module to call and the parameters to train."""

    model: nn.Module
    trainable: list[nn.Parameter]
    delta: Any = None  # the DeltaBase or PeftModel, when there is one


def positions(model: nn.Module, method: str) -> list[str] | None:
    """Module paths where `method` goes on `model` (None: the method's own defaults)."""
    roles = METHODS[method].roles
    return None if roles is None else resolve_roles(model, roles)


def build_opendelta(model: nn.Module, method: str, name: str | None = None) -> Any:
    """Attach `method` with opendelta and freeze everything but the deltas."""
    spec = METHODS[method]
    _, cls = lookup(spec.delta_type)
    delta = cls(model, modified_modules=positions(model, method), name=name, **spec.args)
    delta.freeze_module(exclude=["deltas"])
    return delta


def build_peft(model: nn.Module, method: str, adapter_name: str = "default") -> Any:
    """Wrap `model` with PEFT's twin of `method` (get_peft_model freezes the base itself)."""
    import peft

    spec = METHODS[method]
    assert spec.peft_config is not None
    targets = positions(model, method) or []
    return peft.get_peft_model(model, spec.peft_config(targets), adapter_name=adapter_name)


def build(variant: str, model: nn.Module) -> Built:
    """Turn a fresh `model` into the configuration `variant` (it is modified in place)."""
    if variant == "full":
        return Built(model, [p for p in model.parameters() if p.requires_grad])
    if variant in ("frozen", "bare"):
        for p in model.parameters():
            p.requires_grad_(False)
        if variant == "frozen":
            # backward still runs through every layer, as for a delta at the first layer: the floor
            model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
        return Built(model, [])
    tool, method = variant.split(":", 1)
    if tool == "opendelta":
        delta = build_opendelta(model, method)
        return Built(model, [p for p in model.parameters() if p.requires_grad], delta)
    if tool == "peft":
        wrapped = build_peft(model, method)
        called = wrapped.base_model if METHODS[method].peft_tuner_forward else wrapped
        return Built(called, [p for p in wrapped.parameters() if p.requires_grad], wrapped)
    raise KeyError(f"unknown configuration {variant!r}")


def train_step(built: Built, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One training step: forward, backward, AdamW update (nothing to update for the frozen floor), plus
    what a method's users add each step: opendelta AdaLoRA's loss term (PEFT's tuner adds its own in its
    forward) and the rank allocation after the update, ``update_and_allocate(step)`` in both tools."""
    optimizer = torch.optim.AdamW(built.trainable, lr=1e-4) if built.trainable else None
    model = built.model
    model.train()
    # getattr reaches through a PeftModel to its tuner; neither is defined by the other methods
    regularizer = getattr(built.delta, "orthogonal_regularization", None)
    allocate = getattr(built.delta, "update_and_allocate", None)
    count = itertools.count()

    def step() -> None:
        loss = model(**batch).loss
        if regularizer is not None:
            loss = loss + regularizer()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            if allocate is not None:
                allocate(next(count))
            optimizer.zero_grad(set_to_none=True)

    return step


def inference(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One forward pass in inference mode, without labels."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()

    def forward() -> None:
        with torch.inference_mode():
            model(**inputs)

    return forward


def merge(delta: Any) -> bool:
    """Merge the delta into the backbone weights if its tool can; False when it cannot (yet)."""
    if hasattr(delta, "merge_adapter"):  # PEFT
        delta.merge_adapter()
        return True
    if callable(getattr(delta, "merge", None)):
        delta.merge()
        return True
    return False
