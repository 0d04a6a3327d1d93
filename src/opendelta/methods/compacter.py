"""Compacter (Mahabadi et al., 2021): an adapter whose projections are PHM layers, ``W = sum_i A_i (x) B_i``.

Each projection's weight is a sum of n Kronecker products of a small "rule" A_i (n x n) and a
block B_i (in/n x out/n), with n = ``hypercomplex_division``. Options, all from OpenDelta:
``factorized_phm`` makes each B_i a rank-``phm_rank`` product s_i t_i; ``factorized_phm_rule``
makes each A_i a rank-1 outer product of two length-n vectors; ``shared_phm_rule`` shares one set
of rules among every PHM layer of the delta model (the paper's Compacter); ``shared_W_phm`` shares
one set of down blocks among all down projections and one set of up blocks among all up
projections. Shared tensors are one tensor object registered in every layer that uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from opendelta.config import DeltaConfig, choice, positive, size
from opendelta.delta_base import DeltaBase
from opendelta.errors import UnsupportedModuleError
from opendelta.methods.adapter import ACTIVATIONS, WEIGHT_INITS, BottleneckLayer, glorot_, reduced_sizes
from opendelta.runtime_init import Observation


@dataclass
class CompacterConfig(DeltaConfig):
    reduction_factor: int = size(16)
    non_linearity: str = choice("gelu_new", ACTIVATIONS)
    phm_c_init: str = choice("normal", ("normal", "uniform"))
    hypercomplex_division: int = size(4)
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = choice("glorot-uniform", WEIGHT_INITS)
    shared_phm_rule: bool = False
    factorized_phm: bool = True
    shared_W_phm: bool = False
    factorized_phm_rule: bool = False
    phm_rank: int = size(1)
    phm_init_range: float = positive(0.0001)
    kronecker_prod: bool | None = None
    use_bias_up_sampler: bool = True
    use_bias_down_sampler: bool = True


def new_phm_rule(config: CompacterConfig, observation: Observation) -> dict[str, torch.Tensor]:
    """The n rules A_i, by attribute name: ``phm_rule`` (n, n, n), or with ``factorized_phm_rule``
    ``phm_rule_left`` (n, n, 1) and ``phm_rule_right`` (n, 1, n), so A_i = left_i right_i.
    Parameters when ``learn_phm``, plain tensors (registered as buffers) otherwise."""
    n = config.hypercomplex_division
    shapes = {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)} if config.factorized_phm_rule \
        else {"phm_rule": (n, n, n)}
    rule: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=observation.dtype, device=observation.device)
        if config.phm_c_init == "normal":
            tensor.normal_(0.0, config.phm_init_range)
        else:
            tensor.uniform_(-1.0, 1.0)
        rule[name] = nn.Parameter(tensor) if config.learn_phm else tensor
    return rule


def new_phm_blocks(p: int, q: int, config: CompacterConfig, observation: Observation, *, zero: bool) -> dict[str, nn.Parameter]:
    """The n blocks B_i (p x q), by attribute name: ``W`` (n, p, q), or with ``factorized_phm``
    ``W_left`` (n, p, rank) and ``W_right`` (n, rank, q); ``zero=True`` starts B (W or W_right) at zero."""
    n, init = config.hypercomplex_division, config.hypercomplex_nonlinearity
    factory = {"dtype": observation.dtype, "device": observation.device}
    if config.factorized_phm:
        left = torch.empty(n, p, config.phm_rank, **factory)
        right = torch.zeros(n, config.phm_rank, q, **factory)
        glorot_(left, p, q, init)
        if not zero:
            glorot_(right, p, q, init)
        return {"W_left": nn.Parameter(left), "W_right": nn.Parameter(right)}
    blocks = torch.zeros(n, p, q, **factory)
    if not zero:
        glorot_(blocks, p, q, init)
    return {"W": nn.Parameter(blocks)}


class PHMLinear(nn.Module):
    """y = h (sum_i A_i (x) B_i) + b, from the rule and block tensors it is given (possibly shared).

    ``materialise=True`` builds the (in, out) weight and does one matmul; False applies the
    factors to h without forming it. Both compute the same map (equal to fp rounding).
    """

    def __init__(self, rule: dict[str, torch.Tensor], blocks: dict[str, nn.Parameter], bias: torch.Tensor | None,
                 *, materialise: bool):
        super().__init__()
        for name, tensor in {**rule, **blocks}.items():
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.materialise = materialise

    def rule(self) -> torch.Tensor:
        """A as one (n, n, n) tensor."""
        if "phm_rule" in self._parameters or "phm_rule" in self._buffers:
            return self.phm_rule
        return self.phm_rule_left @ self.phm_rule_right

    def blocks(self) -> torch.Tensor:
        """B as one (n, in/n, out/n) tensor."""
        return self.W if "W" in self._parameters else self.W_left @ self.W_right

    def weight(self) -> torch.Tensor:
        """W = sum_i A_i (x) B_i, shape (in, out)."""
        blocks = self.blocks()
        n, p, q = blocks.shape
        return torch.einsum("iab,ixy->axby", self.rule(), blocks).reshape(n * p, n * q)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        out = flat @ self.weight() if self.materialise else self._apply_factors(flat)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*h.shape[:-1], -1)

    def _apply_factors(self, flat: torch.Tensor) -> torch.Tensor:
        # y[b, y] = sum_{i, a, x} h[a, x] A_i[a, b] B_i[x, y], with h and y viewed as n chunks
        rule = self.rule()
        n = rule.shape[0]
        h = flat.view(flat.shape[0], n, -1)
        if "W" in self._parameters:
            mixed = torch.einsum("tax,iab->tibx", h, rule)
            out = torch.einsum("tibx,ixy->tby", mixed, self.W)
        else:  # the rank-r factors first: the cost stays linear in in + out
            low = torch.einsum("tax,ixr->tiar", h, self.W_left)
            mixed = torch.einsum("tiar,iab->tibr", low, rule)
            out = torch.einsum("tibr,iry->tby", mixed, self.W_right)
        return out.reshape(flat.shape[0], -1)


class CompacterLayer(BottleneckLayer):
    """A PHM bottleneck: m(h) = up(act(down(h)))."""


class CompacterModel(DeltaBase):
    """A Compacter (PHM adapter) after each addressed module.

    Arguments: ``reduction_factor=16`` (bottleneck = hidden // reduction_factor),
    ``hypercomplex_division=4`` (n), ``non_linearity="gelu_new"``, ``phm_c_init="normal"``,
    ``phm_init_range=1e-4``, ``learn_phm=True``, ``hypercomplex_nonlinearity="glorot-uniform"``,
    ``shared_phm_rule=False`` (True: one set of rules for every PHM layer of this delta model),
    ``factorized_phm=True``, ``phm_rank=1``, ``shared_W_phm=False`` (True: one set of down blocks
    for all down projections, one of up blocks for all up projections), ``factorized_phm_rule=False``
    (True: A_i = u_i v_i^T), ``kronecker_prod=None`` (None or True: form the weight from its
    Kronecker products; False: apply the factors without forming it), ``use_bias_up_sampler=True``,
    ``use_bias_down_sampler=True``; default positions: as the adapter (``attn.o``, ``ffn.down``).
    """

    config_class = CompacterConfig
    delta_type = "compacter"
    default_modified_modules = ("attn.o", "ffn.down")
    needs_runtime_init = True

    def prepare(self, observations: Mapping[str, Observation]) -> None:
        """Start this build's shared tensors (``shared_phm_rule``, ``shared_W_phm``): kind -> (first path, signature, tensors)."""
        self.shared_phm: dict[str, tuple[str, tuple, dict[str, torch.Tensor]]] = {}

    def new_layer(self, path: str, module: nn.Module, observation: Observation | None) -> CompacterLayer:
        c = self.config
        n = c.hypercomplex_division
        dim, bottleneck = reduced_sizes(path, observation, "Compacter", c.reduction_factor, multiple_of=n)
        assert observation is not None
        materialise = c.kronecker_prod is not False
        factory = {"dtype": observation.dtype, "device": observation.device}

        def phm(p: int, q: int, kind: str, *, zero: bool, bias: bool) -> PHMLinear:
            rule = self._shared_tensors(path, "rule", (observation.dtype, observation.device), c.shared_phm_rule,
                                        lambda: new_phm_rule(c, observation))
            blocks = self._shared_tensors(path, kind, (p, q, observation.dtype, observation.device), c.shared_W_phm,
                                          lambda: new_phm_blocks(p, q, c, observation, zero=zero))
            return PHMLinear(rule, blocks, torch.zeros(n * q, **factory) if bias else None, materialise=materialise)

        down = phm(dim // n, bottleneck // n, "down", zero=False, bias=c.use_bias_down_sampler)
        up = phm(bottleneck // n, dim // n, "up", zero=True, bias=c.use_bias_up_sampler)
        return CompacterLayer(down, up, c.non_linearity)

    def _shared_tensors(self, path: str, kind: str, signature: tuple, share: bool,
                        make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """New tensors from `make`, or with `share` the ones this delta model made first for `kind`
        (a layer whose sizes, dtype or device differ from the first one's cannot share them)."""
        if not share:
            return make()
        shared = self.shared_phm
        if kind not in shared:
            shared[kind] = (path, signature, make())
        first, first_signature, tensors = shared[kind]
        if signature != first_signature:
            option = "shared_phm_rule" if kind == "rule" else "shared_W_phm"
            raise UnsupportedModuleError(
                f"Compacter with {option}=True shares one set of {kind} tensors among all adapters, but {path!r} "
                f"needs {signature} and {first!r} {first_signature} (sizes, dtype, device); address modules "
                f"with equal hidden sizes, dtype and device, or set {option}=False."
            )
        return tensors
