"""The CLI's and benchmarks' filter for torchao's known import warnings drops exactly those records."""

from __future__ import annotations

import enum
import logging

from opendelta.utils.logging import _KnownImportNoise

KERNEL = "/venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"
CUTLASS = "/venv/lib/python3.11/site-packages/torchao/_C_cutlass_90a.abi3.so"
ENUM_MSG = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def _enum_from(module: str) -> type:
    made = enum.Enum("KernelPreference", "AUTO")
    made.__module__ = module
    return made


def test_drops_only_the_optional_kernel_and_enum_notices_of_torchao() -> None:
    keep = _KnownImportNoise().filter
    assert not keep(_record("torchao", f"Failed to load {KERNEL}: Could not load this library: {KERNEL}"))
    assert not keep(_record("torchao", f"Failed to load {CUTLASS}: Could not load this library: {CUTLASS}"))
    assert not keep(_record("torch.utils._pytree", ENUM_MSG, _enum_from("torchao.quantization.quantize_.common")))
    # torchao's main extension failing, other torchao warnings, another package's enum: all still shown
    main = KERNEL.replace("_C_mxfp8", "_C")
    assert keep(_record("torchao", f"Failed to load {main}: Could not load this library: {main}"))
    assert keep(_record("torchao", "Skipping import of cpp extensions due to incompatible torch version."))
    assert keep(_record("torch.utils._pytree", ENUM_MSG, _enum_from("mypackage.kinds")))
    assert keep(_record("opendelta", f"Failed to load {KERNEL}: x"))
