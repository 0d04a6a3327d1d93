"""The test method table: one row per delta method opendelta ships, read by every test that runs
methods in bulk (the family sweep and docs/coverage.md, the method matrix, the per-method default
checks, multi-task batching, config validation, the real-model training check).

Adding a method means adding its row here; `tests/test_method_table.py` fails while a registered
built-in method has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opendelta import DeltaBase
from opendelta.registry import known_delta_types, lookup


@dataclass(frozen=True)
class At:
    """A place the method matrix tests a method at, on every tiny family."""

    id: str  #: the test id (a method tested at two places needs two ids)
    position: str | None  #: a key of the family's positions (None: the method's own defaults)


@dataclass(frozen=True)
class Method:
    delta_type: str
    #: arguments that fit hidden-32 models and nothing more; positions and other sizes stay the defaults
    tiny: dict[str, Any] = field(default_factory=dict)
    #: arguments for quick runs: tiny, with bottlenecks and prefixes small too
    small: dict[str, Any] = field(default_factory=dict)
    #: where the method matrix puts it (empty: it is not in the matrix, for the reason in `not_in_matrix`)
    matrix: tuple[At, ...] = ()
    not_in_matrix: str = ""
    #: a freshly built delta already changes outputs (it adds keys, tokens): no identity check
    fresh_is_identity: bool = True
    #: it changes the sequence length, so every row of a mixed batch needs one of its kind
    whole_batch: bool = False
    #: trained on the real MiniLM by tests/test_methods_real.py
    real_training: bool = False
    #: it needs attention modules or embeddings, which a plain user-written nn.Module lacks
    needs_transformer: bool = False

    @property
    def model_class(self) -> type[DeltaBase]:
        """The class the registry holds for this delta type now."""
        return lookup(self.delta_type)[1]


# compacter: 32 // 16 = 2 is not a multiple of hypercomplex_division=4; low_rank_adapter: likewise for its
# rank; soft_prompt: 100 tokens would dwarf 6-token inputs
METHODS: dict[str, Method] = {
    m.delta_type: m
    for m in [
        Method("adalora", matrix=(At("adalora", "kv"),)),
        Method("adapter", small={"bottleneck_dim": 6}, matrix=(At("adapter", "out"),), real_training=True),
        Method("bitfit", matrix=(At("bitfit", "out"), At("bitfit_norms", "norms")), real_training=True),
        Method(
            "compacter", tiny={"reduction_factor": 4}, small={"reduction_factor": 4}, matrix=(At("compacter", "out"),),
            real_training=True,
        ),
        Method("ia3", matrix=(At("ia3", "kv"), At("ia3_input", "down")), real_training=True),
        Method("loha", small={"r": 2}, matrix=(At("loha", "kv"),)),
        Method("lokr", small={"r": 1, "decompose_both": True}, matrix=(At("lokr", "kv"),)),
        Method("lora", matrix=(At("lora", "kv"),)),
        Method(
            "low_rank_adapter", tiny={"reduction_factor": 4}, small={"reduction_factor": 8, "low_rank_rank": 2},
            matrix=(At("low_rank_adapter", "out"),), real_training=True,
        ),
        Method("oft", matrix=(At("oft", "kv"),)),
        Method(
            "parallel_adapter", small={"bottleneck_dim": 6, "scaled": 2.0}, matrix=(At("parallel_adapter", "blocks"),),
            real_training=True,
        ),
        Method(
            "prefix", small={"prefix_token_num": 3, "embed_dim": 8, "mid_dim": 8}, matrix=(At("prefix", None),),
            fresh_is_identity=False, whole_batch=True, needs_transformer=True,
        ),
        Method(
            "soft_prompt", tiny={"soft_token_num": 4}, small={"soft_token_num": 4}, fresh_is_identity=False,
            whole_batch=True, needs_transformer=True,
            not_in_matrix="it lengthens the output, so the matrix's same-shape comparisons do not apply, and it needs "
            "token embeddings (the tiny ViT has none); tests/test_soft_prompt.py covers it on each family",
        ),
        Method("vera", small={"r": 4}, matrix=(At("vera", "kv"),)),
        Method(
            "trainable_tokens", tiny={"token_indices": [1, 3]}, small={"token_indices": [1, 3]}, needs_transformer=True,
            not_in_matrix="it trains rows of the input embeddings, which none of the matrix's places is; "
            "tests/test_trainable_tokens.py covers its lifecycle on tiny LLaMA, GPT-2 (tied head) and BERT",
        ),
    ]
}


def builtin_delta_types() -> list[str]:
    """The registered delta types whose classes opendelta ships (tests may register toy methods of their own)."""
    return [t for t in known_delta_types() if lookup(t)[1].__module__.startswith("opendelta.")]
