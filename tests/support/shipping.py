"""The shipping matrix: what each method (and each LoRA variant) does on each way out of training.

One row per registered method, LoRA once per variant; one cell per capability, either ``Works`` or
the typed error it raises and why (``Refused``), or ``Absent`` where PEFT has no such method.
tests/test_shipping_matrix.py checks every cell on a tiny model, and docs/shipping.md's table is
``render()`` of this table (``scripts/shipping_table.py`` writes it; the test compares the two).
"""

from __future__ import annotations

from collections.abc import Callable
import copy
import functools
from dataclasses import dataclass
from typing import Any

import peft
from support.families import BY_NAME, fresh
from torch import nn
from transformers import LlamaForCausalLM

from opendelta import DeltaConfigError, MergeError, PeftFormatError

#: capability key -> the doc's column title
CAPABILITIES = {
    "merge": "merge / unmerge",
    "export": "export_merged",
    "peft_out": "PEFT out",
    "peft_in": "PEFT in",
    "arithmetic": "arithmetic (`combine`)",
}


@dataclass(frozen=True)
class Works:
    """The capability works (checked as tests/test_shipping_matrix.py says); `note` qualifies it in the doc."""

    note: str = ""

    def cell(self) -> str:
        return f"yes ({self.note})" if self.note else "yes"


@dataclass(frozen=True)
class Refused:
    """It raises `error` with a message matching `match` and changes nothing; `reason` is the doc's why."""

    error: type[Exception]
    match: str
    reason: str

    def cell(self) -> str:
        return f"no: `{self.error.__name__}` ({self.reason})"


@dataclass(frozen=True)
class Absent:
    """PEFT has no such method, so there is no PEFT folder of it to read."""

    def cell(self) -> str:
        return "— (PEFT has no such method)"


Outcome = Works | Refused | Absent

YES = Works()
NOT_LINEAR = Refused(MergeError, "not linear in the weights", "not linear in the weights; keep it attached")
NOT_EXPORTED = Refused(MergeError, "save_finetuned", "not linear in the weights; ship it with `save_finetuned`")
NO_PEFT = Refused(PeftFormatError, "format='opendelta'", "PEFT has no such method")
NOT_COMBINED = "combine\\(\\) combines lora"


def not_combined(reason: str, said: str) -> Refused:
    """combine() refuses the method; its message says `said` (a regex), the doc `reason`."""
    return Refused(DeltaConfigError, f"{NOT_COMBINED}.*{said}", reason)


@dataclass(frozen=True)
class Row:
    label: str  #: the doc's row name
    delta_type: str
    options: dict[str, Any]
    outcomes: dict[str, Outcome]
    #: the tiny family (tests/support/families.py) the row runs on, or a builder of the tiny model
    family: str | Callable[[], nn.Module] = "llama"
    #: a PEFT config of the same adapter (for PEFT in and the comparison with add_weighted_adapter)
    peft_config: Callable[[], Any] | None = None
    #: PEFT's PiSSA/OLoRA folders hold factors of a rewritten weight: have PEFT convert them first
    peft_converts: bool = False
    #: PEFT has add_weighted_adapter for it: its arguments for a linear combination, which combine() must equal
    peft_combines: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        assert set(self.outcomes) == set(CAPABILITIES), self.label

    def model(self) -> nn.Module:
        """A fresh copy of the row's tiny model (the same weights each time)."""
        return fresh(self.family) if isinstance(self.family, str) else self.family()


@functools.cache
def _llama_with_biases() -> nn.Module:
    import torch

    config = BY_NAME["LLaMA"].config()
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def llama_with_biases() -> nn.Module:
    """The tiny LLaMA with biases on its projections (BitFit merges into a module's own bias)."""
    return copy.deepcopy(_llama_with_biases())


LLAMA_LINEARS = ["q_proj", "v_proj", "down_proj"]
MERGES = {"merge": YES, "export": YES}
LORA = {"modified_modules": ["q_proj", "v_proj"], "lora_r": 4, "lora_alpha": 8}


def _lora_config(**kwargs: Any) -> Callable[[], Any]:
    return lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kwargs)


ROWS: list[Row] = [
    Row("lora", "lora", LORA, {**MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": Works("all 7 combinations + `negate`; equals PEFT's `add_weighted_adapter`")},
        peft_config=_lora_config(), peft_combines={"combination_type": "linear"}),
    Row("lora, rsLoRA", "lora", {**LORA, "use_rslora": True}, {**MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": Works("exact where PEFT rescales by sqrt(r), PEFT issue 3761")},
        peft_config=_lora_config(use_rslora=True)),
    Row("lora, DoRA", "lora", {**LORA, "use_dora": True}, {**MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": Works("all 7 + `negate`; the magnitudes combined as changes from the weight's norms, where PEFT drops "
                           "them (PEFT issue 3761)")},
        peft_config=_lora_config(use_dora=True)),
    Row("lora, PiSSA", "lora", {**LORA, "init_lora_weights": "pissa"}, {
        **MERGES, "peft_out": Works("as PEFT's converted rank-2r LoRA"),
        "peft_in": Works("a folder PEFT converted with `path_initial_model_for_weight_conversion`; an unconverted one: "
                         "`PeftFormatError`"),
        "arithmetic": Works("all 7 + `negate`, as the plain rank-2r LoRA on the original backbone"),
    }, peft_config=_lora_config(init_lora_weights="pissa"), peft_converts=True),
    Row("vera", "vera", {"modified_modules": ["q_proj", "v_proj"], "r": 4}, {
        **MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": not_combined("not implemented: the update is bilinear in the two trained vectors", "bilinear"),
    }, peft_config=lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    Row("loha", "loha", {"modified_modules": ["q_proj", "v_proj"], "r": 2}, {
        **MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": not_combined("not implemented: the update is a product of two factor pairs", "elementwise product"),
    }, peft_config=lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])),
    Row("lokr", "lokr", {"modified_modules": ["q_proj", "v_proj"], "r": 1, "decompose_both": True}, {
        **MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": not_combined("not implemented: the update is a Kronecker product of factors", "Kronecker"),
    }, peft_config=lambda: peft.LoKrConfig(r=1, alpha=3, decompose_both=True, target_modules=["q_proj", "v_proj"])),
    Row("oft", "oft", {"modified_modules": LLAMA_LINEARS}, {
        **MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": not_combined("a weighted sum of rotations is not a rotation", "rotations"),
    }, peft_config=lambda: peft.OFTConfig(target_modules=LLAMA_LINEARS)),
    Row("adalora", "adalora", {"modified_modules": ["q_proj", "v_proj"], "init_r": 4, "target_r": 2, "total_step": 8,
                               "tinit": 1, "tfinal": 2, "deltaT": 1}, {
        **MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": not_combined("not implemented; PEFT's `add_weighted_adapter` refuses AdaLoRA too", "refuses AdaLoRA"),
    }, peft_config=lambda: peft.AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=8,
                                              tinit=1, tfinal=2, deltaT=1)),
    Row("trainable_tokens", "trainable_tokens", {"token_indices": [1, 3]}, {
        **MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": Works("linear, ties, dare_*, magnitude_prune + `negate`, on the rows' change"),
    }, peft_config=lambda: peft.TrainableTokensConfig(token_indices=[1, 3], target_modules=["embed_tokens"])),
    Row("ia3", "ia3", {"modified_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, {
        **MERGES, "peft_out": YES, "peft_in": YES,
        "arithmetic": Works("linear, ties, dare_*, magnitude_prune + `negate`, on l - 1; linear equals PEFT's"),
    }, peft_config=lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        peft_combines={}),
    Row("bitfit", "bitfit", {"modified_modules": ["q_proj", "k_proj", "v_proj"]}, {
        "merge": Works("modules with a bias"), "export": Works("modules with a bias"),
        "peft_out": Works("as PEFT's BEFT, on `nn.Linear`"), "peft_in": Works("PEFT's BEFT"),
        "arithmetic": Works("linear, ties, dare_*, magnitude_prune + `negate`"),
    }, family=llama_with_biases, peft_config=lambda: peft.BeftConfig(target_modules=["q_proj", "k_proj", "v_proj"])),
    *[
        Row(name, name, options, {
            "merge": NOT_LINEAR, "export": NOT_EXPORTED, "peft_out": NO_PEFT, "peft_in": Absent(),
            "arithmetic": not_combined("a non-linear bottleneck from its own random start", "non-linear"),
        })
        for name, options in [
            ("adapter", {"bottleneck_dim": 6}),
            ("parallel_adapter", {"bottleneck_dim": 6}),
            ("low_rank_adapter", {"reduction_factor": 4}),
            ("compacter", {"reduction_factor": 4}),
        ]
    ],
    Row("prefix", "prefix", {"prefix_token_num": 2, "position_offset": True}, {
        "merge": NOT_LINEAR, "export": NOT_EXPORTED, "peft_out": Works("`position_offset=True`, decoder LMs, every layer"),
        "peft_in": YES, "arithmetic": not_combined("attended to, not added", "attended to"),
    }, peft_config=lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)),
    Row("soft_prompt", "soft_prompt", {"soft_token_num": 2}, {
        "merge": NOT_LINEAR, "export": NOT_EXPORTED, "peft_out": Works("not encoder-decoders"), "peft_in": YES,
        "arithmetic": not_combined("attended to, not added", "attended to"),
    }, peft_config=lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)),
]

BEGIN = "<!-- shipping-matrix: generated by scripts/shipping_table.py from tests/support/shipping.py -->"
END = "<!-- end of shipping-matrix -->"


def render() -> str:
    """The doc's table of ROWS, between the BEGIN and END markers."""
    head = "| method | " + " | ".join(CAPABILITIES.values()) + " |"
    lines = [BEGIN, head, "|" + "---|" * (len(CAPABILITIES) + 1)]
    for row in ROWS:
        cells = [row.outcomes[key].cell() for key in CAPABILITIES]
        lines.append(f"| {row.label} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join([*lines, END])
