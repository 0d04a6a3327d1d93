"""Delta arithmetic: several deltas of one method and backbone combined, with weights, into a new delta.

This file holds LoRA's (DoRA and PiSSA/OLoRA-started LoRA included); IA3's, BitFit's and trainable
tokens', whose tensors are vectors around an identity, are in :mod:`opendelta.task_vectors`.

The combinations are PEFT's ``add_weighted_adapter`` set, computed the way PEFT computes them so
results agree (DARE draws its masks in PEFT's order, so one random stream gives the same masks):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the A factors
  and the B factors separately (equal ranks needed per module), delta i weighted by
  ``sign(w_i) sqrt(|w_i| s_i)`` in A and ``sqrt(|w_i| s_i)`` in B;
- ``cat`` stacks the factors (the rank is the sum), A_i weighted by ``w_i s_i``;
- ``svd`` sums ``w_i s_i B_i A_i`` and keeps the top ``svd_rank`` singular directions.

Where PEFT fixes the result's scaling to 1 (and so, with rsLoRA, gets it wrong: its ``alpha = r``
then scales by ``sqrt(r)``), the result here keeps the first delta's scaling per module and the
weights are divided by it, so combining one delta with weight 1.0 (``linear`` or ``cat``) gives
back its factors and scaling bit for bit, and ``negate`` is exact (B, -A). The result is built
detached: the deltas combined stay as they are until you ``switch`` or ``attach``.

The LoRA variants combine through what they add to the weight:

- a PiSSA/OLoRA-started layer adds ``s (B A - B0 A0)``, which is the plain rank-2r LoRA
  ``[B - B0, B0] [A; A - A0]`` (:meth:`LoraLayer.factors`, the form PEFT exports too): the deltas
  combine as those plain factors into a plain LoRA on the original backbone (never rewritten);
- DoRA's factors combine as LoRA's, and its magnitudes ``m_i`` around the weight's own norms
  ``n = ||W||`` (what DoRA keeps when the product is zero) as task vectors ``m_i - n`` do
  (:func:`opendelta.task_vectors.mix_around`): ``n + sum w_i (m_i - n)`` for ``linear``, ``cat``
  and ``svd``, ``n + rule(m_i - n)`` for the pruning rules. PEFT's result keeps its new adapter's
  fresh magnitude ``n`` instead, dropping every trained one (PEFT issue 3761).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from opendelta.config import is_finite_number
from opendelta.errors import DeltaConfigError, LifecycleError, UnsupportedModuleError
from opendelta.linear_maps import update_factors
from opendelta.registry import lookup
from opendelta.targets import Target, targets_at
from opendelta.task_vectors import REFUSED, TASK_VECTORS, combine_task_vectors, mix_around

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase

#: combinations that prune the tensors they mix (they need a density)
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
#: combinations that mix the A and B factors separately, with a per-delta weight for each
FACTORWISE = ("linear", *PRUNING)
COMBINATIONS = (*FACTORWISE, "cat", "svd")


def _known_tensors(config: Any) -> set[str]:
    """The tensors of a LoRA layer that arithmetic combines: the factors, a PiSSA/OLoRA layer's starting
    factors (through the plain form), a DoRA layer's magnitude."""
    return {"lora_A", "lora_B"} | ({"lora_A0", "lora_B0"} if config.data_aware_init else set()) | (
        {"magnitude"} if config.use_dora else set())


def _factors(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``s B A`` the layer's change of the weight: its factors, or a weight-started layer's
    plain rank-2r form (``LoraLayer.factors``)."""
    buffers = dict(layer.named_buffers())
    return update_factors(layer.lora_A, layer.lora_B, buffers.get("lora_A0"), buffers.get("lora_B0"))


def _check(deltas: Sequence[DeltaBase], weights: Sequence[float], combination_type: str, density: float | None,
           majority_sign_method: str, svd_rank: int | None) -> None:
    if not isinstance(deltas, (list, tuple)) or not deltas:
        raise DeltaConfigError(f"combine() needs a non-empty list of LoRA deltas, got {deltas!r}")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(deltas) or not all(is_finite_number(w) for w in weights):
        raise DeltaConfigError(
            f"combine() needs one finite number per delta as weights ({len(deltas)} deltas), got {weights!r}"
        )
    if combination_type not in COMBINATIONS:
        close = difflib.get_close_matches(str(combination_type), COMBINATIONS, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise DeltaConfigError(f"unknown combination_type {combination_type!r}; expected one of {COMBINATIONS}.{hint}")
    backbone, method = deltas[0].backbone_model, deltas[0].delta_type
    if method not in ("lora", *TASK_VECTORS):
        raise DeltaConfigError(
            f"combine() combines lora, {', '.join(TASK_VECTORS)} deltas; {deltas[0].name!r} is a {method!r} delta. "
            f"{REFUSED.get(method, '')}Keep such deltas separate (attach, switch, or a mixed batch)."
        )
    for delta in deltas:
        if delta.delta_type != method or delta.backbone_model is not backbone:
            raise DeltaConfigError(
                f"combine() combines deltas of one method on one backbone; {delta.name!r} is a {delta.delta_type!r} delta"
                + ("" if delta.backbone_model is backbone else " on another backbone")
                + f" beside {method!r} ones. Combine deltas of one method trained on the same model."
            )
        if method != "lora":
            continue
        if delta.config.use_dora and delta.is_merged:
            raise LifecycleError(
                f"the DoRA delta {delta.name!r} is merged: its magnitudes are measured from the weight beneath it, "
                "which now holds the delta too; unmerge() it before combining."
            )
        known = _known_tensors(delta.config)
        for path, layer in delta.layers.items():
            # buffers too: a result without a PiSSA/OLoRA layer's starting factors would add s B A, not s (B A - B0 A0)
            extra = sorted(({n for n, _ in layer.named_parameters()} | {n for n, _ in layer.named_buffers()}) - known)
            if extra:
                raise UnsupportedModuleError(
                    f"the LoRA of {delta.name!r} at {path!r} also has {extra}, which combine() does not know how to mix; "
                    "combine LoRA deltas whose layers hold A and B factors (and a DoRA magnitude, or the starting "
                    "factors of a PiSSA/OLoRA start) only."
                )
    if method == "lora" and len({bool(d.config.use_dora) for d in deltas}) != 1:
        raise DeltaConfigError(
            f"combine() got DoRA and plain LoRA deltas ({[d.name for d in deltas if d.config.use_dora]} use DoRA): a "
            "DoRA magnitude has no counterpart in a plain LoRA. Combine DoRA deltas with DoRA deltas."
        )
    if combination_type in PRUNING:
        if not is_finite_number(density) or not 0 <= density <= 1:
            raise DeltaConfigError(f"combination_type={combination_type!r} needs density, a number in [0, 1]; got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise DeltaConfigError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise DeltaConfigError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")


# ----------------------------------------------------------------- the merge rules (PEFT's semantics)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def _prune_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability `density` (drawn from `generator`, else torch's global one) and rescaled."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.view(-1, *([1] * (tensors.dim() - 1)))


def _sign_elect(pruned: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """TIES: keep each entry's values that agree with the elected sign, and average them."""
    signs = pruned.sign()
    elected = torch.where((pruned if method == "total" else signs).sum(dim=0) >= 0, 1, -1)
    agree = signs == elected
    return (_weighted(pruned, weights) * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def _rule(
    combination_type: str, density: float | None, majority_sign_method: str, generator: torch.Generator | None
) -> Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The rule that mixes one factor of several deltas with per-delta weights."""

    def prune_random(t: torch.Tensor, density: float) -> torch.Tensor:
        return _prune_random(t, density, generator)

    def mix(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        if combination_type == "linear":
            return _weighted(torch.stack(tensors), weights).sum(dim=0)
        if combination_type == "magnitude_prune":
            return _weighted(torch.stack([_prune_magnitude(t, density) for t in tensors]), weights).sum(dim=0)
        if combination_type == "dare_linear":
            return _weighted(torch.stack([prune_random(t, density) for t in tensors]), weights).sum(dim=0)
        prune = _prune_magnitude if combination_type == "ties" else prune_random
        return _sign_elect(torch.stack([prune(t, density) for t in tensors]), weights, majority_sign_method)

    return mix


# ----------------------------------------------------------------- combining


def combine(
    deltas: Sequence[DeltaBase],
    weights: Sequence[float],
    combination_type: str = "linear",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    generator: torch.Generator | None = None,
    name: str | None = None,
) -> DeltaBase:
    """A new delta (detached) of `deltas`' method that combines them with `weights` (see the module
    docstring; for IA3 and BitFit, :mod:`opendelta.task_vectors`).

    Modules only some deltas modify combine those deltas. ``density`` (ties, dare_*,
    magnitude_prune): the fraction of entries kept; ``majority_sign_method`` (ties, dare_ties):
    "total" or "frequency"; ``svd_rank`` (svd; default: the largest rank) and ``svd_clamp`` (a
    quantile to clamp the factors at). DARE draws its masks from `generator` (default: torch's
    global one) module by module in the backbone's order, A factors then B factors, delta by delta:
    PEFT's order, so the same random stream gives PEFT's masks. (PEFT's ``add_weighted_adapter`` first
    draws its new adapter's initial weights from the global stream; pass a seeded `generator` for
    reproducible masks.)
    """
    _check(deltas, weights, combination_type, density, majority_sign_method, svd_rank)
    if deltas[0].delta_type in TASK_VECTORS:
        if combination_type not in FACTORWISE:
            raise DeltaConfigError(
                f"combination_type={combination_type!r} reshapes LoRA factors; {deltas[0].delta_type!r} deltas are "
                f"vectors, combined with one of {FACTORWISE}."
            )
        return combine_task_vectors(deltas, weights, _rule(combination_type, density, majority_sign_method, generator),
                                    linear=combination_type == "linear", name=name)
    backbone = deltas[0].backbone_model
    order = {path: i for i, (path, _) in enumerate(backbone.named_modules())}
    paths = sorted({p for d in deltas for p in d.layers}, key=lambda p: (order.get(p.split("->")[-1], -1), p))
    first = {p: next(d for d in deltas if p in d.layers) for p in paths}
    with torch.no_grad():
        # per module: (layer, its plain factors (A, B), weight) of each delta that modifies it
        sources = {
            path: [(d.layers[path], _factors(d.layers[path]), float(w)) for d, w in zip(deltas, weights) if path in d.layers]
            for path in paths
        }
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    rslora, dora = deltas[0].config.use_rslora, deltas[0].config.use_dora
    for path in paths:
        source_ranks = [a.shape[0] for _, (a, _), _ in sources[path]]
        if combination_type in FACTORWISE:
            if len(set(source_ranks)) != 1:
                raise DeltaConfigError(
                    f"combination_type={combination_type!r} mixes A and B factors entry by entry, so the deltas need "
                    f"one rank at {path!r}, got {source_ranks} (a PiSSA/OLoRA layer counts twice its r); use 'cat' or "
                    "'svd'."
                )
            r = source_ranks[0]
        elif combination_type == "cat":
            r = sum(source_ranks)
        else:
            r = svd_rank or max(source_ranks)
        ranks[path] = r
        alphas[path] = _alpha_for(first[path].layers[path].scaling, r, rslora, first[path].config.rank_and_alpha(path))
    targets, _ = targets_at(backbone, paths)
    # built before the factors are mixed, as PEFT does: DARE then draws from the same random stream after the same inits
    # the deltas combined proved the forward reaches these modules: the result needs no dummy pass of its own
    result = _new_lora(backbone, targets, ranks, alphas, rslora, dora, name, deltas)
    mix = _rule(combination_type, density, majority_sign_method, generator)
    with torch.no_grad():
        for path in paths:
            present = sources[path]
            pairs = [factors for _, factors, _ in present]
            scaled = [w * layer.scaling for layer, _, w in present]  # w_i s_i
            target = result.layers[path]
            scaling = target.scaling
            if combination_type in FACTORWISE:
                root = math.sqrt(scaling)
                sizes = [math.sqrt(abs(ws)) / root for ws in scaled]
                like = pairs[0][0]
                a_weights = torch.tensor([m if ws >= 0 else -m for m, ws in zip(sizes, scaled)], dtype=like.dtype, device=like.device)
                b_weights = torch.tensor(sizes, dtype=like.dtype, device=like.device)
                a = mix([a for a, _ in pairs], a_weights)
                b = mix([b for _, b in pairs], b_weights)
            elif combination_type == "cat":
                a = torch.cat([a * (ws / scaling) for (a, _), ws in zip(pairs, scaled)])
                b = torch.cat([b for _, b in pairs], dim=1)
            else:
                a, b = _svd(pairs, scaled, ranks[path], scaling, svd_clamp)
            target.lora_A.copy_(a)
            target.lora_B.copy_(b)
        if dora:  # after every factor: DARE's masks for the factors come from the stream as PEFT draws them
            modules = {t.path: t.module for t in targets}
            for path in paths:
                target = result.layers[path]
                identity = target.base_norm(modules[path]).to(target.magnitude.dtype)
                magnitudes = [layer.magnitude for layer, _, _ in sources[path]]
                target.magnitude.copy_(mix_around(magnitudes, [w for _, _, w in sources[path]], identity, mix,
                                                  linear=combination_type not in PRUNING))
    return result


def _alpha_for(scaling: float, r: int, rslora: bool, reference: tuple[int, float]) -> float:
    """An alpha whose scaling at rank `r` is exactly `scaling`: the `reference` (rank, alpha) where the rank
    is the same, else ``scaling * r`` (``* sqrt(r)`` with rsLoRA) or, where that rounds to another scaling,
    one of its float neighbours; so a result at another rank (``cat``, ``svd``, a PiSSA layer's plain form)
    scales as its source does."""
    config_cls, _ = lookup("lora")
    reference_r, reference_alpha = reference
    alpha = scaling * (math.sqrt(r) if rslora else r)
    candidates = [reference_alpha] if r == reference_r else []
    up = down = alpha
    candidates.append(alpha)
    for _ in range(4):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, 0.0)
        candidates += [up, down]
    return next((a for a in candidates if config_cls.scaling_of(a, r, rslora) == scaling), alpha)


def _svd(pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], r: int, scaling: float,
         clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`r` factors (A, B) of ``sum w_i B_i A_i / scaling``, as PEFT's svd combination computes them."""
    like = pairs[0][0]
    update = sum(w * (b @ a) for (a, b), w in zip(pairs, weights))
    u, s, vh = torch.linalg.svd(update, full_matrices=True)
    b, a = u[:, :r] @ torch.diag(s[:r]), vh[:r, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return (a / scaling).to(like.dtype), b.to(like.dtype)


def _new_lora(backbone: Any, targets: list[Target], ranks: dict[str, int], alphas: dict[str, float], rslora: bool,
              dora: bool, name: str | None, proven_by: Sequence[DeltaBase]) -> DeltaBase:
    """A detached LoRA (or DoRA) delta on `targets` with the given ranks and alphas (its factors freshly initialised)."""
    config_cls, delta_cls = lookup("lora")
    paths = [t.path for t in targets]
    r0, alpha0 = ranks[paths[0]], alphas[paths[0]]
    config = config_cls.from_dict({
        "modified_modules": paths,
        "lora_r": r0,
        "lora_alpha": alpha0,
        "use_rslora": rslora,
        "use_dora": dora,
        # full paths as regex patterns: first match wins, so each module gets exactly its own
        "rank_pattern": {_exact(p): r for p, r in ranks.items() if r != r0} or None,
        "alpha_pattern": {_exact(p): a for p, a in alphas.items() if a != alpha0} or None,
    })
    return delta_cls.build_detached(backbone, config, targets, name=name, proven_by=proven_by)


def _exact(path: str) -> str:
    """A pattern that matches the module at `path` only (a regex for the whole path)."""
    return "[r]" + re.escape(path)


def negate(delta: DeltaBase, *, name: str | None = None) -> DeltaBase:
    """The delta that subtracts what `delta` adds (task arithmetic's negation): a LoRA's A negated
    (exactly; a PiSSA/OLoRA layer's plain form, a DoRA magnitude's ``m - ||W||`` too), an IA3's ``l - 1``,
    a BitFit's bias or trained embedding rows' change negated (see :mod:`opendelta.task_vectors`)."""
    return combine([delta], [-1.0], "linear", name=name)
