"""LoRA (Hu et al., 2021): a low-rank update beside a linear map, ``h_out += s * h_in A^T B^T``.

With ``use_dora=True``, DoRA (Liu et al., 2024): the updated weight split into a trained magnitude
per output feature and a direction, ``W' = m * (W + s B A) / ||W + s B A||``.

``init_lora_weights`` picks the starting factors as PEFT does: ``True`` (A random, B zero),
``"gaussian"``, ``False`` (both random: a fresh delta changes the outputs), or data-aware starts from
the module's weight, ``"pissa"`` / ``"pissa_niter_K"`` (principal singular vectors, Meng et al.,
2024) and ``"olora"`` (QR factors, Büyükakyüz, 2024). Those train the principal part of W and keep
the rest, the residual ``W - s B0 A0``, frozen. The weight itself is never rewritten: the layer
adds ``s (B A - B0 A0)`` with the starting factors B0, A0 kept as buffers, which equals PEFT's
residual weight plus ``s B A`` in exact arithmetic, leaves the backbone's tensors untouched (so
detach, stacking and mixed batches stay exact), and saves with the delta what rebuilds the
residual from the original backbone. On a quantized layer the starting factors come from its
dequantized weight and the same holds: no residual is re-quantized (PEFT's OLoRA does that, which
moves a fresh model by about one more quantization's error; docs/quantization.md).
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opendelta.addressing import matches, suggest
from opendelta.config import DeltaConfig, check_name_list, choice, number, positive, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import DeltaConfigError, NoMatchError, UnsupportedModuleError
from opendelta.layer import DeltaLayer
from opendelta.layer_kinds import PROJECTIONS, described, fused_rows, layer_kind, weight_parameters
from opendelta.methods.lora_kinds import ConvLoraLayer, EmbeddingLoraLayer, WeightLoraLayer
from opendelta.methods.lora_stacked import StackedLora, add_product
from opendelta.methods.trainable_tokens import TokenLayers
from opendelta.runtime_init import Observation
from opendelta.targets import Target, targets_at, tied_targets, without_excluded
from opendelta.linear_maps import dense_weight, fold_into_weight, linear_shape, linear_weight, update_factors, weight_like
from opendelta.quantized import is_quantized, weight_stamp


class InitNames(Collection):
    """The named values of ``init_lora_weights``: these, with any iteration count K >= 0 in ``pissa_niter_K``."""

    NAMES = ("gaussian", "pissa", "pissa_niter_<K>", "olora")  # as error messages list them
    FIXED = ("gaussian", "pissa", "olora")

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and (value in self.FIXED or _NITER.fullmatch(value) is not None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)


_NITER = re.compile(r"pissa_niter_(?P<niter>[0-9]{1,3})")
#: initialisations that start from the module's weight and keep the starting factors (see the module docstring)
DATA_AWARE = ("pissa", "olora")


@dataclass
class LoraConfig(DeltaConfig):
    lora_r: int = size(8)
    lora_alpha: float = positive(16)
    lora_dropout: float = number(0.0, low=0.0, high=1.0, high_open=True)
    #: rank-stabilised LoRA (Kalajdzievski, 2023): s = alpha / sqrt(r) instead of alpha / r
    use_rslora: bool = False
    #: per-module r and alpha, ``{module pattern: value}`` in the addressing syntax; first match wins
    rank_pattern: dict[str, int] | None = size(None)
    alpha_pattern: dict[str, float] | None = positive(None)
    #: DoRA (Liu et al., 2024): also train a magnitude per output feature of the weight
    use_dora: bool = False
    #: the starting factors: True, False, "gaussian", "pissa", "pissa_niter_K" or "olora" (as in PEFT)
    init_lora_weights: bool | str = choice(True, InitNames())
    #: parameters to put LoRA on, by name (``"experts.gate_up_proj"``; the addressing syntax over parameter
    #: paths), for weights a forward reads without calling a linear module (fused MoE experts), as in PEFT
    target_parameters: list[str] | None = None
    #: on an nn.MultiheadAttention: which of its projections take a LoRA, among "q", "k", "v" (thirds of its
    #: fused in_proj_weight) and "out" (out_proj); None: all four
    attention_projections: list[str] | None = None
    #: also train these rows of the input embeddings (new vocabulary), as PEFT's LoRA option of that name does
    #: (the layers of opendelta.methods.trainable_tokens, in this delta; a tied LM head follows)
    trainable_token_indices: list[int] | None = number(None, low=0)

    def validate(self) -> None:
        chosen = self.attention_projections
        if chosen is None:
            return
        check_name_list(chosen, "attention_projections")
        if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(PROJECTIONS):
            raise DeltaConfigError(
                f"attention_projections names a MultiheadAttention's projections to put LoRA on, some of {list(PROJECTIONS)} "
                f"each at most once, got {chosen!r}; e.g. ['q', 'v'], or None for all of them."
            )

    @property
    def data_aware_init(self) -> bool:
        """Whether the factors start from the module's weight (PiSSA, OLoRA) and the layer keeps them."""
        return isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith(DATA_AWARE)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank r and alpha of the LoRA at module `path` (the first matching pattern, else the defaults)."""
        r = next((v for k, v in (self.rank_pattern or {}).items() if matches(path, k)), self.lora_r)
        alpha = next((v for k, v in (self.alpha_pattern or {}).items() if matches(path, k)), self.lora_alpha)
        return r, alpha

    def rank_and_scaling(self, path: str) -> tuple[int, float]:
        """The rank r and the scaling s of the LoRA at module `path`."""
        r, alpha = self.rank_and_alpha(path)
        return r, self.scaling_of(alpha, r, self.use_rslora)

    @staticmethod
    def scaling_of(alpha: float, r: int, rslora: bool) -> float:
        """The scaling s of a LoRA with `alpha` at rank `r`: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / (math.sqrt(r) if rslora else r)


class LoraLayer(DeltaLayer):
    """m(h) = s * h A^T B^T with A: (r, in), B: (out, r), s = alpha / r; by default B starts at zero.

    The factors take the dtype and device of the weight they sit beside. A layer started from the
    weight (PiSSA, OLoRA) also keeps the starting factors A0, B0 as buffers and computes
    ``m(h) = s * h (B A - B0 A0)^T``: see :meth:`factors`.
    """

    route = "parallel"

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, module: nn.Module, path: str = ""):
        super().__init__()
        r, self.scaling = config.rank_and_scaling(path)
        weight = weight_like(module)
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        init = config.init_lora_weights
        if config.data_aware_init:
            if r > min(in_features, out_features):
                raise DeltaConfigError(
                    f"init_lora_weights={init!r} takes r principal directions of {path!r}'s {out_features} x "
                    f"{in_features} weight, but r={r}; choose lora_r (or its rank_pattern) <= {min(in_features, out_features)}."
                )
            self.register_buffer("lora_A0", torch.empty(r, in_features, **factory))
            self.register_buffer("lora_B0", torch.empty(out_features, r, **factory))
        skeleton = weight.device.type == "meta"  # a skeleton has no values to initialise
        if config.data_aware_init and not skeleton:
            with torch.no_grad():
                a0, b0 = _weight_factors(dense_weight(module), r, self.scaling, init)
                for target, value in ((self.lora_A, a0), (self.lora_B, b0), (self.lora_A0, a0), (self.lora_B0, b0)):
                    target.copy_(value)
        elif init == "gaussian" and not skeleton:
            nn.init.normal_(self.lora_A, std=1 / r)
        elif not skeleton:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init is False:  # PEFT's False: both factors random, so a fresh delta changes the outputs
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) whose product s B A is the change of the weight: the trained factors, or for a layer
        started from the weight ``([A; A - A0], [B - B0, B0])`` (rank 2r), since
        ``B A - B0 A0 = (B - B0) A + B0 (A - A0)``: exactly zero while A, B are still A0, B0."""
        return update_factors(self.lora_A, self.lora_B, self._buffers.get("lora_A0"), self._buffers.get("lora_B0"))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            h = self.dropout(h)
        lora_A, lora_B = self.factors()
        # scaling the rank-r intermediate costs r/out of scaling the output
        return F.linear(F.linear(h, lora_A) * self.scaling, lora_B)

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        h = self.dropout(h_in) if self.dropout is not None else h_in
        # decoding runs this once per module per token, so the plain case reads the parameters directly
        # (no nn.Module.__getattr__) and casts only when autocast made the output lower precision. By
        # subscript, never .get(): DeepSpeed ZeRO-3 swaps _parameters for a dict whose __getitem__ gathers
        # a partitioned parameter, which .get() (the C OrderedDict's) would bypass
        params = self._parameters
        if "lora_A" in params and "lora_B" in params and "lora_A0" not in self._buffers:
            lora_A, lora_B = params["lora_A"], params["lora_B"]
        else:
            lora_A, lora_B = self.factors()
        dtype = h_out.dtype
        if h.dim() > 2 and h.is_contiguous():
            # the 2-D product F.linear would fold a contiguous input into anyway (the same mm), without the
            # 3-D view of it that would be flattened again here: two ops fewer each way, per call
            h = h.view(-1, h.shape[-1])
        low = F.linear(h, lora_A)
        if low.dim() != 2:
            low = low.reshape(-1, low.shape[-1])
        if low.dtype != dtype:
            low = low.to(dtype)
        # s scales the rank-r intermediate (r/out of the output's size); `scaling` may be a 0-dim tensor
        # (a hot-swap slot's, hotswap.py), which multiplies exactly as the same float does
        low = low * self.scaling
        if lora_B.dtype != dtype:
            lora_B = lora_B.to(dtype)
        return add_product(h_out, low, lora_B)

    def route_parallel_rows(self, h_in: torch.Tensor, h_out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # a linear map keeps no output for backward, so adding in place is safe: one gather, one scatter-add
        return h_out.index_add_(0, rows, self(h_in.index_select(0, rows)))

    @classmethod
    def stack_rows(cls, parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int) -> StackedLora | None:
        """Plain LoRA layers (no starting factors, one dtype and device) share one batched product; others
        (DoRA and subclasses) run one by one."""
        first = parts[0][0].lora_A
        if all(
            type(layer) is LoraLayer and "lora_A0" not in layer._buffers
            and layer.lora_A.dtype == first.dtype and layer.lora_A.device == first.device
            for layer, _ in parts
        ):
            return StackedLora(parts, batch_size)  # type: ignore[arg-type]
        return None

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """W + s B A (transposed for Conv1D)."""
        lora_A, lora_B = self.factors()
        update = (lora_B @ lora_A) * self.scaling
        return {"weight": fold_into_weight(module, lambda w: w + update.to(w.dtype))}


class DoraLayer(LoraLayer):
    """DoRA: the module's weight becomes ``W' = m * (W + s B A) / ||W + s B A||``, norms per output feature.

    As a delta on the module's output ``h_out = W h + b``: ``h_out + (k - 1) W h + k s h A^T B^T`` with
    ``k = m / ||W + s B A||``. The norm is a constant for backward (the paper's section 4.3, as in PEFT).
    The magnitude m starts at ``||W + s B A||``, so k starts at exactly 1 and a fresh layer changes nothing.
    """

    reads_module = True
    route_parallel_rows = DeltaLayer.route_parallel_rows  # not additive: LoRA's scatter-add does not apply

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, module: nn.Module, path: str = ""):
        super().__init__(in_features, out_features, config, module, path)
        self._squared_rows: tuple[weakref.ref, tuple, torch.Tensor] | None = None
        like = weight_like(module)  # a quantized layer's compute dtype, not its packed storage's
        self.magnitude = nn.Parameter(torch.empty(out_features, dtype=like.dtype, device=like.device))
        # a skeleton's (or an offloaded module's) weight is on meta: no values to start from (an offloaded
        # one is then refused by offload.check_placement: DoRA reads the weight after the call)
        if like.device.type != "meta" and getattr(module, "weight", like).device.type != "meta":
            with torch.no_grad():
                self.magnitude.copy_(self.weight_norm(module))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("a DoRA layer's change depends on its module's weight: it runs through route_parallel(module=...)")

    def base_norm(self, module: nn.Module) -> torch.Tensor:
        """``||W||`` per output feature, in float32: the magnitude that keeps the weight's norms (a fresh
        layer's, whose factors' product is zero); task arithmetic measures a magnitude from it."""
        with torch.no_grad():
            return self._squared_row_norms(module).sqrt()

    def weight_norm(self, module: nn.Module) -> torch.Tensor:
        """``||W + s B A||`` per output feature, in float32, without gradient and without forming
        ``W + s B A``: ``||W||^2 + 2 s <W, B A> + s^2 ||B A||^2`` per row, where ``||W||^2`` is
        computed once for as long as the weight is unchanged (see :meth:`_squared_row_norms`)."""
        with torch.no_grad():
            weight = dense_weight(module)
            lora_A, lora_B = self.factors()
            a, b = lora_A.float(), lora_B.float()
            cross = (b * (weight @ lora_A.t().to(weight.dtype)).float()).sum(1)
            square = ((b @ (a @ a.t())) * b).sum(1)
            s = self.scaling
            return (self._squared_row_norms(module) + (2 * s) * cross + (s * s) * square).clamp_min(0).sqrt()

    def _squared_row_norms(self, module: nn.Module) -> torch.Tensor:
        """``||W||^2`` per output feature in float32, kept while the weight is the same tensor with the
        same values: an in-place change (an optimizer step, merge(), copy_) bumps its version counter and
        a move (``.to()``) changes its storage, either of which recomputes it. A change written through
        ``weight.data`` escapes the version counter; write through the parameter itself (under no_grad)."""
        if is_quantized(module):  # its packed weight and quantization state (merge() replaces the state)
            stamp = weight_stamp(module)
            kept = self._squared_rows
            if kept is None or kept[0]() is not module or kept[1] != stamp:
                kept = self._squared_rows = (weakref.ref(module), stamp, dense_weight(module).float().square().sum(1))
            return kept[2]
        weight = module.weight
        if weight.is_inference() or torch.compiler.is_compiling():  # no version counter to trust
            return linear_weight(module).float().square().sum(1)
        stamp = (weight._version, weight.data_ptr(), weight.dtype, weight.device, weight.shape)
        kept = self._squared_rows
        if kept is None or kept[0]() is not weight or kept[1] != stamp:
            kept = self._squared_rows = (weakref.ref(weight), stamp, linear_weight(module).float().square().sum(1))
        return kept[2]

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        assert module is not None, "the engine passes the module to layers with reads_module"
        dtype, features = h_out.dtype, h_out.shape[-1]
        scale = self.magnitude / self.weight_norm(module).to(self.magnitude.dtype)  # k, trained through m only
        k = scale.to(dtype)
        flat_out = h_out.reshape(-1, features)
        if self.dropout is not None and self.training:
            # the magnitude rescales W applied to the dropped-out input, as PEFT does, so W h is recomputed
            h = self.dropout(h_in)
            base = F.linear(h, dense_weight(module).to(dtype)).reshape(-1, features)
            out = torch.addcmul(flat_out, base, k - 1)
        else:
            h = h_in
            bias = getattr(module, "bias", None)
            # k h_out + (1 - k) b = h_out + (k - 1)(h_out - b): one pass, and exactly h_out while k is 1
            out = flat_out * k if bias is None else torch.addcmul(bias.to(dtype) * (1 - k), flat_out, k)
        lora_A, lora_B = self.factors()
        low = F.linear(h, lora_A).reshape(-1, lora_A.shape[0]).to(dtype)
        scaled_b = (lora_B * scale.unsqueeze(1)).to(dtype)  # k B: out x r, cheaper than k on the output
        # `out` is a fresh 2-D tensor that nothing keeps for backward: adding in place (not into a view,
        # which would cost a gradient copy in backward) spares an output-sized temporary
        out.addmm_(low, scaled_b.t(), alpha=self.scaling)
        return out.view(h_out.shape)

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``m * (W + s B A) / ||W + s B A||`` (transposed for Conv1D); the bias is unchanged."""
        k = (self.magnitude.float() / self.weight_norm(module)).unsqueeze(1)
        lora_A, lora_B = self.factors()
        update = (lora_B.float() @ lora_A.float()) * self.scaling
        return {"weight": fold_into_weight(module, lambda w: ((w.float() + update) * k).to(w.dtype))}


def _weight_factors(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting factors (A0: r x in, B0: out x r) from a weight (out x in), computed in float32 as PEFT does:
    PiSSA ``s B0 A0`` = the top-r singular part of W (exact SVD, or randomized with ``pissa_niter_K``);
    OLoRA ``B0, A0`` = the first r columns of Q and rows of R in ``W = Q R``."""
    w = weight.float()
    if init == "olora":
        q, upper = torch.linalg.qr(w)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    niter = _NITER.fullmatch(init)
    if niter is None:
        u, singular, vh = torch.linalg.svd(w, full_matrices=False)
        u, singular, vh = u[:, :r], singular[:r], vh[:r]
    else:
        u, singular, v = torch.svd_lowrank(w, q=r, niter=int(niter["niter"]))
        vh = v.t()
    root = (singular / scaling).sqrt()
    return (root.unsqueeze(1) * vh).contiguous(), (u * root).contiguous()


class LoraModel(DeltaBase):
    """LoRA on every addressed linear layer (``nn.Linear`` or GPT-2's ``Conv1D``), embedding, convolution,
    ``nn.MultiheadAttention`` or fused MoE experts module (opendelta.layer_kinds; docs/layer_kinds.md), and
    on the weights ``target_parameters`` names.

    Arguments: ``lora_r=8, lora_alpha=16, lora_dropout=0.0``, ``use_rslora=False``,
    ``rank_pattern`` / ``alpha_pattern`` (per-module overrides), ``use_dora=False`` (DoRA: a
    trained magnitude per output feature), ``init_lora_weights=True`` (or ``"gaussian"``, ``False``,
    ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``), ``target_parameters=None`` (parameter names, e.g.
    ``["experts.gate_up_proj"]``), ``attention_projections=None`` (on a MultiheadAttention, only these of
    ``"q", "k", "v", "out"``), ``trainable_token_indices=None`` (also train these rows of the input
    embeddings, PEFT's option); default positions: attention query and value.
    """

    config_class = LoraConfig
    delta_type = "lora"
    default_modified_modules = ("attn.q", "attn.v")

    @classmethod
    def resolve_targets(
        cls, backbone_model: nn.Module, config: DeltaConfig | None = None, **config_values: object
    ) -> list[Target]:
        """The modules of ``modified_modules`` (or the defaults, unless only ``target_parameters`` is
        given), and the modules that hold a parameter of ``target_parameters``."""
        if config is None:
            config = cls.config_class.from_dict(config_values)
        targets = cls._lora_targets(backbone_model, config)
        tokens = token_targets(backbone_model, config)
        both = sorted({t.path for t in targets} & {t.path for t in tokens})
        if both:
            raise UnsupportedModuleError(
                f"{both[0]!r} is addressed for LoRA and is the input embedding (or tied to it) whose rows "
                "trainable_token_indices trains; a module takes one of them. Leave it out of modified_modules."
            )
        if not tokens:
            return targets
        order = {path: i for i, (path, _) in enumerate(backbone_model.named_modules())}
        return sorted([*targets, *tokens], key=lambda t: order.get(t.path, -1))

    @classmethod
    def _lora_targets(cls, backbone_model: nn.Module, config: LoraConfig) -> list[Target]:
        if not config.target_parameters:
            return super().resolve_targets(backbone_model, config)
        targets = [] if config.modified_modules is None else super().resolve_targets(backbone_model, config)
        owners = parameter_targets(backbone_model, config.target_parameters)
        both = sorted({t.path for t in targets} & set(owners))
        if both:
            raise UnsupportedModuleError(
                f"{both[0]!r} is addressed by modified_modules and holds a parameter of target_parameters; a LoRA acts "
                "on a module once. Leave it out of one of them."
            )
        found, _ = targets_at(backbone_model, list(owners))
        found = without_excluded(backbone_model, found, config.exclude_modules)
        order = {path: i for i, (path, _) in enumerate(backbone_model.named_modules())}
        return sorted([*targets, *found], key=lambda t: order.get(t.path, -1))

    def prepare(self, observations: Mapping[str, Observation]) -> None:
        """Which parameters of which modules ``target_parameters`` names."""
        names = self.config.target_parameters
        self.parameter_targets = parameter_targets(self.backbone_model, names) if names else {}
        indices = self.config.trainable_token_indices
        self.token_paths = {t.path for t in token_targets(self.backbone_model, self.config)}
        self.tokens = TokenLayers(indices, True, "lora", "trainable_token_indices") if indices is not None else None

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> DeltaLayer:
        config = self.config
        if path in self.token_paths:
            return self.tokens.build(path, module)  # type: ignore[union-attr]
        kind = "parameters" if path in self.parameter_targets else layer_kind(module)
        build = _LAYERS.get(kind)
        if build is None:
            raise UnsupportedModuleError(
                f"LoRA needs a {described(k for k in _LAYERS if k != 'parameters')}, but {path!r} is a "
                f"{type(module).__name__}; address the layers inside it instead, or name its weights in target_parameters."
            )
        if kind != "linear" and (config.use_dora or config.data_aware_init):
            raise UnsupportedModuleError(
                f"{path!r} is a {type(module).__name__}; DoRA and the initialisations from the weight "
                f"(init_lora_weights={config.init_lora_weights!r}) act on linear layers only in opendelta. Use plain "
                "LoRA there (use_dora=False, init_lora_weights=True, False or 'gaussian'), or leave it out."
            )
        return build(self, path, module)


def parameter_targets(model: nn.Module, patterns: list[str]) -> dict[str, tuple[str, ...]]:
    """Module path -> the names of its own parameters that `patterns` (``target_parameters``) match, in
    the module's order; a pattern that matches no parameter is a NoMatchError naming close ones."""
    check_name_list(patterns, "target_parameters")
    found: dict[str, list[str]] = {}
    every = []
    for path, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            every.append(full)
            if any(matches(full, pattern) for pattern in patterns):
                if not path:
                    raise UnsupportedModuleError(
                        f"target_parameters names {name!r}, a parameter of the model itself; a LoRA lives in a module "
                        "below the model. Wrap the parameter's use in a module, or target another parameter."
                    )
                found.setdefault(path, []).append(name)
    for pattern in patterns:
        if not any(matches(full, pattern) for full in every):
            raise NoMatchError(pattern, suggest(pattern, every), "target_parameters")
    return {path: tuple(names) for path, names in found.items()}


def token_targets(backbone_model: nn.Module, config: LoraConfig) -> list[Target]:
    """Where ``trainable_token_indices`` trains rows: the model's input embeddings (``get_input_embeddings()``, as
    PEFT takes them) and the linear layers tied to them; none without the option."""
    if config.trainable_token_indices is None:
        return []
    getter = getattr(backbone_model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    path = next((p for p, m in backbone_model.named_modules() if m is embedding and p), None)
    if path is None:
        raise UnsupportedModuleError(
            f"trainable_token_indices trains rows of the model's input embeddings, found by get_input_embeddings(), "
            f"which this {type(backbone_model).__name__} does not give; add a TrainableTokensModel with "
            "modified_modules=['<its embedding>'] beside the LoRA instead."
        )
    found = targets_at(backbone_model, [path])[0]
    return [*found, *tied_targets(backbone_model, found)]


def _linear(delta: LoraModel, path: str, module: nn.Module) -> LoraLayer:
    cls = DoraLayer if delta.config.use_dora else LoraLayer
    return cls(*linear_shape(module), delta.config, module, path)


def _attention(delta: LoraModel, path: str, module: nn.Module) -> WeightLoraLayer:
    chosen = delta.config.attention_projections or PROJECTIONS
    return WeightLoraLayer(module, weight_parameters(module, chosen), delta.config, path, fused_rows(module, chosen))


#: layer kind (opendelta.layer_kinds; "parameters": named in target_parameters) -> the LoRA layer built there
_LAYERS = {
    "linear": _linear,
    "embedding": lambda delta, path, module: EmbeddingLoraLayer(module, delta.config, path),
    "conv": lambda delta, path, module: ConvLoraLayer(module, delta.config, path),
    "attention": _attention,
    "experts": lambda delta, path, module: WeightLoraLayer(module, weight_parameters(module), delta.config, path),
    "parameters": lambda delta, path, module: WeightLoraLayer(module, delta.parameter_targets[path], delta.config, path),
}
