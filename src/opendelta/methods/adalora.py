"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, ``h_out += h_in (A * E)^T B^T * alpha / r``, ranks
pruned during training to a budget, as PEFT's AdaLoRA (0.21) does.

Each layer holds ``init_r`` triplets (a row of A, a singular value in E, a column of B); E starts at
zero, so a fresh layer adds exactly nothing. Training calls ``delta.update_and_allocate(step)`` once
per step, after ``backward()`` and the optimizer step and before the gradients are zeroed (under HF
Trainer, :meth:`AdaLoraModel.trainer_callback` does it). It keeps moving averages of each entry's
importance ``|p * grad|``; from step ``tinit`` to ``total_step - tfinal`` the total number of kept
triplets falls from ``init_r`` per layer to ``target_r`` per layer (cubically), and every ``deltaT``
steps the least important triplets get E = 0 (they may revive before the next allocation, as in
the paper); in the last ``tfinal`` steps the final allocation is kept. Each layer's allocation is
its ``rank_mask`` buffer, saved with the delta. The loss should include
:meth:`AdaLoraModel.orthogonal_regularization` (``orth_reg_weight`` times the mean of
``||A A^T - I||_F`` and ``||B^T B - I||_F``), which PEFT adds to its model's loss.

On a convolution (any of ``nn.Conv1d/2d/3d``; PEFT's AdaLoRA takes ``nn.Conv2d``) A's columns are the
kernel flattened, ``in/groups x kernel size``, and the change ``B (A * E)`` is that kernel, as in PEFT's
SVDConv2d: the SVD form and the budget are the same whatever the weight's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.checkpoint import delta_key
from opendelta.config import DeltaConfig, number, positive, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import CorruptCheckpointError, DeltaConfigError, LifecycleError, PeftFormatError
from opendelta.layer import DeltaLayer
from opendelta.layer_kinds import WeightMap
from opendelta.linear_maps import weight_like
from opendelta.peft_format import (
    PEFT_WEIGHTS_NAME,
    PeftMethod,
    PeftTensors,
    check_peft_convolutions,
    peft_field,
    register_peft_method,
)
from opendelta.runtime_init import Observation
from opendelta.weight_change import weight_map_of

#: the most training steps a schedule takes (every step count below it is exact in a float, so in JSON)
MAX_STEPS = 2**53
#: what PEFT adds to the rank in the denominator of the scaling
_RANK_EPS = 1e-5
_TENSORS = ("lora_A", "lora_B", "lora_E")


@dataclass
class AdaLoraConfig(DeltaConfig):
    #: the starting rank of each layer, and the average rank the budget ends at
    init_r: int = size(12)
    target_r: int = size(8)
    #: the schedule: steps before pruning starts, steps kept at the final budget, steps between allocations
    tinit: int = number(0, low=0, high=MAX_STEPS)
    tfinal: int = number(0, low=0, high=MAX_STEPS)
    deltaT: int = size(1)
    #: moving-average factors of the importance and of its uncertainty
    beta1: float = number(0.85, low=0.0, high=1.0, low_open=True, high_open=True)
    beta2: float = number(0.85, low=0.0, high=1.0, low_open=True, high_open=True)
    orth_reg_weight: float = number(0.5, low=0.0)
    #: the number of training steps; update_and_allocate needs it
    total_step: int | None = size(None, most=MAX_STEPS)
    lora_alpha: float = positive(8)
    lora_dropout: float = number(0.0, low=0.0, high=1.0, high_open=True)
    #: True: A and B normal (std 0.02), E zero; False: all three standard normal (a fresh delta changes outputs)
    init_lora_weights: bool = True

    def validate(self) -> None:
        if self.target_r > self.init_r:
            raise DeltaConfigError(
                f"adalora prunes ranks from init_r={self.init_r} down to target_r={self.target_r}; choose target_r <= init_r."
            )
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise DeltaConfigError(
                f"adalora's schedule leaves no budgeting phase: tinit={self.tinit} >= total_step={self.total_step} - "
                f"tfinal={self.tfinal}; decrease tinit or tfinal, or increase total_step."
            )


class AdaLoraLayer(DeltaLayer):
    """m(h) = (h (A * E)^T B^T) * alpha / (r + 1e-5), with A: (r, in), E: (r, 1), B: (out, r), r = init_r."""

    route = "parallel"

    def __init__(self, form: WeightMap, config: AdaLoraConfig, weight: torch.Tensor):
        super().__init__()
        r = config.init_r
        self.form = form
        in_features, out_features = form.in_features, form.out_features
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, **factory))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=weight.device))
        if weight.device.type != "meta":
            if config.init_lora_weights:
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            else:
                for p in (self.lora_A, self.lora_E, self.lora_B):
                    nn.init.normal_(p)
        self.scaling = config.lora_alpha
        self.rank = r
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None

    def denominator(self) -> torch.Tensor:
        """``r + 1e-5`` as PEFT computes it (a float32 tensor), so the outputs match PEFT's bit for bit."""
        return torch.full((1,), float(self.rank), device=self.lora_A.device) + _RANK_EPS

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            h = self.dropout(h)
        x = h.to(self.lora_A.dtype)
        if self.form.kernel:  # a convolution by the changed kernel, as PEFT's SVDConv2d computes it
            return self.form.apply(x, self.update().to(x.dtype)).to(h.dtype)
        # the float32 denominator (as PEFT's) would promote a half-precision change: keep the input's dtype
        return ((x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / self.denominator()).to(h.dtype)

    def update(self) -> torch.Tensor:
        """The weight change ``B (A * E) * alpha / (r + 1e-5)``, out x in (a kernel flattened)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / self.denominator()

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """W + B (A * E) * alpha / (r + 1e-5) (transposed for Conv1D, shaped as the kernel for a convolution)."""
        return {"weight": self.form.add_to(module, self.update())}

    def apply_mask(self) -> None:
        """Zero the singular values of the pruned triplets (those ``rank_mask`` drops)."""
        with torch.no_grad():
            self.lora_E.masked_fill_(~self.rank_mask.unsqueeze(1), 0.0)


class RankAllocator:
    """The budget schedule and the importance scores (moving averages over steps) of one AdaLoRA delta."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, AdaLoraLayer]):
        self.config = config
        self.layers = layers
        self.initial_budget = sum(layer.rank for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.reset()

    def reset(self) -> None:
        #: (layer path, tensor name) -> moving average of |p * grad|, and of its deviation from that average
        self.importance: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets to keep at `step`, whether to allocate now)."""
        c = self.config
        assert c.total_step is not None
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.initial_budget - self.target_budget) * (remaining**3) + self.target_budget)
        return budget, step % c.deltaT == 0

    def update(self) -> None:
        """Fold this step's gradients into the importance averages."""
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, layer in self.layers.items():
                for name in _TENSORS:
                    p = getattr(layer, name)
                    if p.grad is None:
                        raise LifecycleError(
                            f"adalora's update_and_allocate() reads the gradients, but {path}.{name} has none; call it "
                            "after loss.backward() (and optimizer.step()) and before the gradients are zeroed."
                        )
                    key = (path, name)
                    now = (p * p.grad).abs()
                    average = self.importance.get(key, torch.zeros_like(p))
                    spread = self.uncertainty.get(key, torch.zeros_like(p))
                    average = b1 * average + (1 - b1) * now
                    self.importance[key] = average
                    self.uncertainty[key] = b2 * spread + (1 - b2) * (now - average).abs()

    def allocate(self, budget: int) -> None:
        """Keep the `budget` most important triplets over all layers; zero the singular values of the rest."""
        scores: dict[str, torch.Tensor] = {}
        for path in self.layers:
            score = {name: self.importance[(path, name)] * self.uncertainty[(path, name)] for name in _TENSORS}
            from_a = score["lora_A"].mean(dim=1, keepdim=True)
            from_b = score["lora_B"].mean(dim=0).view(-1, 1)
            scores[path] = score["lora_E"].view(-1) + torch.cat([from_a, from_b], dim=1).sum(dim=1)
        drop = self.initial_budget - budget
        if drop <= 0:
            return
        threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=drop)[0].item()
        for path, layer in self.layers.items():
            layer.rank_mask.copy_(scores[path] > threshold)
            layer.apply_mask()


class AdaLoraModel(DeltaBase):
    """AdaLoRA on every addressed linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) or convolution (``nn.Conv1d/2d/3d``).

    Arguments (PEFT's names and defaults): ``init_r=12, target_r=8, tinit=0, tfinal=0, deltaT=1,
    beta1=0.85, beta2=0.85, orth_reg_weight=0.5, total_step=None`` (needed to train),
    ``lora_alpha=8, lora_dropout=0.0``; default positions: attention query and value. Train with
    ``loss + delta.orthogonal_regularization()`` and ``delta.update_and_allocate(step)`` each step.
    """

    config_class = AdaLoraConfig
    delta_type = "adalora"
    default_modified_modules = ("attn.q", "attn.v")

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> AdaLoraLayer:
        return AdaLoraLayer(weight_map_of("AdaLoRA", path, module), self.config, weight_like(module))

    def orthogonal_regularization(self) -> torch.Tensor:
        """``orth_reg_weight`` times the mean over the layers' A and B of ``||A A^T - I||_F`` / ``||B^T B - I||_F``:
        the term PEFT adds to the loss, keeping P and Q of the SVD form near orthogonal."""
        terms = []
        for layer in self.layers.values():
            for product in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(*product.shape, dtype=product.dtype, device=product.device)
                terms.append(torch.norm(product - eye, p="fro"))
        return self.config.orth_reg_weight * (torch.stack(terms).sum() / len(terms))

    def rank_pattern(self) -> dict[str, list[bool]]:
        """Each layer's allocation: which of its init_r triplets it keeps (by module path)."""
        return {path: layer.rank_mask.tolist() for path, layer in self.layers.items()}

    def update_and_allocate(self, global_step: int) -> None:
        """The per-step call: update the importance scores and, when the schedule says so, prune to the
        budget. Call it after ``loss.backward()`` and ``optimizer.step()``, before zeroing the gradients."""
        total = self.config.total_step
        if total is None:
            raise DeltaConfigError(
                "adalora's update_and_allocate() follows a budget schedule over total_step steps, but total_step is "
                "None; build the delta with total_step=<number of training steps>."
            )
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise DeltaConfigError(f"update_and_allocate(global_step) takes the step number (an int >= 0), got {global_step!r}.")
        allocator = self.allocator()
        final = total - self.config.tfinal
        if global_step < final:
            allocator.update()
            budget, now = allocator.budget(global_step)
            if now:
                allocator.allocate(budget)
        elif global_step == final:
            allocator.allocate(allocator.budget(global_step)[0])
            allocator.reset()
        else:
            for layer in self.layers.values():
                layer.apply_mask()

    def allocator(self) -> RankAllocator:
        """This delta's rank allocator (its importance scores live as long as the delta)."""
        if getattr(self, "rank_allocator", None) is None:
            self.rank_allocator = RankAllocator(self.config, dict(self.layers))
        return self.rank_allocator

    def trainer_callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that adds the orthogonal regulariser's gradient and calls
        :meth:`update_and_allocate` at each optimizer step of an HF Trainer."""
        from opendelta.adalora_trainer import AdaLoraCallback

        return AdaLoraCallback(self)


# ----------------------------------------------------------------- PEFT's AdaLoRA


def _write_peft(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT stores only the kept triplets with the allocation in ``rank_pattern``; that is exact when every
    pruned triplet's E is zero (it is after each allocation), else all triplets are written without one."""
    config = delta.config
    masks = {path: tensors[delta_key(path, "rank_mask")] for path in delta.layers}
    lossless = all(not tensors[delta_key(p, "lora_E")][~m].any() for p, m in masks.items())
    pruned = lossless and not all(m.all() for m in masks.values())
    out: dict[str, torch.Tensor] = {}
    for path, mask in masks.items():
        keep = mask if pruned else torch.ones_like(mask)
        out[f"{path}.lora_A"] = tensors[delta_key(path, "lora_A")][keep].contiguous()
        out[f"{path}.lora_E"] = tensors[delta_key(path, "lora_E")][keep].contiguous()
        out[f"{path}.lora_B"] = tensors[delta_key(path, "lora_B")][:, keep].contiguous()
    fields = {
        "init_r": config.init_r,
        "target_r": config.target_r,
        "tinit": config.tinit,
        "tfinal": config.tfinal,
        "deltaT": config.deltaT,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "total_step": config.total_step if config.total_step is not None else 1,  # PEFT refuses None
        "rank_pattern": {f"{p}.lora_E": m.tolist() for p, m in masks.items()} if pruned else None,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(delta.layers),
        "fan_in_fan_out": any(type(delta.targets[p].module).__name__ == "Conv1D" for p in delta.layers),
        "bias": "none",
        "init_lora_weights": True,
    }
    return out, fields


def _read_peft(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
    paths: list[str] = []
    for name in stored:
        head, _, tail = name.rpartition(".")
        if tail in _TENSORS:
            if head not in paths:
                paths.append(head)
        elif "lora_" in name:
            raise PeftFormatError(f"{path.parent / PEFT_WEIGHTS_NAME} holds {name!r}, an AdaLoRA tensor opendelta does not implement.")
    if not paths:
        raise PeftFormatError(f"{path.parent / PEFT_WEIGHTS_NAME} holds no AdaLoRA tensors (no '<module>.lora_E'); it is not an AdaLoRA adapter.")
    init_r = peft_field(peft, "init_r", (int,), "a positive whole number", 12, path)
    total = peft_field(peft, "total_step", (int, type(None)), "a positive whole number", None, path)
    pattern = peft_field(peft, "rank_pattern", (dict, type(None)), "an object of '<module>.lora_E' -> list of booleans", None, path)
    masks: dict[str, list[bool]] = {}
    for module in paths:
        mask = (pattern or {}).get(f"{module}.lora_E", [True] * init_r)
        if not (isinstance(mask, list) and len(mask) == init_r and all(isinstance(v, bool) for v in mask)):
            raise CorruptCheckpointError(f"{path}: rank_pattern[{module + '.lora_E'!r}] must be {init_r} booleans (init_r), got {mask!r}.")
        kept = sum(mask)
        for name, want in (("lora_A", (kept, None)), ("lora_E", (kept, 1)), ("lora_B", (None, kept))):
            shape = stored.get(f"{module}.{name}")
            if shape is None or len(shape) != 2 or any(w is not None and s != w for s, w in zip(shape, want)):
                raise CorruptCheckpointError(
                    f"{path.parent / PEFT_WEIGHTS_NAME}: {module}.{name} has shape {shape}, but the rank pattern keeps "
                    f"{kept} of init_r={init_r} triplets; the folder is damaged or was edited."
                )
        masks[module] = mask
    values = {
        "modified_modules": paths,
        "init_r": init_r,
        "target_r": peft_field(peft, "target_r", (int,), "a positive whole number", 8, path),
        "tinit": peft_field(peft, "tinit", (int,), "a whole number", 0, path),
        "tfinal": peft_field(peft, "tfinal", (int,), "a whole number", 0, path),
        "deltaT": peft_field(peft, "deltaT", (int,), "a positive whole number", 1, path),
        "beta1": peft_field(peft, "beta1", (int, float), "a number in (0, 1)", 0.85, path),
        "beta2": peft_field(peft, "beta2", (int, float), "a number in (0, 1)", 0.85, path),
        "orth_reg_weight": peft_field(peft, "orth_reg_weight", (int, float), "a number >= 0", 0.5, path),
        "total_step": total,
        "lora_alpha": peft_field(peft, "lora_alpha", (int, float), "a positive number", 8, path),
        "lora_dropout": peft_field(peft, "lora_dropout", (int, float), "a number in [0, 1)", 0.0, path),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for module in paths:
        in_features, out_features = stored[f"{module}.lora_A"][1], stored[f"{module}.lora_B"][0]
        shapes.update({
            delta_key(module, "lora_A"): (init_r, in_features),
            delta_key(module, "lora_E"): (init_r, 1),
            delta_key(module, "lora_B"): (out_features, init_r),
            delta_key(module, "rank_mask"): (init_r,),
        })

    def convert(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for module, listed in masks.items():
            mask = torch.tensor(listed, dtype=torch.bool, device=t[f"{module}.lora_A"].device)
            a, e, b = (t[f"{module}.{name}"] for name in ("lora_A", "lora_E", "lora_B"))
            full_a = a.new_zeros(init_r, a.shape[1])
            full_e = e.new_zeros(init_r, 1)
            full_b = b.new_zeros(b.shape[0], init_r)
            full_a[mask], full_e[mask], full_b[:, mask] = a, e, b  # pruned triplets: zero, so they add nothing
            out.update({
                delta_key(module, "lora_A"): full_a,
                delta_key(module, "lora_E"): full_e,
                delta_key(module, "lora_B"): full_b,
                delta_key(module, "rank_mask"): mask,
            })
        return out

    claimed = {f"{m}.{name}" for m in paths for name in _TENSORS}
    return PeftTensors(values, paths, shapes, convert, claimed)


def _check_peft(delta: DeltaBase) -> None:
    check_peft_convolutions(delta, (2,), grouped=False)  # PEFT's SVDConv2d sizes A for one group


register_peft_method(PeftMethod("ADALORA", "adalora", _write_peft, _read_peft), check=_check_peft)
