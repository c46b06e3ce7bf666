"""``speechssl label``: attach k-means units (frame labels) to every cut of a manifest."""
from __future__ import annotations

import logging

from speechssl.cli.common import add_command, exits_on

EXAMPLES = """examples:
  # MFCC units (100 Hz) from exp/hubert/km_mfcc onto the training cuts, stored as 'mfcc'
  speechssl label --cuts data/librispeech/cuts_train_960.jsonl.gz --kmeans exp/hubert/km_mfcc \\
      --out data/librispeech/cuts_train_960_mfcc.jsonl.gz --name mfcc
  # layer-6 units (50 Hz) computed on a GPU; unit arrays under a chosen directory
  speechssl label --cuts data/ls/cuts_dev_clean.jsonl.gz --kmeans exp/hubert/km_l6 \\
      --out data/ls/cuts_dev_clean_hubert_l6.jsonl.gz --name hubert_l6 --storage data/ls/units_l6 --device cuda
"""

log = logging.getLogger("speechssl.label")


def register(subparsers) -> None:
    p = add_command(
        subparsers, "label", run, examples=EXAMPLES,
        help="label every cut with k-means units (writes a new manifest)",
        description="Recompute the features KM_DIR was fitted on (recorded in its kmeans.json) for every cut, "
                    "take the nearest centre per frame and store the units losslessly on the cut as "
                    "cut.custom[NAME] (a temporal array at the features' frame rate, read back by the datasets). "
                    "This is `speechssl extract --kmeans` writing one manifest: batches by duration, and a killed "
                    "run continues when rerun.")
    p.add_argument("--cuts", required=True, help="input cut manifest")
    p.add_argument("--kmeans", required=True, metavar="KM_DIR", help="directory written by `speechssl kmeans`")
    p.add_argument("--out", required=True, metavar="CUTS_OUT", help="output manifest (.jsonl.gz)")
    p.add_argument("--name", default="kmeans", help="label set name on the cuts (default: kmeans)")
    p.add_argument("--storage", default=None,
                   help="directory for the unit arrays (default: <CUTS_OUT stem>_<NAME>/ next to CUTS_OUT)")
    p.add_argument("--max-duration", type=float, default=100.0, help="padded seconds of audio per batch")
    p.add_argument("--device", default="cpu", help="cpu | cuda")


@exits_on(ValueError, FileNotFoundError, KeyError)
def run(args) -> int:
    from speechssl.train.units import label_cuts

    n = label_cuts(args.cuts, args.kmeans, args.out, name=args.name, storage_dir=args.storage, device=args.device,
                   max_duration=args.max_duration)
    log.info("wrote %s (%d cuts, units '%s')", args.out, n, args.name)
    return 0
