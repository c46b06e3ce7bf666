"""``speechssl kmeans``: fit k-means units on MFCC or on a model layer, streamed from a sampled share of cuts."""
from __future__ import annotations

import logging

from speechssl.cli.common import add_command, exits_on

EXAMPLES = """examples:
  # HuBERT iteration 1: K=100 on 39-dim MFCC (100 Hz) of 10% of the training cuts
  speechssl kmeans --cuts data/librispeech/cuts_train_960.jsonl.gz --out exp/hubert/km_mfcc \\
      --feature mfcc --n-clusters 100 --fraction 0.1
  # iteration 2: K=500 on layer 6 of the iteration-1 model (50 Hz), features kept on disk, on a GPU
  speechssl kmeans --cuts data/librispeech/cuts_train_960.jsonl.gz --out exp/hubert/km_l6 \\
      --feature exp/hubert/iter1/final --layer 6 --n-clusters 500 --fraction 0.1 --store disk --device cuda
  # then attach the units to cuts:  speechssl label --cuts ... --kmeans exp/hubert/km_l6 --out ...
"""

log = logging.getLogger("speechssl.kmeans")


def register(subparsers) -> None:
    p = add_command(
        subparsers, "kmeans", run, examples=EXAMPLES,
        help="fit k-means units on MFCC or a model layer (HuBERT targets)",
        description="Compute features for a random --fraction of the cuts, fit k-means (k-means++ init, chunked "
                    "Lloyd or mini-batch updates, CPU or GPU) and write KM_DIR/kmeans.safetensors (centres) and "
                    "KM_DIR/kmeans.json (settings, inertia, and how the features were computed, for `label`).")
    p.add_argument("--cuts", required=True, help="cut manifest (jsonl/jsonl.gz)")
    p.add_argument("--out", required=True, metavar="KM_DIR", help="directory to write the k-means model to")
    p.add_argument("--feature", default="mfcc", metavar="mfcc|mfcc_cmvn|MODEL",
                   help="'mfcc' (39-dim, 100 Hz), 'mfcc_cmvn' (the same, mean and variance normalised per "
                        "utterance) or a model path loadable by speechssl.load_pretrained")
    p.add_argument("--layer", type=int, default=None, help="hidden-state index for model features (0 = input)")
    p.add_argument("--n-clusters", type=int, required=True, help="number of units K")
    p.add_argument("--fraction", type=float, default=0.1, help="share of cuts to fit on (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["lloyd", "minibatch"], default="lloyd",
                   help="exact chunked Lloyd passes (default) or mini-batch updates")
    p.add_argument("--batch-size", type=int, default=10000, help="mini-batch size (mode minibatch)")
    p.add_argument("--max-iter", type=int, default=100, help="Lloyd passes / mini-batch epochs")
    p.add_argument("--n-init", type=int, default=1, help="candidate k-means++ inits compared on a sample")
    p.add_argument("--max-frames", type=int, default=None, help="fit on at most this many random frames")
    p.add_argument("--store", choices=["memory", "disk"], default="memory",
                   help="hold the frames in RAM or in a temporary float32 file in KM_DIR")
    p.add_argument("--device", default="cpu", help="cpu | cuda (features and k-means)")


@exits_on(ValueError, FileNotFoundError, KeyError)
def run(args) -> int:
    from speechssl.train.units import fit_kmeans

    km = fit_kmeans(args.cuts, args.out, feature=args.feature, layer=args.layer, n_clusters=args.n_clusters,
                    fraction=args.fraction, seed=args.seed, batch_size=args.batch_size, max_iter=args.max_iter,
                    mode=args.mode, n_init=args.n_init, device=args.device, store=args.store,
                    max_frames=args.max_frames)
    log.info("wrote %s (K=%d, inertia %.6g, %d iterations)", args.out, km.n_clusters, km.inertia_, km.n_iter_)
    return 0
