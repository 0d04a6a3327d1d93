"""OFT (Qiu et al., 2023): orthogonal fine-tuning, ``h_in <- h_in R`` with R block-diagonal and orthogonal.

A linear map ``W`` becomes ``W R^T``: the rotation acts on the input features, in blocks of
``oft_block_size`` (or ``r`` blocks), as PEFT's OFT (0.21) does. Each block is the Cayley transform
of a skew-symmetric matrix ``Q`` whose upper triangle is trained: exactly ``(I - Q)(I + Q)^-1``, or
with ``use_cayley_neumann=True`` (PEFT's default) the truncated series ``I + 2Q + 2Q^2 + ... + Q^k``
of ``(I + Q)(I - Q)^-1``, which is cheaper and orthogonal up to the truncation. Q starts at zero, so
a fresh layer rotates by the identity and changes nothing. ``coft=True`` (constrained OFT) keeps each
block's Q within a radius ``eps`` of zero; ``block_share=True`` trains one block shared by all.

Beyond linear maps (opendelta.layer_kinds), as PEFT's OFT: on an ``nn.Embedding`` R rotates the looked-up
rows (its output features), ``E[ids] R``, merging as ``E R``; on a convolution R rotates the kernel
flattened to (out, in/groups x kernel size), ``W R^T``, which for a kernel wider than 1x1 is no rotation
of the input, so the rotated kernel stands in for the weight during each call (route ``"weights"``:
whole batches only; detach exact by construction).

PEFT's ``module_dropout`` is refused: PEFT 0.21 builds that dropout but never applies it, so there is no
reference behaviour to match (a PEFT folder that records one loads, as its outputs never saw it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.checkpoint import delta_key
from opendelta.config import MAX_SIZE, DeltaConfig, number, positive, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import CorruptCheckpointError, DeltaConfigError, PeftFormatError, UnsupportedModuleError
from opendelta.layer import WHOLE_BATCH, DeltaLayer
from opendelta.layer_kinds import layer_kind
from opendelta.linear_maps import fold_into_weight, linear_shape, weight_like
from opendelta.peft_format import (
    PEFT_WEIGHTS_NAME,
    PeftMethod,
    PeftTensors,
    check_peft_convolutions,
    peft_field,
    register_peft_method,
)
from opendelta.runtime_init import Observation


@dataclass
class OftConfig(DeltaConfig):
    #: the number of blocks per layer (0: from oft_block_size); give exactly one of r and oft_block_size
    r: int = number(0, low=0, high=MAX_SIZE)
    #: the size of each rotation block (0: from r); one that does not divide a layer's input is adjusted as PEFT does
    oft_block_size: int = number(32, low=0, high=MAX_SIZE)
    #: PEFT's field, refused unless 0: PEFT 0.21 builds this dropout but never applies it (see the module docstring)
    module_dropout: float = number(0.0, low=0.0, high=0.0)
    #: constrained OFT: keep each block's skew matrix within radius eps / sqrt(blocks) of zero
    coft: bool = False
    eps: float = positive(6e-5)
    #: one block shared by all blocks of a layer
    block_share: bool = False
    #: the truncated Neumann series of the Cayley transform (PEFT's default) instead of the exact inverse
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = size(5)
    #: True: start at the identity (Q = 0); False: Q random (normal, std 0.1), so a fresh delta changes outputs
    init_weights: bool = True

    def validate(self) -> None:
        if (self.r == 0) == (self.oft_block_size == 0):
            raise DeltaConfigError(
                f"oft takes exactly one of r (the number of blocks) and oft_block_size (their size), because "
                f"r x oft_block_size is the layer's input width; got r={self.r}, oft_block_size={self.oft_block_size}. "
                "Set the other one to 0 (e.g. r=0, oft_block_size=32, the default)."
            )

    def blocks(self, in_features: int, path: str = "") -> tuple[int, int]:
        """(number of blocks, block size) for a layer with `in_features` inputs; a size that does not divide
        it is moved to the nearest divisor, as PEFT does, with a warning."""
        given = self.oft_block_size or self.r
        chosen = given if in_features % given == 0 and given <= in_features else _nearest_divisor(in_features, given)
        if chosen != given:
            what = "oft_block_size" if self.oft_block_size else "r"
            warnings.warn(f"oft {what}={given} does not divide {path!r}'s {in_features} inputs; using {chosen} there, as PEFT does.")
        return (in_features // chosen, chosen) if self.oft_block_size else (chosen, in_features // chosen)


def _nearest_divisor(n: int, wanted: int) -> int:
    """PEFT's adjust_oft_parameters: the divisor of `n` nearest `wanted` (the lower one on a tie), `n` if above it."""
    if wanted >= n:
        return n
    higher = wanted
    while higher <= n and n % higher != 0:
        higher += 1
    lower = wanted
    while lower > 1 and n % lower != 0:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


class OftLayer(DeltaLayer):
    """Rotates a linear map's input, ``h <- h R``, R block-diagonal; the additive form is ``m(h) = h R - h``.

    ``oft_R`` holds each block's strict upper triangle of Q (one row per block, or one shared row).
    """

    route = "before"

    def __init__(self, in_features: int, config: OftConfig, weight: torch.Tensor, path: str = ""):
        super().__init__()
        self.count, self.block = config.blocks(in_features, path)
        self.coft, self.eps, self.neumann = config.coft, config.eps, config.use_cayley_neumann
        self.terms = config.num_cayley_neumann_terms
        rows = 1 if config.block_share else self.count
        elements = self.block * (self.block - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(rows, elements, dtype=weight.dtype, device=weight.device))
        if not config.init_weights and weight.device.type != "meta":
            nn.init.normal_(self.oft_R, mean=0.0, std=0.1)
        upper = torch.triu_indices(self.block, self.block, 1, device=weight.device)
        self.register_buffer("upper", upper, persistent=False)

    def skew(self, vector: torch.Tensor) -> torch.Tensor:
        """The skew-symmetric blocks Q (rows x block x block) whose strict upper triangles are `vector`'s rows."""
        q = vector.new_zeros(vector.shape[0], self.block, self.block)
        q[:, self.upper[0], self.upper[1]] = vector
        return q - q.transpose(-2, -1)

    def constrained(self) -> torch.Tensor:
        """COFT: project each block's Q back within radius eps / sqrt(rows) of zero, in place (as PEFT does)."""
        with torch.no_grad():
            q = self.skew(self.oft_R)
            radius = self.eps / torch.sqrt(torch.tensor(q.shape[0]))
            norm = torch.norm(q, dim=(1, 2), keepdim=True)
            projected = torch.where(norm <= radius, q, radius * (q / norm))
            self.oft_R.copy_(projected[:, self.upper[0], self.upper[1]])
        return self.oft_R

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks R (rows x block x block), in oft_R's dtype."""
        vector = self.constrained() if self.coft else self.oft_R
        q = self.skew(vector)
        rows = q.shape[0]
        if not self.neumann:
            eye = torch.eye(self.block, device=q.device).expand(rows, self.block, self.block)
            return torch.linalg.solve(eye + q, eye - q, left=False).to(vector.dtype)  # (I - Q)(I + Q)^-1
        r = torch.eye(self.block, device=q.device, dtype=q.dtype).repeat(rows, 1, 1)
        if self.terms > 1:  # I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1), summed in PEFT's order
            r.add_(q, alpha=2.0)
            if self.terms > 2:
                power = torch.bmm(q, q)
                r.add_(power, alpha=2.0)
                for _ in range(3, self.terms - 1):
                    power = torch.bmm(power, q)
                    r.add_(power, alpha=2.0)
                r.add_(torch.bmm(power, q))
        return r

    def rotate(self, h: torch.Tensor) -> torch.Tensor:
        """``h R``: each block of `h`'s features times its rotation."""
        dtype = h.dtype
        x = h.to(self.oft_R.dtype)
        rotation = self.rotations()
        if rotation.shape[0] != self.count:
            rotation = rotation.repeat(self.count, 1, 1)
        blocks = x.reshape(*x.shape[:-1], self.count, self.block)
        return torch.einsum("...rk,rkc->...rc", blocks, rotation).reshape(x.shape).to(dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.rotate(h) - h

    def route_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.rotate(h)  # exactly h while R is the identity; h + (hR - h) would round

    def matrix(self) -> torch.Tensor:
        """R as one (in x in) block-diagonal matrix."""
        rotation = self.rotations()
        return torch.block_diag(*[rotation[0 if rotation.shape[0] == 1 else i] for i in range(self.count)])

    def rotated(self, weight: torch.Tensor) -> torch.Tensor:
        """``W R^T`` for a weight (out x in, or a kernel flattened so) in its own shape and dtype."""
        rotation = self.matrix()
        flat = weight.reshape(weight.shape[0], -1)
        return (rotation @ flat.t().to(rotation.dtype)).t().reshape(weight.shape).to(weight.dtype)

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``W R^T`` (transposed for Conv1D): the map of the rotated input."""
        return {"weight": fold_into_weight(module, self.rotated)}


class EmbeddingOftLayer(OftLayer):
    """Rotates an embedding's looked-up rows, ``E[ids] R``; merging gives ``E R``."""

    route = "after"

    def route_output(self, h: torch.Tensor) -> torch.Tensor:
        return self.rotate(h)  # exactly h while R is the identity

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``E R``: every row rotated as a looked-up one is."""
        rotation = self.matrix()
        return {"weight": (module.weight.to(rotation.dtype) @ rotation).to(module.weight.dtype)}


class ConvOftLayer(OftLayer):
    """Rotates a convolution's kernel flattened to (out, in/groups x kernel size), ``W R^T``, standing in
    for the weight during each call (a kernel wider than 1x1 mixes positions, so no input rotation equals it)."""

    route = "weights"
    mixed_rows = WHOLE_BATCH  # one kernel serves the whole batch
    parameter_names = ("weight",)

    def changed_parameters(self, module: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"weight": self.rotated(current["weight"])}


class OftModel(DeltaBase):
    """OFT on every addressed linear layer (``nn.Linear`` or GPT-2's ``Conv1D``), embedding or convolution
    (``nn.Conv1d/2d/3d``, zero padding).

    Arguments (PEFT's names and defaults): ``r=0, oft_block_size=32`` (give one), ``coft=False``,
    ``eps=6e-5``, ``block_share=False``, ``use_cayley_neumann=True``, ``num_cayley_neumann_terms=5``,
    ``init_weights=True``; default positions: attention query and value.
    """

    config_class = OftConfig
    delta_type = "oft"
    default_modified_modules = ("attn.q", "attn.v")

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> OftLayer:
        kind = layer_kind(module)
        if kind == "linear":
            return OftLayer(linear_shape(module)[0], self.config, weight_like(module), path)  # type: ignore[index]
        if kind == "embedding":
            return EmbeddingOftLayer(module.embedding_dim, self.config, weight_like(module), path)
        if kind == "conv" and module.padding_mode == "zeros":
            return ConvOftLayer(module.weight[0].numel(), self.config, weight_like(module), path)
        raise UnsupportedModuleError(
            f"OFT rotates the weight of a linear layer (nn.Linear, Conv1D), an nn.Embedding or a zero-padded "
            f"convolution (nn.Conv1d/2d/3d), but {path!r} is a {type(module).__name__}"
            f"{' with padding_mode=' + repr(module.padding_mode) if kind == 'conv' else ''}; address the layers inside it instead."
        )


# ----------------------------------------------------------------- PEFT's OFT


def _check_peft(delta: DeltaBase) -> None:
    conv1d = [p for p, t in delta.targets.items() if type(t.module).__name__ == "Conv1D"]
    if conv1d:
        raise PeftFormatError(
            f"PEFT's OFT acts on nn.Linear, Conv2d and Embedding layers only, and {conv1d[0]!r} is a transformers "
            "Conv1D (GPT-2's projections), which PEFT refuses; save this delta with format='opendelta'."
        )
    check_peft_convolutions(delta, (2,), grouped=False, dilated=False)
    wide = [p for p in delta.layers if layer_kind(delta.targets[p].module) == "conv" and delta.targets[p].module.weight[0, 0].numel() > 1]
    if wide:
        raise PeftFormatError(
            f"{wide[0]!r} is a convolution with a kernel wider than 1x1, on which PEFT 0.21.2's OFT forward does not "
            "rotate the kernel: it rotates unfolded input patches and folds them back, summing the overlaps, so even a "
            "fresh adapter changes the outputs and its forward differs from its own merge (W R^T, what opendelta "
            "computes); PEFT's outputs would differ. Save with format='opendelta', or address 1x1 convolutions."
        )


def _write_peft(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config = delta.config
    out = {f"{path}.{_peft_name(layer)}.weight": tensors[delta_key(path, "oft_R")] for path, layer in delta.layers.items()}
    fields = {
        "r": config.r,
        "oft_block_size": config.oft_block_size,
        "module_dropout": 0.0,
        "coft": config.coft,
        "eps": config.eps,
        "block_share": config.block_share,
        "use_cayley_neumann": config.use_cayley_neumann,
        "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
        "target_modules": sorted(delta.layers),
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        # PEFT warns on a Cayley-Neumann adapter of a version before 0.18, whose series differed; ours is 0.18's
        "peft_version": PEFT_OFT_VERSION,
    }
    return out, fields


#: the PEFT release whose OFT this file computes (its Cayley-Neumann series dates from 0.18)
PEFT_OFT_VERSION = "0.21.2"


def _peft_name(layer: OftLayer) -> str:
    """PEFT's name for a layer's rotation: ``oft_embedding_R`` on an embedding, ``oft_R`` elsewhere."""
    return "oft_embedding_R" if isinstance(layer, EmbeddingOftLayer) else "oft_R"


def _read_peft(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
    if any(".oft_r." in name for name in stored):
        raise PeftFormatError(f"{path.parent}: an OFT adapter of PEFT 0.13 or older (oft_r tensors), which PEFT itself no longer loads.")
    keys: dict[str, str] = {}
    for name, shape in stored.items():
        suffix = next((s for s in (".oft_R.weight", ".oft_embedding_R.weight") if name.endswith(s)), None)
        if suffix is not None:
            if len(shape) != 2:
                raise CorruptCheckpointError(f"{path.parent / PEFT_WEIGHTS_NAME}: {name} has shape {list(shape)}; OFT stores (blocks, n).")
            keys[name] = delta_key(name[: -len(suffix)], "oft_R")
        elif ".oft_" in name:
            raise PeftFormatError(
                f"{path.parent / PEFT_WEIGHTS_NAME} holds {name!r}, an OFT tensor opendelta does not implement; load it "
                "with peft.PeftModel.from_pretrained."
            )
    if not keys:
        raise PeftFormatError(f"{path.parent / PEFT_WEIGHTS_NAME} holds no OFT tensors (no '<module>.oft_R.weight'); it is not an OFT adapter.")
    paths = [key.rpartition(".oft_")[0] for key in keys]
    values = {
        "modified_modules": paths,
        "r": peft_field(peft, "r", (int,), "a whole number >= 0", 0, path),
        "oft_block_size": peft_field(peft, "oft_block_size", (int,), "a whole number >= 0", 32, path),
        "coft": peft_field(peft, "coft", (bool,), "true or false", False, path),
        "eps": peft_field(peft, "eps", (int, float), "a positive number", 6e-5, path),
        "block_share": peft_field(peft, "block_share", (bool,), "true or false", False, path),
        "use_cayley_neumann": peft_field(peft, "use_cayley_neumann", (bool,), "true or false", True, path),
        "num_cayley_neumann_terms": peft_field(peft, "num_cayley_neumann_terms", (int,), "a positive whole number", 5, path),
    }
    peft_field(peft, "module_dropout", (int, float), "a number in [0, 1)", 0.0, path)  # never applied by PEFT 0.21
    shapes = {keys[n]: stored[n] for n in keys}
    return PeftTensors(values, paths, shapes, lambda t: {keys[n]: t[n] for n in keys}, set(keys))


def _check_read(config: OftConfig, tensors: PeftTensors, where: Path) -> None:
    """A block count or size that disagrees with the config is a damaged folder (checked before any layer is built)."""
    for key, shape in tensors.shapes.items():
        rows, elements = shape
        block = round((1 + (1 + 8 * elements) ** 0.5) / 2)
        if block * (block - 1) // 2 != elements or (config.block_share and rows != 1):
            raise CorruptCheckpointError(
                f"{where}: {key} has shape {list(shape)}, which no OFT block size (block_share={config.block_share}) gives; "
                "the folder is damaged or was edited."
            )


register_peft_method(PeftMethod("OFT", "oft", _write_peft, _read_peft, check_read=_check_read), check=_check_peft)
