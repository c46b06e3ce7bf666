"""Arguments shared by the experiment commands (pretrain, distill, prune, superb)."""
from __future__ import annotations

import argparse


def add_experiment_args(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see conf/)")
    parser.add_argument("--out", required=True, help="experiment directory to write")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")


def experiment_config(cls, args):
    """Load ``args.config`` into dataclass ``cls`` with ``args.overrides`` applied."""
    from speechssl.config import load_config

    return load_config(cls, args.config, args.overrides)


EXAMPLES_FORMATTER = argparse.RawDescriptionHelpFormatter
