"""Arithmetic for deltas that are vectors around an identity: IA3's scales and BitFit's biases.

A delta's *task vector* is what it adds to the identity: ``tau = l - 1`` for an IA3 scale ``l``, the
bias ``b`` itself for BitFit. Both act linearly through tau: merged, IA3 turns a weight ``W`` into
``W diag(l) = W + W diag(tau)`` (or ``diag(l) W`` for an output scale), BitFit adds ``b``. So a
weighted sum of task vectors is the same weighted sum of the deltas' weight changes, as task
arithmetic on merged weights would compute it, and negation (``-tau``) subtracts exactly the change
the delta made to the weights (``l -> 2 - l``, ``b -> -b``).

``linear`` gives ``identity + sum w_i tau_i``, computed as ``sum w_i p_i + (1 - sum w_i) identity``
so that one delta with weight 1.0 comes back bit for bit and, for weights summing to 1, IA3 equals
PEFT's ``add_weighted_adapter`` (a plain weighted sum of the vectors) bit for bit. ``ties``,
``dare_linear``, ``dare_ties`` and ``magnitude_prune`` apply PEFT's rules to the task vectors, module
by module. ``cat`` and ``svd`` reshape LoRA factors and do not apply to vectors.

Adapters and the other methods are not combined: their bottleneck is non-linear and each delta starts
from its own random projection, so averaging their parameters is not a combination of what they do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from opendelta.errors import DeltaConfigError, UnsupportedModuleError
from opendelta.registry import lookup
from opendelta.targets import targets_at

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase


@dataclass(frozen=True)
class TaskVector:
    """Where a method keeps its vector in each layer, the value that changes nothing, and the config
    values of a delta on given paths (and, of those, the paths whose input the deltas scale)."""

    tensor: str
    identity: float
    config: Callable[[list[str], list[str]], dict[str, Any]] = lambda paths, inputs: {"modified_modules": paths}


#: delta_type -> its vector (the methods combine() takes besides LoRA)
TASK_VECTORS = {
    "ia3": TaskVector("scale", 1.0, lambda paths, inputs: {"modified_modules": paths, "feedforward_modules": inputs or None}),
    "bitfit": TaskVector("bias", 0.0),
}
#: delta_type -> why combine() refuses it
REFUSED = {
    name: "Its bottleneck is non-linear and each delta starts from its own random projection, so a combination of "
    "its parameters is not a combination of what the deltas do. "
    for name in ("adapter", "parallel_adapter", "low_rank_adapter", "compacter")
} | {
    "prefix": "A prefix is attended to, not added: a weighted sum of prefixes is not a sum of their effects. ",
    "soft_prompt": "A prompt is attended to, not added: a weighted sum of prompts is not a sum of their effects. ",
    "vera": "VeRA's update is bilinear in its two trained vectors, so a weighted sum of the vectors is not one of the "
    "updates; combining VeRA deltas is not implemented. ",
    "loha": "LoHa's update is the elementwise product of two low-rank products, so mixing factors does not mix updates; "
    "combining LoHa deltas is not implemented. ",
    "lokr": "LoKr's update is a Kronecker product of factors, so mixing factors does not mix updates; combining LoKr "
    "deltas is not implemented. ",
    "oft": "OFT rotates the weight, and a weighted sum of rotations is not a rotation. ",
    "adalora": "Combining AdaLoRA deltas is not implemented (PEFT's add_weighted_adapter refuses AdaLoRA too). ",
    "trainable_tokens": "Combining trained embedding rows is not implemented. ",
}


def _layout(deltas: Sequence[DeltaBase], vector: TaskVector) -> list[str]:
    """The module paths any delta modifies, in the backbone's order; raises where the deltas' layers disagree."""
    backbone = deltas[0].backbone_model
    order = {path: i for i, (path, _) in enumerate(backbone.named_modules())}
    for delta in deltas:
        for path, layer in delta.layers.items():
            extra = sorted({n for n, _ in layer.named_parameters()} - {vector.tensor})
            if extra:
                raise UnsupportedModuleError(
                    f"the {delta.delta_type} layer of {delta.name!r} at {path!r} also has {extra}, which combine() does "
                    f"not know how to mix; combine layers holding only {vector.tensor!r}."
                )
    paths = sorted({p for d in deltas for p in d.layers}, key=lambda p: (order.get(p, -1), p))
    for path in paths:
        routes = {d.layers[path].route for d in deltas if path in d.layers}
        if len(routes) != 1:
            raise DeltaConfigError(
                f"the deltas scale {path!r} on different sides ({sorted(routes)}: input for feedforward_modules, output "
                "otherwise); combine IA3 deltas with the same feedforward_modules."
            )
    return paths


def combine_task_vectors(
    deltas: Sequence[DeltaBase],
    weights: Sequence[float],
    mix: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
    *,
    linear: bool,
    name: str | None,
) -> DeltaBase:
    """A new detached delta of `deltas`' method (IA3 or BitFit) whose vectors combine theirs (see the module docstring).

    `mix` is the combination rule for task vectors with per-delta weights (arithmetic.py's, PEFT's
    semantics); `linear` asks for the exact form of the linear combination.
    """
    method = deltas[0].delta_type
    vector = TASK_VECTORS[method]
    paths = _layout(deltas, vector)
    backbone = deltas[0].backbone_model
    inputs = [p for p in paths if any(p in d.layers and d.layers[p].route == "before" for d in deltas)]
    config_cls, delta_cls = lookup(method)
    targets, _ = targets_at(backbone, paths)
    # the deltas combined proved the forward reaches these modules: the result needs no dummy pass of its own
    result = delta_cls.build_detached(backbone, config_cls.from_dict(vector.config(paths, inputs)), targets, name=name,
                                      proven_by=deltas)
    with torch.no_grad():
        for path in paths:
            present = [(getattr(d.layers[path], vector.tensor), float(w)) for d, w in zip(deltas, weights) if path in d.layers]
            values = [v for v, _ in present]
            if linear:
                total = sum(w for _, w in present)
                combined = values[0] * present[0][1]
                for value, w in present[1:]:  # PEFT's order: 0 + w_1 p_1 + w_2 p_2 + ...
                    combined = combined + value * w
                if vector.identity and total != 1.0:
                    combined = combined + (1.0 - total) * vector.identity
            else:
                like = values[0]
                taus = [v - vector.identity for v in values] if vector.identity else values
                combined = mix(taus, torch.tensor([w for _, w in present], dtype=like.dtype, device=like.device))
                if vector.identity:
                    combined = combined + vector.identity
            getattr(result.layers[path], vector.tensor).copy_(combined)
    return result

