"""Structural inference: a role table for a model no family table covers, read off its module tree.

1. The layer stacks are the innermost lists (``nn.ModuleList``/``nn.Sequential``) of same-class
   modules that each hold an attention projection.
2. In the first layer of each stack, linear maps are classified by their last name component
   (``q_proj``, ``query``, ``c_attn``...: :data:`PROJECTION_NAMES`); the feed-forward up and down
   projections also by weight shape (hidden -> wider -> hidden) when their names say nothing.
3. The attention block is the largest sub-module of the layer around the query projection that
   holds no feed-forward projection; the feed-forward block likewise around up and down.
4. Each finding becomes a pattern for every layer of the stack; notes say what was found and how.

Roles it cannot find are simply absent: asking for them raises StructureError naming them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from opendelta.addressing import is_delta_module
from opendelta.errors import StructureError
from opendelta.linear_maps import linear_shape

#: last name components that identify a projection; data, extend freely
PROJECTION_NAMES: dict[str, frozenset[str]] = {
    "attn.qkv": frozenset({"qkv", "qkv_proj", "c_attn", "query_key_value", "wqkv", "in_proj", "w_pack", "to_qkv"}),
    "attn.q": frozenset({"q", "q_proj", "query", "q_lin", "wq", "query_proj", "to_q", "q_linear"}),
    "attn.k": frozenset({"k", "k_proj", "key", "k_lin", "wk", "key_proj", "to_k", "k_linear"}),
    "attn.v": frozenset({"v", "v_proj", "value", "v_lin", "wv", "value_proj", "to_v", "v_linear"}),
    "attn.o": frozenset({"o", "o_proj", "out_proj", "out_lin", "wo", "dense", "c_proj", "to_out", "proj", "out"}),
    "ffn.gate": frozenset({"gate_proj", "w_gate", "wi_0", "gate"}),
    "ffn.up": frozenset({"up_proj", "fc1", "c_fc", "wi", "wi_1", "fc_in", "dense_h_to_4h", "intermediate_dense", "lin1", "w_in"}),
    "ffn.down": frozenset({"down_proj", "fc2", "c_proj", "wo", "fc_out", "dense_4h_to_h", "output_dense", "lin2", "w_out"}),
}
_CROSS = re.compile(r"cross|encdec|enc_dec|encoder_attn", re.IGNORECASE)


def _linears(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Relative path -> (in, out) of every linear map inside `module` (delta layers skipped)."""
    found: dict[str, tuple[int, int]] = {}
    for path, sub in module.named_modules():
        if path and not any(is_delta_module(m) for m in _chain(module, path)):
            shape = linear_shape(sub)
            if shape is not None:
                found[path] = shape
    return found


def _chain(root: nn.Module, path: str) -> list[nn.Module]:
    modules, current = [], root
    for part in path.split("."):
        current = current._modules[part]
        modules.append(current)
    return modules


def _by_name(path: str, role: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in PROJECTION_NAMES[role]


def _has_attention(module: nn.Module) -> bool:
    names = list(_linears(module))
    return any(_by_name(p, "attn.qkv") or _by_name(p, "attn.q") for p in names)


def layer_stacks(model: nn.Module) -> list[tuple[str, int, str]]:
    """(path, length, class name) of every layer stack, innermost lists of same-class attention layers."""
    stacks: list[tuple[str, int, str]] = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or is_delta_module(module) or not len(module):
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1 or not _has_attention(children[0]):
            continue
        stacks.append((path, len(children), type(children[0]).__name__))
    return [s for s in stacks if not any(o[0] != s[0] and o[0].startswith(s[0] + ".") for o in stacks)]


def _block(paths: Sequence[str], avoid: Sequence[str]) -> str | None:
    """The shortest ancestor prefix of `paths[0]` that holds all `paths` and none of `avoid`."""
    parts = paths[0].split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        inside = lambda p: p.startswith(prefix + ".")  # noqa: E731
        if all(inside(p) for p in paths) and not any(inside(a) for a in avoid):
            return prefix
    return None


def _classify_layer(layer: nn.Module) -> tuple[dict[str, list[str]], list[str]]:
    """Roles inside one layer -> layer-relative paths, and notes on how each was found."""
    linears = _linears(layer)
    notes: list[str] = []
    roles: dict[str, list[str]] = {}

    attention = [p for p in linears if any(_by_name(p, r) for r in ("attn.qkv", "attn.q", "attn.k", "attn.v"))]
    groups: dict[str, list[str]] = {}
    for path in attention:
        groups.setdefault(path.rsplit(".", 1)[0] if "." in path else "", []).append(path)
    ordered = sorted(groups.items(), key=lambda item: bool(_CROSS.search(item[0])))
    for index, (_, members) in enumerate(ordered):
        prefix = "attn" if index == 0 else "xattn"
        fused = [p for p in members if _by_name(p, "attn.qkv")]
        if fused:
            roles.setdefault(prefix + ".qkv", []).extend(fused)
        for part in ("q", "k", "v"):
            hits = [p for p in members if _by_name(p, f"attn.{part}")] or fused
            if hits:
                roles.setdefault(f"{prefix}.{part}", []).extend(hits)

    in_dims = [linears[p][0] for p in attention]
    hidden = max(set(in_dims), key=in_dims.count, default=None)
    candidates = {p: s for p, s in linears.items() if p not in attention and not _in_attention(p, roles)}
    for role in ("ffn.gate", "ffn.up", "ffn.down"):
        hits = [p for p in candidates if _by_name(p, role)]
        if role == "ffn.up":
            hits = [p for p in hits if candidates[p][0] == hidden and candidates[p][1] != hidden]
        if role == "ffn.down":
            hits = [p for p in hits if candidates[p][1] == hidden and candidates[p][0] != hidden]
        if hits:
            roles[role] = hits
    named = {p for r in ("ffn.gate", "ffn.up", "ffn.down") for p in roles.get(r, [])}
    for role, wide_in in (("ffn.up", False), ("ffn.down", True)):
        if role in roles or hidden is None:
            continue
        hits = [
            p for p, (i, o) in candidates.items()
            if p not in named and ((i > hidden and o == hidden) if wide_in else (i == hidden and o > hidden))
        ]
        if len(hits) == 1:
            roles[role] = hits
            notes.append(f"{role} found by shape ({linears[hits[0]][0]} -> {linears[hits[0]][1]}, hidden {hidden})")

    ffn_paths = [p for r in ("ffn.up", "ffn.gate", "ffn.down") for p in roles.get(r, [])]
    for prefix in ("attn", "xattn"):
        members = [p for r in (".qkv", ".q", ".k", ".v") for p in roles.get(prefix + r, [])]
        if not members:
            continue
        other = "xattn" if prefix == "attn" else "attn"
        others = [p for r in (".qkv", ".q", ".k", ".v") for p in roles.get(other + r, [])]
        block = _block(members, ffn_paths + others)
        if block is not None:
            roles[prefix] = [block]
            outs = [p for p in linears if p.startswith(block + ".") and p not in members and p not in ffn_paths]
        else:  # the projections sit directly in the layer: look among their siblings
            parent = members[0].rpartition(".")[0]
            outs = [
                p for p in linears
                if p.rpartition(".")[0] == parent and p not in members + ffn_paths + others and _by_name(p, "attn.o")
            ]
        named = [p for p in outs if _by_name(p, "attn.o")]
        if len(named) == 1 or len(outs) == 1:
            roles[prefix + ".o"] = named if len(named) == 1 else outs
    if ffn_paths:
        attention_paths = [p for r in ("attn", "xattn") for p in roles.get(r, [])]
        block = _block(ffn_paths, attention_paths)
        if block is not None and all(p.startswith(block + ".") for p in ffn_paths) and len(ffn_paths) > 1:
            roles["ffn"] = [block]
    return roles, notes


def _in_attention(path: str, roles: dict[str, list[str]]) -> bool:
    parents = {p.rsplit(".", 1)[0] for r in ("attn.q", "attn.k", "attn.v", "attn.qkv") for p in roles.get(r, []) if "." in p}
    return path.rsplit(".", 1)[0] in parents if "." in path else False


def infer_table(model: nn.Module) -> tuple[dict[str, list[str]], list[str]]:
    """A role table (patterns relative to `model`) and notes on what was inferred and how.

    Raises StructureError when no layer stack is found.
    """
    stacks = layer_stacks(model)
    if not stacks:
        raise StructureError(
            f"cannot infer the structure of {type(model).__name__}: found no repeated layer stack (a ModuleList "
            "of same-class layers holding attention projections named like q_proj/query/qkv). "
            "Name the modules instead, e.g. modified_modules=['q_proj', 'v_proj'] (print the model to see its names)."
        )
    table: dict[str, list[str]] = {}
    notes: list[str] = []
    both = {s: [p for p, _, _ in stacks if s in p.split(".")] for s in ("encoder", "decoder")}
    for path, length, cls in stacks:
        layer_pattern = rf"[r]{re.escape(path)}\.\d+"
        table.setdefault("layer", []).append(layer_pattern)
        if all(both.values()):  # an encoder-decoder: name the stacks so encoder./decoder. qualifiers work
            for stack in ("encoder", "decoder"):
                if path in both[stack]:
                    parts = path.split(".")
                    table.setdefault(stack, []).append(".".join(parts[: parts.index(stack) + 1]))
        roles, how = _classify_layer(model.get_submodule(path)[0])
        notes.append(f"layer stack {path!r}: {length} x {cls}")
        notes.extend(f"  {note}" for note in how)
        for role, rel in roles.items():
            table.setdefault(role, []).extend(rf"{layer_pattern}\.{re.escape(p)}" for p in rel)
            notes.append(f"  {role}: {', '.join(rel)}")
    for role, getter in (("embed", "get_input_embeddings"), ("lm_head", "get_output_embeddings")):
        found = _module_path(model, getattr(model, getter, None))
        if found:
            table[role] = [found]
            notes.append(f"{role}: {found} (from {getter}())")
    return table, notes


def _module_path(model: nn.Module, getter) -> str | None:
    if getter is None:
        return None
    try:
        target = getter()
    except (NotImplementedError, AttributeError, TypeError):
        return None
    if not isinstance(target, nn.Module):
        return None
    return next((p for p, m in model.named_modules() if m is target and p), None)
