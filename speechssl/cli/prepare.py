"""``speechssl prepare``: corpora -> CutSet manifests, the mini corpus, and manifest validation."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from speechssl.cli.common import EXAMPLES_FORMATTER

log = logging.getLogger("speechssl.prepare")

CORPUS_NAMES = ("librispeech", "librilight", "voxceleb1", "iemocap", "speechcommands", "musan")

EXAMPLES = """examples:
  speechssl prepare mini data/mini --minutes 15 --seed 0
  speechssl prepare librispeech /corpora/LibriSpeech data/librispeech --num-jobs 8
  # + phones for PR (supervision.custom.phones) from OpenSLR 11's lexicon, which you download yourself
  speechssl prepare librispeech /corpora/LibriSpeech data/librispeech \
      --lexicon /corpora/LibriSpeech/librispeech-lexicon.txt [--oov error] [--keep-stress]
  speechssl prepare librilight /corpora/librilight data/librilight --parts small
  speechssl prepare voxceleb1 /corpora/VoxCeleb1 data/voxceleb1      # needs veri_test2.txt, iden_split.txt there
  speechssl prepare iemocap /corpora/IEMOCAP_full_release data/iemocap --fold 1
  speechssl prepare speechcommands /corpora/speech_commands data/speechcommands --version 1
  speechssl prepare musan /corpora/musan data/musan
  speechssl prepare validate data/mini                  # counts/hours per split; exit 1 on a bad cut
  speechssl prepare validate data/mini --decode         # also decode all audio (finds NaN/Inf, decode errors)
  speechssl prepare validate data/mini --skip-bad       # drop bad cuts (originals kept as cuts_X.orig.jsonl.gz)

Outputs OUT_DIR/cuts_SPLIT.jsonl.gz per split. `validate` checks every cuts_*.jsonl.gz in DIR: audio files
present and complete, durations, and the fields each task needs (asr_*: text, sid_/asv_*: speaker, er_*:
emotion, ks_*: keyword), plus that asv_trials.txt names existing cuts. Without --decode only the headers are
read (sample rate, channels, frame count against the manifest); NaN/Inf samples and decoding errors need
--decode. DIR/validation.json lists every dropped cut id by reason.
"""

# fields a split needs, by name prefix
REQUIRED_BY_PREFIX = {"asr_": ["text"], "sid_": ["speaker"], "asv_": ["speaker"], "er_": ["emotion"],
                      "ks_": ["keyword"]}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="prepare corpus manifests (Lhotse CutSets), synthesise the mini corpus, validate",
        description="Prepare CutSet manifests: `prepare CORPUS CORPUS_DIR OUT_DIR`, `prepare mini OUT_DIR`, "
                    "or `prepare validate DIR`.",
        epilog=EXAMPLES, formatter_class=EXAMPLES_FORMATTER)
    p.add_argument("corpus", choices=("mini", "validate") + CORPUS_NAMES, metavar="CORPUS",
                   help="one of: mini, validate, " + ", ".join(CORPUS_NAMES))
    p.add_argument("paths", nargs="+", metavar="DIR", help="CORPUS_DIR OUT_DIR (mini: OUT_DIR; validate: DIR)")
    p.add_argument("--minutes", type=float, default=15.0,
                   help="mini: minutes of read sentences (pretrain/ASR/SID/ASV pools); ER and KS clips grow with it")
    p.add_argument("--seed", type=int, default=0, help="mini: random seed; iemocap: dev split seed")
    p.add_argument("--num-jobs", type=int, default=2, help="parallel jobs")
    p.add_argument("--parts", default=None, help="librispeech/librilight/musan: comma-separated parts")
    p.add_argument("--version", default="1", help="speechcommands: dataset version (1 = v0.01, SUPERB KS)")
    p.add_argument("--fold", type=int, default=1, help="iemocap: test session of the written fold (1..5)")
    p.add_argument("--max-segment", type=float, default=30.0, help="librilight: longest cut in seconds")
    p.add_argument("--lexicon", action="append", default=[], metavar="PATH",
                   help="librispeech: pronunciation lexicon (OpenSLR 11 librispeech-lexicon.txt format) to add "
                        "supervision.custom.phones for PR; repeatable, the first pronunciation of a word wins")
    p.add_argument("--keep-stress", action="store_true",
                   help="librispeech --lexicon: keep ARPAbet stress digits (AH0, AH1 ...); by default they are "
                        "stripped (39 phones)")
    p.add_argument("--oov", choices=("skip", "error"), default="skip",
                   help="librispeech --lexicon: a cut with a word missing from the lexicon is skipped and counted "
                        "(default) or is an error")
    p.add_argument("--check", action="store_true", help="validate the manifests after preparing them")
    p.add_argument("--skip-bad", action="store_true",
                   help="validate: drop bad cuts and report counts instead of failing; each changed manifest is "
                        "rewritten and its original kept as cuts_SPLIT.orig.jsonl.gz")
    p.add_argument("--decode", action="store_true",
                   help="validate: decode all audio (slow); without it only headers are read, so NaN/Inf samples "
                        "and decoding errors go unnoticed")
    p.add_argument("--min-duration", type=float, default=0.025, help="validate: shortest acceptable cut (s)")
    p.add_argument("--require", action="append", default=[], metavar="FIELD",
                   help="validate: a field every cut must have (repeatable), in addition to the split defaults")
    p.set_defaults(func=run)


def _need(args, n: int, usage: str) -> list[str]:
    if len(args.paths) != n:
        print(f"speechssl prepare {args.corpus}: expected {usage}, got {' '.join(args.paths)}", file=sys.stderr)
        raise SystemExit(2)
    return args.paths


def run(args) -> int:
    if args.corpus == "mini":
        (out_dir,) = _need(args, 1, "OUT_DIR")
        from speechssl.data.corpora.mini import prepare_mini  # the synthesiser is heavy: import on use

        prepare_mini(out_dir, minutes=args.minutes, seed=args.seed, num_jobs=args.num_jobs)
        return validate_dir(out_dir, skip_bad=False) if args.check else 0
    if args.corpus == "validate":
        (d,) = _need(args, 1, "DIR")
        return validate_dir(d, skip_bad=args.skip_bad, decode=args.decode, min_duration=args.min_duration,
                            extra_require=args.require)
    corpus_dir, out_dir = _need(args, 2, "CORPUS_DIR OUT_DIR")
    from speechssl.data.corpora.prepare import prepare_corpus

    opts = {"num_jobs": args.num_jobs}
    if args.parts:
        opts["parts"] = args.parts.split(",")
    if args.corpus == "speechcommands":
        opts["version"] = args.version
    if args.corpus == "iemocap":
        opts.update(fold=args.fold, seed=args.seed)
    if args.corpus == "librilight":
        opts["max_segment"] = args.max_segment
    if args.lexicon:
        if args.corpus != "librispeech":
            print(f"speechssl prepare {args.corpus}: --lexicon applies to librispeech only", file=sys.stderr)
            return 2
        opts.update(lexicon=args.lexicon, strip_stress=not args.keep_stress, oov=args.oov)
    try:
        prepare_corpus(args.corpus, corpus_dir, out_dir, **opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"speechssl prepare {args.corpus}: {e}", file=sys.stderr)
        return 1
    if args.lexicon:
        _print_lexicon_report(Path(out_dir) / "lexicon_report.json")
    if args.check or args.skip_bad:
        return validate_dir(out_dir, skip_bad=args.skip_bad, decode=args.decode, min_duration=args.min_duration,
                            extra_require=args.require)
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
    from lhotse import CutSet

    from speechssl.data.audio import HEADER_ONLY_NOTE, BadCutError, summarize, validate_cuts
    from speechssl.utils.io import atomic_write_json

    d = Path(d)
    files = sorted(f for f in d.glob("cuts_*.jsonl.gz") if not f.name.endswith(ORIG_SUFFIX))
    if not files:
        print(f"speechssl prepare validate: no cuts_*.jsonl.gz in {d}", file=sys.stderr)
        return 1
    reports, failed, ids_by_split = [], False, {}
    for f in files:
        split = f.name[len("cuts_"): -len(".jsonl.gz")]
        require = [r for pre, req in REQUIRED_BY_PREFIX.items() if split.startswith(pre) for r in req]
        require += list(extra_require)
        cuts = CutSet.from_file(f)
        try:
            kept, report = validate_cuts(cuts, require=require, min_duration=min_duration, skip_bad=skip_bad,
                                         decode=decode, desc=f"validating {split}")
        except BadCutError as e:
            print(f"{f}: {e}", file=sys.stderr)
            failed = True
            continue
        report["require"] = require
        if not decode:
            report["note"] = HEADER_ONLY_NOTE
        reports.append((split, report))
        ids_by_split[split] = {c.id for c in kept}
        if skip_bad and report["skipped"]:
            report["original"] = str(_rewrite_keeping_original(f, kept))
            log.warning("%s: removed %d bad cuts %s; the original is %s", f, sum(report["skipped"].values()),
                        report["skipped"], report["original"])
    trials = d / "asv_trials.txt"
    if trials.is_file() and "asv_test" in ids_by_split:
        known = ids_by_split["asv_test"]
        lines = [l.split() for l in trials.read_text().splitlines() if l.strip()]
        bad = [l for l in lines if len(l) != 3 or l[0] not in ("0", "1") or l[1] not in known or l[2] not in known]
        if bad:
            print(f"{trials}: {len(bad)} of {len(lines)} trials are malformed or name cuts not in asv_test, "
                  f"e.g. {' '.join(bad[0])}", file=sys.stderr)
            failed = True
        else:
            print(f"asv_trials.txt: {len(lines)} trials ({sum(l[0] == '1' for l in lines)} target)")
    print(summarize(reports))
    if not decode:
        print(f"note: {HEADER_ONLY_NOTE}")
    out = {split: r for split, r in reports}
    atomic_write_json(d / "validation.json", out)
    return 1 if failed else 0


ORIG_SUFFIX = ".orig.jsonl.gz"


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
