"""Prefix tuning (Li & Liang, 2021): learned key/value vectors in front of every attention's keys and values.

How the prefix enters the data flow, without the ``past_key_values`` API (which BERT-style
encoders no longer accept under transformers 5): every transformers-5 attention module hands its
fresh keys and values, already split into heads and rotated, to ``cache.update(k, v, layer_idx)``
and attends over what that returns. A *before* delta on the attention module passes it a
:class:`~.cache.PrefixedCache` instead of its cache: the view forwards ``update`` to the real cache (if
any) and puts the prefix in front of what comes back, and the attention mask is padded with
"attend" entries for the prefix on the key axis. So

* the real cache never holds the prefix: each call adds it once, in front of the cached keys,
  and cached decoding gives the same tokens as recomputing everything;
* prefix keys carry no rotary rotation (they join after it) and real tokens keep their positions;
  to the attention module they look like ``prefix_token_num`` entries already in its cache (T5's
  relative position bias therefore treats them as the positions just before the first token);
* a padded row is still masked where it was, and prefixes are visible to every query.

Attentions with no cache (ViT, DistilBERT, ALBERT, ModernBERT, ... under transformers 5) hand
their keys and values to the attention function that ``config._attn_implementation`` names,
passing on their ``**kwargs``. For those, the attention module gets a config view whose
``_attn_implementation`` names :func:`~.attention.prefixed_attention` (registered once with transformers'
``AttentionInterface``; the rest of the config is the real one), and the *before* delta adds
itself to the call's keyword arguments. The function puts the prefix in front of the keys and
values, extends the mask (and any additive bias over the keys), and calls the real
implementation. Detaching gives the module its own config object back.

An additive bias that an attention receives over its key axis (BLOOM's and Falcon's ``alibi``,
a ``position_bias`` handed to the attention function) gets ``0`` for the prefix entries: for
ALiBi that is the value of the first real token, so the prefix is placed at the start of the
text (where a prefix is) whatever the padding, and the real tokens' biases are unchanged.

The parts: :mod:`.model` (the method: config, layer, PrefixModel), :mod:`.cache` (the cache
view), :mod:`.attention` (the attention-function glue), :mod:`.masks` (mask and bias extension),
:mod:`.binding` (how each attention module is called).
"""

from opendelta.methods.prefix.attention import AttentionConfigView, prefixed_attention
from opendelta.methods.prefix.cache import PrefixedCache
from opendelta.methods.prefix.masks import extend_bias, extend_mask
from opendelta.methods.prefix.model import KeyValueObservation, PrefixConfig, PrefixLayer, PrefixModel

__all__ = [
    "AttentionConfigView",
    "KeyValueObservation",
    "PrefixConfig",
    "PrefixLayer",
    "PrefixModel",
    "PrefixedCache",
    "extend_bias",
    "extend_mask",
    "prefixed_attention",
]
