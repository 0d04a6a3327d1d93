"""Run by test_distributed.py under torchrun: only rank 0 calls save_finetuned (a user error)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch.distributed as dist
from support.ecosystem_fixtures import tiny_bert

from opendelta import DistributedSaveError, LoraModel

TIMEOUT_S = 3.0

dist.init_process_group(backend="gloo")
out = Path(sys.argv[1])
model = tiny_bert()
delta = LoraModel(model, modified_modules=["query"])
if dist.get_rank() == 0:
    try:
        delta.save_finetuned(out / "delta", arrival_timeout_s=TIMEOUT_S)
        (out / "rank0.txt").write_text("saved")
    except DistributedSaveError as exc:
        (out / "rank0.txt").write_text(f"DistributedSaveError: {exc}")
else:
    time.sleep(TIMEOUT_S + 3)  # busy elsewhere, never reaching the save
dist.destroy_process_group()
