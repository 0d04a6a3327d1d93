"""``opendelta`` / ``python -m opendelta``: the command-line entry point."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# each module in opendelta.commands exposes register(subparsers) and run(args) -> int
COMMANDS = ("convert", "demo", "inspect", "select", "structure")


#: loggers whose import-time warnings concern nothing a command uses: transformers imports torchao
#: whenever it is installed, and torchao then reports its CUDA / other-Python kernels that cannot load on
#: this interpreter and registers enums that torch calls deprecated (four lines on every load)
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(prog="opendelta", description="Plug-and-play delta tuning.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name in COMMANDS:
        module = importlib.import_module(f"opendelta.commands.{name}")
        module.register(subparsers)
        runners[name] = module.run
    args = parser.parse_args(argv)
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
