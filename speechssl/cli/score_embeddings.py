"""``speechssl score-embeddings``: EER and minDCF of a label-free speaker embedding on ASV trials."""
from __future__ import annotations

from speechssl.cli.common import add_command

EXAMPLES = """examples:
  speechssl score-embeddings --model exp/dino/final --cuts data/mini/cuts_asv_test.jsonl.gz \\
      --trials data/mini/asv_trials.txt --out exp/superb/dino/asv
  speechssl score-embeddings --model fbank --name fbank_label_free --cuts data/mini/cuts_asv_test.jsonl.gz \\
      --trials data/mini/asv_trials.txt --out exp/superb/fbank_label_free/asv

--out gets a results.json that `speechssl report` shows in the ASV column.
"""


def register(subparsers) -> None:
    from speechssl.superb import embeddings

    p = add_command(subparsers, "score-embeddings", lambda args: embeddings.run(args),
                    help="EER of a label-free speaker embedding (DINO, pooled FBANK) on ASV trials",
                    description=embeddings.DESCRIPTION, examples=EXAMPLES)
    embeddings.add_arguments(p)
