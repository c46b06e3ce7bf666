"""``speechssl export-shar``: write a CutSet manifest as Lhotse Shar shards for streaming training."""
from __future__ import annotations

import sys

from speechssl.cli.common import add_command, exits_on

EXAMPLES = """examples:
  speechssl export-shar data/librilight/cuts_small.jsonl.gz data/shar/small --shard-size 1000
  speechssl export-shar data/mini/cuts_pretrain_km.jsonl.gz data/shar/mini --shard-size 50 --fields kmeans
  speechssl export-shar cuts.jsonl.gz shar/ --audio-format original --fields kmeans mfcc_km

Writes OUT_DIR/cuts.NNNNNN.jsonl.gz and OUT_DIR/FIELD.NNNNNN.tar per shard. Audio is FLAC (lossless for 16-bit
audio) unless --audio-format says otherwise; unit labels are stored as exact numpy arrays. Without --fields
every array field of the first cut (e.g. k-means units) is included.
"""


def register(subparsers) -> None:
    p = add_command(subparsers, "export-shar", run, examples=EXAMPLES,
                    help="write a CutSet as Lhotse Shar shards (streaming at scale)",
                    description="Export CUTS (a cuts jsonl.gz manifest) as Lhotse Shar shards.")
    p.add_argument("cuts", metavar="CUTS", help="input manifest (cuts_*.jsonl.gz)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="cuts per shard (default 1000)")
    p.add_argument("--fields", nargs="*", default=None, metavar="NAME",
                   help="custom array fields to include (unit labels); default: all array fields")
    p.add_argument("--audio-format", default="flac", choices=("flac", "wav", "opus", "original"),
                   help="how audio is stored (default flac)")
    p.add_argument("--num-jobs", type=int, default=1, help="parallel writers")


@exits_on(ValueError, KeyError, code=1)
def run(args) -> int:
    from pathlib import Path

    from lhotse import CutSet

    from speechssl.data.shar import default_fields, export_shar

    if not Path(args.cuts).is_file():
        print(f"speechssl export-shar: no such manifest: {args.cuts}", file=sys.stderr)
        return 1
    cuts = CutSet.from_file(args.cuts)
    fields = default_fields(cuts, args.audio_format, args.fields)
    written = export_shar(cuts, args.out_dir, shard_size=args.shard_size, fields=fields, num_jobs=args.num_jobs)
    print(f"wrote {len(written.get('cuts', []))} shards ({', '.join(fields)}) to {args.out_dir}")
    return 0
