"""Arithmetic for deltas that are tensors around an identity: IA3's scales, BitFit's biases, trained
embedding rows (trainable tokens), and (for :mod:`opendelta.arithmetic`) DoRA's magnitudes.

A delta's *task vector* is what it adds to the identity: ``tau = l - 1`` for an IA3 scale ``l``, the
bias ``b`` itself for BitFit, ``rows - original rows`` for trainable tokens. Each acts linearly
through tau: merged, IA3 turns a weight ``W`` into ``W diag(l) = W + W diag(tau)`` (or ``diag(l) W``
for an output scale), BitFit adds ``b``, trainable tokens add tau to their rows of the embedding. So
a weighted sum of task vectors is the same weighted sum of the deltas' weight changes, as task
arithmetic on merged weights would compute it, and negation (``-tau``) subtracts exactly the change
the delta made to the weights (``l -> 2 - l``, ``b -> -b``, ``rows -> 2 original - rows``).

``linear`` gives ``identity + sum w_i tau_i``, computed as ``sum w_i p_i + (1 - sum w_i) identity``
so that one delta with weight 1.0 comes back bit for bit and, for weights summing to 1, IA3 equals
PEFT's ``add_weighted_adapter`` (a plain weighted sum of the vectors) bit for bit. ``ties``,
``dare_linear``, ``dare_ties`` and ``magnitude_prune`` apply PEFT's rules to the task vectors, module
by module (``identity + rule(tau_i)``: exact at weight 1.0 and density 1 wherever ``p - identity`` is
exact, as Sterbenz's lemma makes it for ``p`` within a factor of 2 of the identity). ``cat`` and
``svd`` reshape LoRA factors and do not apply to vectors.

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


Identity = float | torch.Tensor


@dataclass(frozen=True)
class TaskVector:
    """Where a method keeps its vector in each layer, the value that changes nothing (given the layer),
    and the config values of a delta on given paths (the first delta's config, the paths whose layers
    hold the vector, and of those the paths whose input the deltas scale)."""

    tensor: str
    identity: Callable[[Any], Identity]
    config: Callable[[Any, list[str], list[str]], dict[str, Any]] = lambda first, paths, inputs: {"modified_modules": paths}
    #: config fields the deltas must agree on for their vectors to mix entry by entry
    shared: tuple[str, ...] = ()


#: delta_type -> its vector (the methods combine() takes besides LoRA)
TASK_VECTORS = {
    "ia3": TaskVector("scale", lambda layer: 1.0,
                      lambda first, paths, inputs: {"modified_modules": paths, "feedforward_modules": inputs or None}),
    "bitfit": TaskVector("bias", lambda layer: 0.0),
    # the rows a fresh delta starts from: the embedding's own, which the layer keeps beside the trained ones
    "trainable_tokens": TaskVector(
        "trainable_tokens_delta", lambda layer: layer.trainable_tokens_original,
        lambda first, paths, inputs: {"modified_modules": paths, "token_indices": list(first.config.token_indices)},
        shared=("token_indices",),
    ),
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
}


def _layout(deltas: Sequence[DeltaBase], vector: TaskVector) -> tuple[list[str], list[str]]:
    """The module paths any delta modifies, in the backbone's order: those whose layers hold the vector, and
    those whose layers share another's (a head tied to a trained embedding); raises where the deltas disagree."""
    first = deltas[0]
    for field in vector.shared:
        values = {d.name: getattr(d.config, field) for d in deltas}
        if any(v != getattr(first.config, field) for v in values.values()):
            raise DeltaConfigError(
                f"combine() mixes {first.delta_type} deltas entry by entry, so they need one {field}; got {values}. "
                f"Combine deltas with the same {field}."
            )
    backbone = first.backbone_model
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
    held = [p for p in paths if any(vector.tensor in dict(d.layers[p].named_parameters()) for d in deltas if p in d.layers)]
    return held, [p for p in paths if p not in held]


def mix_around(
    values: list[torch.Tensor],
    weights: list[float],
    identity: Identity,
    mix: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
    *,
    linear: bool,
) -> torch.Tensor:
    """``identity + mix(values_i - identity, weights)``: `mix` applied to the task vectors. With `linear`,
    the weighted sum computed as ``sum w_i v_i + (1 - sum w_i) identity``, so one value at weight 1.0
    comes back bit for bit and weights summing to 1 give the plain weighted sum (PEFT's)."""
    zero = isinstance(identity, float) and identity == 0.0
    if linear:
        combined = values[0] * weights[0]
        for value, w in zip(values[1:], weights[1:]):  # PEFT's order: 0 + w_1 p_1 + w_2 p_2 + ...
            combined = combined + value * w
        total = sum(weights)
        return combined if zero or total == 1.0 else combined + (1.0 - total) * identity
    like = values[0]
    taus = values if zero else [value - identity for value in values]
    combined = mix(taus, torch.tensor(weights, dtype=like.dtype, device=like.device))
    return combined if zero else combined + identity


def combine_task_vectors(
    deltas: Sequence[DeltaBase],
    weights: Sequence[float],
    mix: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
    *,
    linear: bool,
    name: str | None,
) -> DeltaBase:
    """A new detached delta of `deltas`' method (IA3, BitFit, trainable tokens) whose vectors combine theirs
    (see the module docstring).

    `mix` is the combination rule for task vectors with per-delta weights (arithmetic.py's, PEFT's
    semantics); `linear` asks for the exact form of the linear combination.
    """
    method = deltas[0].delta_type
    vector = TASK_VECTORS[method]
    held, sharing = _layout(deltas, vector)
    backbone = deltas[0].backbone_model
    inputs = [p for p in held if any(p in d.layers and d.layers[p].route == "before" for d in deltas)]
    config_cls, delta_cls = lookup(method)
    # a layer that shares another's vector is built after that one
    targets, _ = targets_at(backbone, held + sharing)
    # the deltas combined proved the forward reaches these modules: the result needs no dummy pass of its own
    result = delta_cls.build_detached(backbone, config_cls.from_dict(vector.config(deltas[0], held, inputs)), targets,
                                      name=name, proven_by=deltas)
    with torch.no_grad():
        for path in held:
            present = [(d, float(w)) for d, w in zip(deltas, weights) if path in d.layers]
            target = result.layers[path]
            identity = vector.identity(target)
            for delta, _ in present:
                if not _same(vector.identity(delta.layers[path]), identity):
                    raise DeltaConfigError(
                        f"the {method} delta {delta.name!r} at {path!r} started from other values than the backbone "
                        "holds now (a delta merged into it since?); unmerge it, or combine deltas built on this backbone."
                    )
            values = [getattr(delta.layers[path], vector.tensor) for delta, _ in present]
            combined = mix_around(values, [w for _, w in present], identity, mix, linear=linear)
            getattr(target, vector.tensor).copy_(combined)
    return result


def _same(a: Identity, b: Identity) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    return a == b
