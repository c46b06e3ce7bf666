"""The ``speechssl`` command: a thin argparse layer over the library, one module per subcommand.

Each module in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed args and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> module; the order is the order `speechssl --help` lists them in.
COMMANDS = {
    "prepare": "speechssl.cli.prepare",
    "export-shar": "speechssl.cli.export_shar",
    "kmeans": "speechssl.cli.kmeans",
    "label": "speechssl.cli.label",
    "pretrain": "speechssl.cli.pretrain",
    "distill": "speechssl.cli.distill",
    "prune": "speechssl.cli.prune",
    "superb": "speechssl.cli.superb",
    "report": "speechssl.cli.report",
    "profile": "speechssl.cli.profile",
    "export": "speechssl.cli.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechssl",
        description="Self-supervised speech: prepare data, pretrain, compress and score SUPERB-style.",
        epilog="Run `speechssl COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real missing dependency, not a command still being written
                raise
            continue
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from speechssl.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"speechssl {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
