"""What the experiment commands share: their arguments, and the checks that run before anything is built or written.

Every command that writes an experiment directory (``OUTPUTS``) goes through ``OutDir``: the directory is checked
before any model is built (not under a regular file, writable, and holding no earlier run unless ``--resume`` or
``--overwrite`` says what to do with it), and ``--overwrite`` clears the earlier run only once the command's own
inputs are validated (``claim_out``). A command that fails its checks in a directory it created removes it again.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from speechssl.config import ConfigError, ExperimentError

log = logging.getLogger("speechssl.cli")

# command -> (attribute of the parsed args holding its output directory, how the user spelt it, can it --resume,
# does it validate a --config and then call claim_out itself); main.py applies the rest
OUTPUTS = {
    "pretrain": ("out", "--out", True, True),
    "distill": ("out", "--out", True, True),
    "oskdft": ("out", "--out", True, True),
    "prune": ("out", "--out", True, True),
    "superb": ("out", "--out", True, True),
    "kmeans": ("out", "--out", False, False),
    "export": ("out_dir", "OUT_DIR", False, False),
}
# Entries an experiment command leaves behind that make a directory hold a run: a checkpoint, a final model,
# results, k-means centres or an exported model. Anything else (a k-means or profile folder a recipe nests inside
# the experiment, notes) belongs to someone else and is neither a reason to refuse nor cleared by --overwrite.
RUN_ENTRIES = ("checkpoints", "final", "results.json", "trials", "stage1", "pruned", "kmeans.json",
               "kmeans.safetensors", "model.safetensors", "model.safetensors.index.json", "parts.safetensors")
# written along with a run but, alone, what a run that failed before its first checkpoint leaves: not a run (a new
# run may start there), yet cleared by --overwrite with the rest
SIDE_ENTRIES = ("config.yaml", "config.json", "metrics.jsonl", "tb", "labels", "preprocessor_config.json",
                "features.f32", ".tmp-final", ".old-final")

EXAMPLES_FORMATTER = argparse.RawDescriptionHelpFormatter
"""Keeps a command's examples (its epilog) as written."""


def add_command(subparsers, name: str, run: Callable, *, help: str, description: str,
                examples: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: ``examples`` as its epilog, ``run(args) -> exit code`` as its ``func``."""
    p = subparsers.add_parser(name, help=help, description=description, epilog=examples,
                              formatter_class=EXAMPLES_FORMATTER)
    p.set_defaults(func=run)
    return p


def add_experiment_command(subparsers, name: str, run: Callable, **kwargs) -> argparse.ArgumentParser:
    """:func:`add_command` with the experiment arguments (``--config``, ``--out``, ``--set``, ``--resume``); main.py
    adds ``--overwrite`` to every command in ``OUTPUTS``."""
    p = add_command(subparsers, name, run, **kwargs)
    add_experiment_args(p)
    return p


def add_experiment_args(parser: argparse.ArgumentParser, *, resume: bool = True, several_configs: bool = False,
                        resume_help: str = "continue from the latest checkpoint in --out",
                        schedule_change: bool = True) -> None:
    """``--config`` (repeatable with ``several_configs``: a list), ``--out``, ``--set KEY=VALUE`` (into
    ``args.overrides``) and, with ``resume``, ``--resume`` (and ``--allow-schedule-change`` when the command's
    config has ``trainer.allow_schedule_change``)."""
    if several_configs:
        parser.add_argument("--config", required=True, action="append",
                            help="YAML config (see conf/); repeat it to run several, each into OUT/NAME")
    else:
        parser.add_argument("--config", required=True, help="YAML config (see conf/)")
    parser.add_argument("--out", required=True, help="experiment directory to write")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    if resume:
        parser.add_argument("--resume", action="store_true", help=resume_help)
    if resume and schedule_change:
        parser.add_argument("--allow-schedule-change", action="store_true",
                            help="with --resume: accept a trainer.max_steps, optim.lr or schedule that differs from "
                                 "the checkpoint's (the lr curve changes from the resumed step on)")


def exits_on(*errors: type[Exception], code: int = 2):
    """Decorate a command's ``run(args)``: one of ``errors`` from the library becomes one line on stderr
    (``speechssl COMMAND: message``) and exit code ``code``, instead of a traceback."""

    def wrap(run: Callable) -> Callable:
        @functools.wraps(run)
        def guarded(args) -> int:
            try:
                return run(args)
            except errors as e:
                print(f"speechssl {args.command}: {e}", file=sys.stderr)
                return code

        return guarded

    return wrap


def add_overwrite_arg(parser: argparse.ArgumentParser, flag: str = "--out") -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"{flag} may hold an earlier run: delete its files (checkpoints, final model, results, "
                             "metrics) and start again; other folders in it stay")


def experiment_config(cls, args):
    """Load ``args.config`` into dataclass ``cls`` with ``args.overrides`` applied, check the inputs it names, and
    only then let ``--overwrite`` clear the earlier run in ``args.out``."""
    from speechssl.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "allow_schedule_change", False):
        overrides.append("trainer.allow_schedule_change=true")
    cfg = load_config(cls, args.config, overrides)
    check_inputs(cfg)
    claim_out(args)
    return cfg


# ------------------------------------------------------------------------------------------- the output directory
def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_entries(d: Path) -> list[str]:
    """The names in ``d`` that show an earlier run (empty when ``d`` is missing, empty or holds none)."""
    return [n for n in RUN_ENTRIES if (d / n).exists()] if d.is_dir() else []


@dataclass
class OutDir:
    """One command's output directory and what the user said about an earlier run in it."""

    path: Path
    flag: str = "--out"
    resume: bool = False
    overwrite: bool = False
    can_resume: bool = True

    def __post_init__(self):
        self.path = Path(self.path)
        self.existed = self.path.exists()  # a directory this command creates is removed again if its checks fail
        self.claimed = False

    def check(self) -> None:
        """Read-only: refuse an output under a regular file or not writable, and an earlier run in it unless
        --resume or --overwrite says what to do with it."""
        if self.resume and self.overwrite:
            raise ExperimentError(f"--resume and --overwrite exclude each other: continue the run in {self.path} "
                                  "or clear it, not both")
        anc = self.path
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise ExperimentError(f"{self.flag} {self.path}: {anc} is a regular file, not a directory; choose another "
                                  f"{self.flag} or move the file away")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise ExperimentError(f"{self.flag} {self.path}: {anc} is not writable; choose another {self.flag} or fix "
                                  "its permissions")
        found = run_entries(self.path)
        if found and not (self.resume or self.overwrite):
            ways = ("pass --resume to continue it, or --overwrite to delete it and start again" if self.can_resume
                    else "pass --overwrite to replace it, or choose another " + self.flag)
            raise ExperimentError(f"{self.flag} {self.path} already holds a run ({', '.join(found)}): {ways}")

    def claim(self) -> None:
        """After the command's inputs are validated: with --overwrite, delete the earlier run's files (rank 0)."""
        if self.claimed:
            return
        self.claimed = True
        if not (self.overwrite and _rank0() and self.path.is_dir()):
            return
        gone = [n for n in RUN_ENTRIES + SIDE_ENTRIES if (self.path / n).exists() or (self.path / n).is_symlink()]
        for name in gone:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if gone:
            log.warning("--overwrite: deleted the earlier run in %s (%s)", self.path, ", ".join(gone))

    def discard_if_new(self) -> None:
        """A command whose checks failed leaves no directory it created behind (unless a run started there)."""
        if self.existed or not _rank0() or not self.path.is_dir():
            return
        if run_entries(self.path) or any(run_entries(c) for c in self.path.iterdir() if c.is_dir()):
            return
        shutil.rmtree(self.path, ignore_errors=True)


def out_dir_of(args) -> OutDir | None:
    """The checked output directory of a parsed command line (None for commands that write none); main.py calls
    this before the command runs, so an unusable --out is reported before any model is built."""
    spec = OUTPUTS.get(getattr(args, "command", None))
    if spec is None or getattr(args, spec[0], None) is None:
        return None
    attr, flag, can_resume, _ = spec
    guard = OutDir(Path(getattr(args, attr)), flag, bool(getattr(args, "resume", False)),
                   bool(getattr(args, "overwrite", False)), can_resume)
    guard.check()
    args.out_guard = guard
    return guard


def out_dir_for(args, path: str | os.PathLike) -> OutDir:
    """The checked OutDir of ``path``: the command's own, or another one it writes (a superb task's OUT/TASK)
    under the same --resume / --overwrite."""
    guard: OutDir | None = getattr(args, "out_guard", None)
    if guard is not None and Path(path) == guard.path:
        return guard
    sub = OutDir(Path(path), "--out", bool(getattr(args, "resume", False)), bool(getattr(args, "overwrite", False)))
    sub.check()
    return sub


def claim_out(args) -> None:
    """Let --overwrite clear the command's output directory, now that its inputs are validated."""
    guard: OutDir | None = getattr(args, "out_guard", None)
    if guard is not None:
        guard.claim()


def check_arg_inputs(args) -> None:
    """The inputs named on the command line of the commands without a --config (kmeans, export)."""
    if args.command == "export":
        check_model_path(args.model, "MODEL", ExperimentError)
    elif args.command == "kmeans":
        if not Path(args.cuts).is_file():
            raise ExperimentError(f"--cuts {args.cuts} does not exist; write it with speechssl prepare or check "
                                  "the path")
        if args.feature not in ("mfcc", "mfcc_cmvn") and Path(args.feature).exists():
            check_model_path(args.feature, "--feature", ExperimentError)


# ------------------------------------------------------------------------------------------------- the inputs
# config keys that name a model to load -> the spellings besides a path that they accept
MODEL_KEYS = {"model.init_from": "", "teacher": ", or preset:NAME", "student.init": "",
              "upstream": ", or fbank, mfcc, random:PRESET_OR_MODEL"}
NOT_PATHS = ("fbank", "mfcc")
NOT_PATH_PREFIXES = ("random:", "preset:")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
        if cfg is None:
            return None
    return cfg


def check_model_path(path: str, what: str, error: type[ConfigError] = ConfigError, also: str = "") -> None:
    """``path`` (a model directory, a .safetensors or a fairseq .pt) exists and its safetensors weights are whole;
    ``error`` naming ``what`` (a config key or argument) otherwise."""
    from speechssl.train.checkpoint import safetensors_problem

    p = Path(path)
    if not p.exists():
        raise error(f"{what}: {path} does not exist (expected a model directory, an HF directory or a fairseq "
                    f".pt{also}); check the path or run the stage that writes it")
    files = [p] if p.suffix == ".safetensors" else []
    if p.is_dir():
        files = [p / "model.safetensors"] if (p / "model.safetensors").is_file() else []
        index = p / "model.safetensors.index.json"
        if not files and index.is_file():
            import json

            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, AttributeError) as e:
                raise error(f"{what}: {index} is unreadable ({type(e).__name__}); copy the model again") from None
            files = [p / s for s in sorted(shards)]
        if (p / "parts.safetensors").is_file():
            files.append(p / "parts.safetensors")
    for f in files:
        why = safetensors_problem(f)
        if why is not None:
            raise error(f"{what}: {why}; export or copy the model again")


def check_inputs(cfg) -> None:
    """What a config names that is cheap to check before anything is built: the models it loads (present and
    whole), the SUPERB manifest directory, and that the unit labels fit objective.kwargs.num_classes."""
    for key, also in MODEL_KEYS.items():
        value = _get(cfg, key)
        if isinstance(value, str) and value and value not in NOT_PATHS and not value.startswith(NOT_PATH_PREFIXES):
            check_model_path(value, f"config key '{key}'", also=also)
    manifest_dir = _get(cfg, "data.manifest_dir")
    if isinstance(manifest_dir, str) and not Path(manifest_dir).is_dir():
        raise ConfigError(f"config key 'data.manifest_dir': {manifest_dir} is not a directory; prepare the corpus "
                          "(speechssl prepare ...) or set data.manifest_dir to where its cuts_*.jsonl.gz are")
    check_unit_ids(cfg)


def check_unit_ids(cfg, max_cuts: int = 50) -> None:
    """The unit ids on the first ``max_cuts`` training cuts are below objective.kwargs.num_classes (a k-means
    with more clusters than the config says fails here, not after the model is built)."""
    nc = (_get(cfg, "objective.kwargs") or {}).get("num_classes")
    units, train = _get(cfg, "data.units"), _get(cfg, "data.train")
    if nc is None or not units or not train:
        return
    from itertools import islice

    from lhotse import CutSet

    from speechssl.data.labels import load_units
    from speechssl.models.objectives.hubert import normalize_num_classes

    try:
        ks = normalize_num_classes(nc)
    except ValueError as e:
        raise ConfigError(f"config key 'objective.kwargs.num_classes': {e}") from None
    for manifest in train:
        if not Path(manifest).is_file():
            continue  # the data loader reports a missing manifest by its key
        for cut in islice(CutSet.from_jsonl_lazy(manifest), max_cuts):
            for name, k in ks.items():
                try:
                    top = int(load_units(cut, name).max(initial=-1))
                except KeyError:  # a cut without this label set: the data loader names it
                    continue
                if top >= k:
                    raise ConfigError(
                        f"config key 'objective.kwargs.num_classes': label set '{name}' has unit id {top} on cut "
                        f"{cut.id} ({manifest}), outside [0, {k}); set it to the K of the k-means that labelled "
                        "the cuts (n_clusters in KM_DIR/kmeans.json)")
