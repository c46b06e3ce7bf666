"""The ``speechssl`` command: a thin argparse layer over the library, one module per subcommand.

Each module in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed args and returning an exit code. Commands that write an experiment directory
(``speechssl.cli.common.OUTPUTS``) get ``--overwrite`` here, and their output directory is checked before they run.
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
    "extract": "speechssl.cli.extract",
    "pretrain": "speechssl.cli.pretrain",
    "distill": "speechssl.cli.distill",
    "prune": "speechssl.cli.prune",
    "oskdft": "speechssl.cli.oskdft",
    "superb": "speechssl.cli.superb",
    "score-embeddings": "speechssl.cli.score_embeddings",
    "report": "speechssl.cli.report",
    "profile": "speechssl.cli.profile",
    "analyze": "speechssl.cli.analyze",
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
    from speechssl.cli.common import OUTPUTS, add_overwrite_arg

    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real missing dependency, not a command still being written
                raise
            continue
        mod.register(sub)
        if name in OUTPUTS and name in sub.choices:
            add_overwrite_arg(sub.choices[name], OUTPUTS[name][1])
    return parser


def _run_command(args) -> int:
    """Check the output directory (before any model is built), run the command, and remove a directory it
    created when it fails its checks (a ConfigError, or exit code 2)."""
    from speechssl.cli.common import OUTPUTS, check_arg_inputs, out_dir_of
    from speechssl.config import ConfigError

    guard = out_dir_of(args)
    try:
        if guard is not None and not OUTPUTS[args.command][3]:  # no --config to validate first: claim now
            check_arg_inputs(args)
            guard.claim()
        rc = int(args.func(args) or 0)
    except ConfigError:
        if guard is not None:
            guard.discard_if_new()
        raise
    if rc == 2 and guard is not None:
        guard.discard_if_new()
    return rc


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
    from speechssl.config import ConfigError, ExperimentError

    try:
        return _run_command(args)
    except ConfigError as e:
        kind = "" if isinstance(e, ExperimentError) else "config error: "
        print(f"speechssl {args.command}: {kind}{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
