"""``speechssl prepare``: corpora -> CutSet manifests, the mini corpus, and manifest validation."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from speechssl.cli.common import add_command

log = logging.getLogger("speechssl.prepare")

CORPUS_NAMES = ("librispeech", "librilight", "voxceleb1", "iemocap", "speechcommands", "musan", "mlsuperb")
SYNTHETIC = ("mini", "mini-multilingual")  # corpora synthesised into OUT_DIR (no CORPUS_DIR)

EXAMPLES = """examples:
  speechssl prepare mini data/mini --minutes 15 --seed 0
  speechssl prepare mini-multilingual data/mini_multilingual --minutes 6   # 12 languages, ML-SUPERB's splits
  speechssl prepare librispeech /corpora/LibriSpeech data/librispeech --num-jobs 8
  # + phones for PR (supervision.custom.phones) from OpenSLR 11's lexicon, which you download yourself
  speechssl prepare librispeech /corpora/LibriSpeech data/librispeech \
      --lexicon /corpora/LibriSpeech/librispeech-lexicon.txt [--oov error] [--keep-stress]
  speechssl prepare librilight /corpora/librilight data/librilight --parts small
  speechssl prepare voxceleb1 /corpora/VoxCeleb1 data/voxceleb1      # needs veri_test2.txt, iden_split.txt there
  speechssl prepare iemocap /corpora/IEMOCAP_full_release data/iemocap --fold 1
  speechssl prepare speechcommands /corpora/speech_commands data/speechcommands --version 1
  speechssl prepare musan /corpora/musan data/musan
  speechssl prepare mlsuperb /corpora/ml_superb data/mlsuperb          # SOURCE/LANG/transcript_*.txt + wav/
  speechssl prepare validate data/mini                  # counts/hours per split; exit 1 on a bad cut
  speechssl prepare validate data/mini --decode         # also decode all audio (finds NaN/Inf, decode errors)
  speechssl prepare validate data/mini --skip-bad       # drop bad cuts (originals kept as cuts_X.orig.jsonl.gz)

Outputs OUT_DIR/cuts_SPLIT.jsonl.gz per split. `validate` checks every cuts_*.jsonl.gz in DIR: audio files
present and complete, durations, and the fields each task needs (asr_*: text, sid_/asv_*: speaker, er_*:
emotion, ks_*: keyword, ml_*: text), plus that asv_trials.txt names existing cuts. Without --decode only the headers are
read (sample rate, channels, frame count against the manifest); NaN/Inf samples and decoding errors need
--decode. DIR/validation.json lists every dropped cut id by reason.
"""

# fields a split needs, by name prefix
REQUIRED_BY_PREFIX = {"asr_": ["text"], "sid_": ["speaker"], "asv_": ["speaker"], "er_": ["emotion"],
                      "ks_": ["keyword"], "ml_": ["text"]}


# corpus option -> (argparse dest, value -> option); a flag left out passes nothing, so the preparer's own default
# applies, and a flag its corpus does not take is refused (the preparers' keyword-only parameters say which)
CORPUS_FLAGS = {
    "minutes": ("minutes", float),
    "seed": ("seed", int),
    "num_jobs": ("num_jobs", int),
    "parts": ("parts", lambda v: v.split(",")),
    "version": ("version", str),
    "fold": ("fold", int),
    "max_segment": ("max_segment", float),
    "lexicon": ("lexicon", list),
    "strip_stress": ("keep_stress", lambda keep: not keep),
    "oov": ("oov", str),
    "max_duration": ("max_duration", float),
}


def _flag(option: str) -> str:
    return "--" + CORPUS_FLAGS.get(option, (option,))[0].replace("_", "-")


def register(subparsers) -> None:
    p = add_command(
        subparsers, "prepare", run, examples=EXAMPLES,
        help="prepare corpus manifests (Lhotse CutSets), synthesise the mini corpus, validate",
        description="Prepare CutSet manifests: `prepare CORPUS CORPUS_DIR OUT_DIR`, `prepare mini OUT_DIR`, "
                    "or `prepare validate DIR`. A corpus option its corpus does not take is an error.")
    p.add_argument("corpus", choices=SYNTHETIC + ("validate",) + CORPUS_NAMES, metavar="CORPUS",
                   help="one of: " + ", ".join(SYNTHETIC + ("validate",) + CORPUS_NAMES))
    p.add_argument("paths", nargs="+", metavar="DIR", help="CORPUS_DIR OUT_DIR (mini, mini-multilingual: OUT_DIR; validate: DIR)")
    _add_corpus_args(p)
    p.add_argument("--check", action="store_true", help="validate the manifests after preparing them")
    _add_validate_args(p)


def _add_corpus_args(p) -> None:
    p.add_argument("--minutes", type=float, help="mini: minutes of read sentences (pretrain/ASR/SID/ASV pools; "
                                                 "ER and KS clips grow with it; default 15); mini-multilingual: "
                                                 "minutes of ml_train_1h over all languages (default 6)")
    p.add_argument("--seed", type=int, help="mini, mini-multilingual: random seed; iemocap: dev split seed (default 0)")
    p.add_argument("--num-jobs", type=int,
                   help="mini, mini-multilingual, librispeech, librilight, voxceleb1: parallel jobs (default 2)")
    p.add_argument("--max-duration", type=float,
                   help="mlsuperb: longest training utterance in seconds (default 20, the benchmark's)")
    p.add_argument("--parts", help="librispeech/librilight/musan: comma-separated parts (default: all found)")
    p.add_argument("--version", help="speechcommands: dataset version (1 = v0.01, SUPERB KS; the default)")
    p.add_argument("--fold", type=int, help="iemocap: test session of the written fold (1..5, default 1)")
    p.add_argument("--max-segment", type=float, help="librilight: longest cut in seconds (default 30)")
    p.add_argument("--lexicon", action="append", metavar="PATH",
                   help="librispeech: pronunciation lexicon (OpenSLR 11 librispeech-lexicon.txt format) to add "
                        "supervision.custom.phones for PR; repeatable, the first pronunciation of a word wins")
    p.add_argument("--keep-stress", action="store_true", default=None,
                   help="librispeech --lexicon: keep ARPAbet stress digits (AH0, AH1 ...); by default they are "
                        "stripped (39 phones)")
    p.add_argument("--oov", choices=("skip", "error"),
                   help="librispeech --lexicon: a cut with a word missing from the lexicon is skipped and counted "
                        "(skip, the default) or is an error")


def _add_validate_args(p) -> None:
    p.add_argument("--skip-bad", action="store_true",
                   help="validate: drop bad cuts and report counts instead of failing; each changed manifest is "
                        "rewritten and its original kept as cuts_SPLIT.orig.jsonl.gz")
    p.add_argument("--decode", action="store_true",
                   help="validate: decode all audio (slow); without it only headers are read, so NaN/Inf samples "
                        "and decoding errors go unnoticed")
    p.add_argument("--min-duration", type=float, default=0.025, help="validate: shortest acceptable cut (s)")
    p.add_argument("--require", action="append", default=[], metavar="FIELD",
                   help="validate: a field every cut must have (repeatable), in addition to the split defaults")


def _need(args, n: int, usage: str) -> list[str]:
    if len(args.paths) != n:
        print(f"speechssl prepare {args.corpus}: expected {usage}, got {' '.join(args.paths)}", file=sys.stderr)
        raise SystemExit(2)
    return args.paths


def _options_given(args) -> dict:
    """The preparer options the command line sets (only the flags given)."""
    opts = {}
    for option, (dest, convert) in CORPUS_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            opts[option] = convert(value)
    return opts


def _validate(args, d) -> int:
    return validate_dir(d, skip_bad=args.skip_bad, decode=args.decode, min_duration=args.min_duration,
                        extra_require=args.require)


def run(args) -> int:
    from speechssl.data.corpora.prepare import UnsupportedOptionError

    opts = _options_given(args)
    try:
        if args.corpus == "validate":
            (d,) = _need(args, 1, "DIR")
            if opts:
                raise UnsupportedOptionError("validate", list(opts), [])
            return _validate(args, d)
        if args.corpus in SYNTHETIC:
            (out_dir,) = _need(args, 1, "OUT_DIR")
            _prepare_mini(args.corpus, out_dir, opts)
        else:
            corpus_dir, out_dir = _need(args, 2, "CORPUS_DIR OUT_DIR")
            rc = _prepare_corpus(args.corpus, corpus_dir, out_dir, opts)
            if rc:
                return rc
    except UnsupportedOptionError as e:
        print(f"speechssl prepare {args.corpus}: {', '.join(map(_flag, e.unsupported))} does not apply to "
              f"{args.corpus}; its options: {' '.join(_flag(o) for o in e.supported if o in CORPUS_FLAGS) or 'none'}",
              file=sys.stderr)
        return 2
    return _validate(args, out_dir) if args.check or args.skip_bad else 0


def _prepare_mini(name: str, out_dir, opts: dict) -> None:
    from speechssl.data.corpora.prepare import check_options

    # the synthesisers are heavy: import on use
    if name == "mini":
        from speechssl.data.corpora.mini import prepare_mini as prepare
    else:
        from speechssl.data.corpora.mini_multilingual import prepare_mini_multilingual as prepare
    check_options(name, prepare, opts)
    prepare(out_dir, **opts)


def _prepare_corpus(name: str, corpus_dir, out_dir, opts: dict) -> int:
    from speechssl.data.corpora.prepare import UnsupportedOptionError, prepare_corpus

    try:
        prepare_corpus(name, corpus_dir, out_dir, **opts)
    except UnsupportedOptionError:  # a ValueError too: run() words it with the command line's flags
        raise
    except (FileNotFoundError, ValueError) as e:
        print(f"speechssl prepare {name}: {e}", file=sys.stderr)
        return 1
    if opts.get("lexicon"):
        _print_lexicon_report(Path(out_dir) / "lexicon_report.json")
    return 0


def _print_lexicon_report(path: Path) -> None:
    import json

    rep = json.loads(path.read_text())
    for part, r in rep["parts"].items():
        line = f"{part}: phones for {r['cuts'] - r['skipped']} of {r['cuts']} cuts"
        if r["skipped"]:
            line += (f"; {r['skipped']} skipped, {len(r['oov_words'])} words missing from the lexicon, e.g. "
                     + " ".join(list(r["oov_words"])[:8]))
        print(line)
    print(f"{len(rep['phones'])} phone symbols; details in {path}")


def validate_dir(d, *, skip_bad: bool = False, decode: bool = False, min_duration: float = 0.025,
                 extra_require=()) -> int:
    """Validate every ``cuts_*.jsonl.gz`` in ``d``; print a table; write ``d/validation.json``.

    With ``skip_bad`` a manifest that lost cuts is rewritten and its original kept as
    ``cuts_SPLIT.orig.jsonl.gz`` (never overwritten: a second run keeps the first original). ``validation.json``
    holds each split's report with every dropped cut id (``dropped_ids``) and, when rewritten, ``original``.
    Returns 0 when every cut is good (or ``skip_bad``), 1 otherwise.
    """
    from speechssl.data.audio import BadCutError, summarize
    from speechssl.utils.io import atomic_write_json

    d = Path(d)
    files = sorted(f for f in d.glob("cuts_*.jsonl.gz") if not f.name.endswith(ORIG_SUFFIX))
    if not files:
        print(f"speechssl prepare validate: no cuts_*.jsonl.gz in {d}", file=sys.stderr)
        return 1
    reports, failed, ids_by_split = [], False, {}
    for f in files:
        split = f.name[len("cuts_"): -len(".jsonl.gz")]
        try:
            kept, report = _validate_file(f, split, skip_bad=skip_bad, decode=decode, min_duration=min_duration,
                                          extra_require=extra_require)
        except BadCutError as e:
            print(f"{f}: {e}", file=sys.stderr)
            failed = True
            continue
        reports.append((split, report))
        ids_by_split[split] = {c.id for c in kept}
    if (d / "asv_trials.txt").is_file() and "asv_test" in ids_by_split:
        failed |= not _check_trials(d / "asv_trials.txt", ids_by_split["asv_test"])
    print(summarize(reports))
    if not decode:
        print(f"note: {_header_note()}")
    out = {split: r for split, r in reports}
    atomic_write_json(d / "validation.json", out)
    return 1 if failed else 0


ORIG_SUFFIX = ".orig.jsonl.gz"


def _header_note() -> str:
    from speechssl.data.audio import HEADER_ONLY_NOTE

    return f"{HEADER_ONLY_NOTE} (speechssl prepare validate --decode)"


def _validate_file(f: Path, split: str, *, skip_bad: bool, decode: bool, min_duration: float, extra_require):
    """Validate one manifest (the fields its split needs plus ``extra_require``): (kept cuts, report); with
    ``skip_bad`` a manifest that lost cuts is rewritten (:func:`_rewrite_keeping_original`)."""
    from lhotse import CutSet

    from speechssl.data.audio import validate_cuts

    require = [r for pre, req in REQUIRED_BY_PREFIX.items() if split.startswith(pre) for r in req]
    require += list(extra_require)
    kept, report = validate_cuts(CutSet.from_file(f), require=require, min_duration=min_duration, skip_bad=skip_bad,
                                 decode=decode, desc=f"validating {split}")
    report["require"] = require
    if not decode:
        report["note"] = _header_note()
    if skip_bad and report["skipped"]:
        report["original"] = str(_rewrite_keeping_original(f, kept))
        log.warning("%s: removed %d bad cuts %s; the original is %s", f, sum(report["skipped"].values()),
                    report["skipped"], report["original"])
    return kept, report


def _check_trials(trials: Path, known: set) -> bool:
    """Whether every line of ``trials`` is ``1|0 CUT CUT`` with both cuts in ``known`` (asv_test); prints either
    the count or the first bad line."""
    lines = [line.split() for line in trials.read_text().splitlines() if line.strip()]
    bad = [t for t in lines if len(t) != 3 or t[0] not in ("0", "1") or t[1] not in known or t[2] not in known]
    if bad:
        print(f"{trials}: {len(bad)} of {len(lines)} trials are malformed or name cuts not in asv_test, "
              f"e.g. {' '.join(bad[0])}", file=sys.stderr)
        return False
    print(f"asv_trials.txt: {len(lines)} trials ({sum(t[0] == '1' for t in lines)} target)")
    return True


def _rewrite_keeping_original(f: Path, kept) -> Path:
    """Write ``kept`` over manifest ``f``; first copy ``f`` to ``cuts_SPLIT.orig.jsonl.gz`` unless that exists
    (an earlier --skip-bad run's copy is the true original). The copy lands before the rewrite, so a crash in
    between leaves both files whole."""
    import shutil

    from speechssl.data.corpora.prepare import write_cuts
    from speechssl.utils.io import atomic_write

    orig = f.with_name(f.name[: -len(".jsonl.gz")] + ORIG_SUFFIX)
    if not orig.exists():
        atomic_write(orig, lambda tmp: shutil.copyfile(f, tmp))
    write_cuts(kept, f)
    return orig
