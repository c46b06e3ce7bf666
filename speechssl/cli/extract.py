"""``speechssl extract``: hidden states or k-means units of a whole corpus, written per cut with a manifest."""
from __future__ import annotations

import logging
from pathlib import Path

from speechssl.cli.common import add_command, exits_on

EXAMPLES = """examples:
  # layers 6 and 9 of a model, fp16, for every cut (OUT/cuts.jsonl.gz: cut.custom['layer_6'], ['layer_9'])
  speechssl extract --model exp/hubert/final --cuts data/ls/cuts_train.jsonl.gz --out feats/hubert_l6_l9 \\
      --layers 6,9 --dtype fp16
  # k-means units of the layer the k-means was fitted on (lossless int arrays, field 'units_layer_6'),
  # de-duplicated with durations, and a 500-piece unit BPE trained on them (reused when MODEL exists)
  speechssl extract --kmeans exp/hubert/km_l6 --cuts data/ls/cuts_train.jsonl.gz --out units/l6 \\
      --dedup --bpe units/l6_bpe.model --bpe-vocab 500
  # the same on 4 GPUs: one part per process, one manifest at the end; as Shar shards too
  accelerate launch --num_processes 4 -m speechssl.cli.main extract --kmeans exp/hubert/km_l6 \\
      --cuts data/ls/cuts_train.jsonl.gz --out units/l6 --device cuda --shar
  # rerunning a killed extraction with the same arguments continues it
"""

log = logging.getLogger("speechssl.extract")


def register(subparsers) -> None:
    p = add_command(
        subparsers, "extract", run, examples=EXAMPLES,
        help="hidden states or k-means units of a whole corpus, per cut (resumable, multi-process)",
        description="Stream the cuts through the encoder in batches of --max-duration seconds and write, per cut, "
                    "the chosen layers' hidden states (--layers) or the units of a k-means (--kmeans) as Lhotse "
                    "arrays, with OUT/cuts.jsonl.gz pointing to them and OUT/extract.json recording the model, "
                    "the layers and the fields. Rerunning the same command continues a killed run.")
    p.add_argument("--cuts", required=True, nargs="+", help="input cut manifest(s), chained in order")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", help="model (speechssl, HF or fairseq checkpoint); with --kmeans: the k-means' own")
    layers = p.add_mutually_exclusive_group()
    layers.add_argument("--layers", help="hidden-state indices, comma-separated (0 = transformer input)")
    layers.add_argument("--layer", type=int, help="one hidden-state index")
    p.add_argument("--kmeans", metavar="KM_DIR", help="write the units of this k-means (from `speechssl kmeans`) "
                                                      "instead of hidden states")
    p.add_argument("--name", help="units field name (default units_layer_L, or units_mfcc for MFCC k-means)")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="storage dtype of hidden states")
    p.add_argument("--dedup", action="store_true", help="units: run-length de-duplicate, keeping durations")
    p.add_argument("--bpe", metavar="MODEL", help="units: add unit-BPE pieces from this sentencepiece .model")
    p.add_argument("--bpe-vocab", type=int, help="with --bpe MODEL that does not exist: train it on these units")
    p.add_argument("--shar", action="store_true", help="also write the fields as Lhotse Shar shards in OUT/shar")
    p.add_argument("--shard-size", type=int, default=1000, help="cuts per Shar shard")
    p.add_argument("--max-duration", type=float, default=100.0, help="padded seconds of audio per batch")
    p.add_argument("--num-workers", type=int, default=1, help="audio-loading processes")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable cuts instead of failing")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier extraction in --out first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _layers(args) -> list[int] | None:
    if args.layer is not None:
        return [args.layer]
    if args.layers:
        try:
            return [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
    return None


def _check_options(args) -> None:
    if args.kmeans is None:
        if args.model is None:
            raise ValueError("give --model (hidden states) or --kmeans (units)")
        if _layers(args) is None:
            raise ValueError("name the layer(s) explicitly: --layer L or --layers L1,L2 (0 = transformer input)")
        for flag, given in (("--dedup", args.dedup), ("--bpe", args.bpe), ("--name", args.name)):
            if given:
                raise ValueError(f"{flag} applies to units: add --kmeans KM_DIR")
    if args.bpe_vocab is not None and not args.bpe:
        raise ValueError("--bpe-vocab trains the model named by --bpe MODEL: add it")


def _units_source(args, device: str):
    from speechssl.train.units import KMeansUnits

    source = KMeansUnits(args.kmeans, name=args.name, device=device)
    spec = source.reader.spec
    layers = _layers(args)
    if layers is not None and layers != [spec.layer]:
        fitted = f"layer {spec.layer} of {spec.feature}" if spec.layer is not None else f"{spec.feature} features"
        raise ValueError(f"--kmeans {args.kmeans} was fitted on {fitted}; --layer(s) {layers} would give units of "
                         "another layer: drop it or fit a k-means there")
    if args.model is not None and Path(args.model).resolve() != Path(spec.feature).resolve():
        raise ValueError(f"--kmeans {args.kmeans} was fitted on features of {spec.feature}, not --model "
                         f"{args.model}: drop --model (the k-means names its model) or fit a k-means on it")
    return source


def _source(args, device: str):
    if args.kmeans is not None:
        return _units_source(args, device)
    from speechssl.extract.hidden import HiddenStates, LayerEncoder

    return HiddenStates(LayerEncoder.from_path(args.model, _layers(args), device), dtype=args.dtype)


def _post(args, out: Path, record: dict, source) -> None:
    """Rank 0, after the merge: the unit BPE and the Shar shards."""
    from speechssl.extract.post import apply_bpe, bpe_field, export_shar, unit_sequences
    from speechssl.extract.run import update_record
    from speechssl.extract.units import UnitBPE, train_unit_bpe
    from speechssl.extract.writer import durations_field

    manifest = out / record["manifest"]
    fields = list(source.fields)
    if args.bpe:
        field = fields[0]
        if record.get("bpe", {}).get("model") != str(Path(args.bpe).resolve()):
            if Path(args.bpe).exists():
                bpe = UnitBPE(args.bpe)
            elif args.bpe_vocab:
                bpe = train_unit_bpe(unit_sequences(manifest, field), args.bpe, args.bpe_vocab)
            else:
                raise FileNotFoundError(f"--bpe {args.bpe} does not exist: add --bpe-vocab N to train it on these "
                                        "units")
            apply_bpe(out, manifest, field, bpe)
            record = update_record(out, bpe={"model": str(Path(args.bpe).resolve()), "field": bpe_field(field),
                                             "vocab_size": bpe.vocab_size})
        fields.append(bpe_field(field))
    if args.dedup:
        fields += [durations_field(f) for f in fields]
    if args.shar and not record.get("shar"):
        update_record(out, shar=str(export_shar(out, manifest, fields, args.shard_size).relative_to(out)))


@exits_on(ValueError, FileNotFoundError, KeyError)
def run(args) -> int:
    from speechssl.extract.run import ExtractOptions, extract_corpus
    from speechssl.extract.writer import remove_outputs
    from speechssl.train.runtime import Runtime

    _check_options(args)
    runtime = Runtime("fp32", args.device, config_key="extract")
    if args.overwrite and runtime.rank == 0:
        gone = remove_outputs(args.out)
        if gone:
            log.warning("--overwrite: deleted the earlier extraction in %s (%s)", args.out, ", ".join(gone))
    runtime.barrier()
    source = _source(args, str(runtime.device))
    options = ExtractOptions(max_duration=args.max_duration, num_workers=args.num_workers, skip_bad=args.skip_bad,
                             dedup=args.dedup)
    record = extract_corpus(args.cuts, args.out, source, options=options, runtime=runtime,
                            progress=not args.no_progress)
    if runtime.rank == 0:
        _post(args, Path(args.out), record, source)
        log.info("wrote %s: %d cuts, %.3f h of audio, fields %s", Path(args.out) / record["manifest"],
                 record["cuts"], record["audio_hours"], ", ".join(source.fields))
    runtime.barrier()
    return 0
