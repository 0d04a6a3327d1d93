"""The original OpenDelta's common-structure names (``attn@.q@``, ``ff@.w2@``, ``lm_head@.proj@``...)
as opendelta roles.

The original rewrote each module path into its vocabulary, marking every rewritten part with
``@`` (``encoder@.block@.0.attn@.q@``), and matched names against the tail of that key. Its
vocabulary maps onto the roles of :data:`opendelta.structure.ROLES`, as data: :data:`VOCABULARY`.
A layer index keeps its place in that key (utils/structure_mapping.py, ``transform``: a ``$``
node copies the original element), so ``block@.0.attn@.q@`` (or its tail ``0.attn@.q@``) names
the query projection of every stack's layer 0: :func:`layer_index` reads it.
"""

from __future__ import annotations

from opendelta.errors import StructureError

#: the original's name (``@`` marks removed) -> the roles it stands for
VOCABULARY: dict[str, tuple[str, ...]] = {
    "embeddings": ("embed",),
    "block": ("layer",),
    "attn": ("attn",),
    "attn.q": ("attn.q",),
    "attn.k": ("attn.k",),
    "attn.v": ("attn.v",),
    "attn.proj": ("attn.o",),
    "attn.layer_norm": ("norm.attn",),
    "crossattn": ("xattn",),
    "crossattn.q": ("xattn.q",),
    "crossattn.k": ("xattn.k",),
    "crossattn.v": ("xattn.v",),
    "crossattn.proj": ("xattn.o",),
    "crossattn.layer_norm": ("norm.xattn",),
    "ff": ("ffn",),
    "ff.w1": ("ffn.up",),
    "ff.w2": ("ffn.down",),
    "ff.layer_norm": ("norm.ffn",),
    "layer_norm": ("norm.attn", "norm.xattn", "norm.ffn", "norm.final"),
    "lm_head": ("lm_head",),
    "lm_head.proj": ("lm_head",),
}
#: the original's stack names, which qualify a role as opendelta's stacks do (``decoder@.attn@.q@``)
STACKS = ("encoder", "decoder")


def is_original_name(text: object, *, roles: bool = False) -> bool:
    """Whether `text` is written in the original's vocabulary: it has ``@`` marks, or, where roles
    are expected (`roles`), it is one of the original's names that is no opendelta role."""
    if not isinstance(text, str):
        return False
    if "@" in text:
        return True
    if not roles:
        return False
    from opendelta.structure import ROLES

    stack, _, rest = text.partition(".")
    return text not in ROLES and (text in VOCABULARY or (stack in STACKS and rest in VOCABULARY and rest not in ROLES))


def original_roles(text: str) -> list[str]:
    """The roles the original's name `text` stands for (``"attn@.proj@"`` -> ``["attn.o"]``); a
    stack prefix qualifies them (``"decoder@.attn@.q@"`` -> ``["decoder.attn.q"]``)."""
    plain = ".".join(part[:-1] if part.endswith("@") else part for part in text.split("."))
    stack, _, rest = plain.partition(".")
    if stack in STACKS and rest:
        return [f"{stack}.{role}" for role in _roles(rest, text)]
    return list(_roles(plain, text))


def layer_index(text: str) -> str | None:
    """The layer index an original name holds (``"2"`` for ``"block@.2.attn@.q@"``, ``"0.ff@"`` or
    ``"decoder@.block@.2"``), or None for a name that addresses every layer."""
    parts = text.split(".")
    if parts and parts[0].endswith("@") and parts[0][:-1] in STACKS:
        parts = parts[1:]
    if parts and parts[0] == "block@":
        parts = parts[1:]
    return parts[0] if parts and parts[0].isdigit() else None


def _roles(name: str, text: str) -> tuple[str, ...]:
    first, _, rest = name.partition(".")
    if first.isdigit():  # "0.attn.q": the tail of "block@.0.attn@.q@"
        first, _, rest = f"block.{name}".partition(".")
    if first == "block" and rest:
        index, _, inner = rest.partition(".")
        if index.isdigit():  # the layer is picked by layer_index(); here its modules' roles
            return VOCABULARY["block"] if not inner else _roles(inner, text)
        name = rest
    if name not in VOCABULARY:
        import difflib

        close = difflib.get_close_matches(name, list(VOCABULARY), n=3)
        hint = f" Did you mean {' or '.join(repr(c + '@') for c in close)}?" if close else ""
        raise StructureError(
            f"{text!r} is not a common-structure name of the original OpenDelta.{hint} Its names: "
            f"{', '.join(VOCABULARY)} (each part marked with @), optionally after encoder@. or decoder@.; "
            "opendelta's own roles are listed in docs/common_structure.md."
        )
    return VOCABULARY[name]
