"""The original OpenDelta's backbone hash: MD5 of the model's printed structure and tensor bytes.

opendelta's checkpoints use a cheaper structural fingerprint (:func:`opendelta.checkpoint.backbone_fingerprint`);
this is kept for scripts that compare hashes themselves. Unlike the original it works for bf16.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def gen_parameter_hash(generator: Iterable[torch.Tensor], md5: Any = None) -> Any:
    """Update (or start) an MD5 with the bytes of every tensor of `generator`."""
    md5 = hashlib.md5() if md5 is None else md5
    for tensor in generator:
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        md5.update(data.view(torch.uint8).numpy().tobytes())
    return md5


def gen_model_hash(model: nn.Module, with_parameters: bool = True) -> str:
    """MD5 of `model`'s printed structure (whitespace removed) and, with `with_parameters`, its parameters."""
    md5 = hashlib.md5("".join(str(model).split()).encode("utf-8"))
    if with_parameters:
        md5 = gen_parameter_hash(model.parameters(), md5=md5)
    return md5.hexdigest()
