"""``opendelta`` / ``python -m opendelta``: the command-line entry point."""

from __future__ import annotations

import argparse
import importlib
import sys

# each module in opendelta.commands exposes register(subparsers) and run(args) -> int
COMMANDS = ("convert", "demo", "inspect", "select", "structure")


def main(argv: list[str] | None = None) -> int:
    from opendelta.utils.logging import quiet_known_import_noise

    quiet_known_import_noise()
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
