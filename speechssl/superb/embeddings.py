"""Label-free speaker verification: score an utterance-embedding extractor on ASV trials by cosine similarity.

SUPERB's ASV task trains an x-vector head with speaker labels on top of frozen features. A speaker embedding
model trained without labels (the DINO objective, ``speechssl.models.objectives.dino``) is scored directly:
embed every trial utterance, score each trial by the cosine of its two embeddings, report EER and minDCF
(``speechssl.superb.metrics``). Extractors:

- a DINO experiment's ``final/`` directory: the encoder with statistics pooling and the embedding layer, of the
  teacher (``which="teacher"``, what DINO evaluates) or the student;
- ``fbank``: mean and standard deviation of the 80-dim log-mel frames (a label-free baseline).

The record written to ``OUT/results.json`` has the fields of a SUPERB result (task ``asv``, metric ``eer``,
``value``, ``split``, ``upstream``), so ``speechssl report`` puts it in the ASV column.

Command line (a module, not a ``speechssl`` sub-command)::

    python -m speechssl.superb.embeddings --model exp/dino/final --cuts data/mini/cuts_asv_test.jsonl.gz \\
        --trials data/mini/asv_trials.txt --out exp/superb/dino/asv
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from speechssl.superb import metrics
from speechssl.superb.tasks import read_trials

__all__ = ["Extractor", "fbank_extractor", "dino_extractor", "model_extractor", "embed_cuts", "score_trials",
           "evaluate", "main"]
log = logging.getLogger(__name__)

Extractor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""audio [B, S] float, lengths [B] -> embeddings [B, E]."""


def fbank_extractor() -> tuple[Extractor, int]:
    """Mean and standard deviation of the 80-dim log-mel frames over each utterance ([B, 160]); no parameters."""
    from speechssl.models.components import log_mel_fbank
    from speechssl.models.objectives.dino import stats_pool

    def extract(audio: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        mel = log_mel_fbank(audio)
        pad = torch.arange(mel.shape[1])[None] >= (lens // 160)[:, None]
        return stats_pool(mel, pad)

    return extract, 0


def dino_extractor(model_dir: str | Path, which: Literal["teacher", "student"] = "teacher"
                   ) -> tuple[Extractor, int]:
    """The speaker embedding of a DINO experiment's ``final/`` directory (encoder, pooling, embedding layer) and
    its parameter count."""
    from speechssl.models.io import load_checkpoint_parts, load_pretrained
    from speechssl.models.objectives.dino import SpeakerEmbedder

    encoder = load_pretrained(model_dir)
    head = load_checkpoint_parts(model_dir).get("objective", {})
    prefix = {"teacher": "teacher_", "student": ""}[which]
    if which == "teacher":
        enc_sd = {k[len("teacher_encoder."):]: v for k, v in head.items() if k.startswith("teacher_encoder.")}
        encoder.load_state_dict(enc_sd)
    emb_sd = {k[len(prefix + "embed."):]: v for k, v in head.items() if k.startswith(prefix + "embed.")}
    if "proj.weight" not in emb_sd:
        raise ValueError(f"{model_dir} holds no DINO embedding layer ('{prefix}embed.proj.weight' in its objective "
                         "part): pass the final/ directory of a 'speechssl pretrain' run with objective.name dino")
    embed = SpeakerEmbedder(encoder.hidden_size, emb_sd["proj.weight"].shape[0])
    embed.load_state_dict(emb_sd)
    encoder.eval()
    embed.eval()
    n_params = sum(p.numel() for m in (encoder, embed) for p in m.parameters())
    return (lambda audio, lens: embed(encoder, audio, lens)), n_params


def model_extractor(model: str, which: Literal["teacher", "student"] = "teacher") -> tuple[Extractor, int]:
    """``fbank``, an OS-KDFT ``final/`` directory (it holds ``speaker_head.safetensors``) or a DINO ``final/``."""
    from speechssl.compress.oskdft import HEAD_FILE, load_oskdft_extractor

    if model == "fbank":
        return fbank_extractor()
    if (Path(model) / HEAD_FILE).exists():
        return load_oskdft_extractor(model)
    return dino_extractor(model, which)


@torch.no_grad()
def embed_cuts(extract: Extractor, cuts, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{cut id: L2-normalised embedding [E]} for every cut (whole utterances, in batches of similar length)."""
    from speechssl.data.audio import load_cut_audio
    from speechssl.data.dataset import pad_waves

    cuts = sorted(cuts, key=lambda c: c.duration)
    out: dict[str, torch.Tensor] = {}
    for i in range(0, len(cuts), batch_size):
        group = cuts[i:i + batch_size]
        audio, lens = pad_waves([load_cut_audio(c) for c in group])
        emb = F.normalize(extract(audio, lens).float(), dim=-1)
        out.update({c.id: e for c, e in zip(group, emb)})
    return out


def score_trials(emb: dict[str, torch.Tensor], trials: Sequence[tuple[int, str, str]], p_target: float = 0.01
                 ) -> dict[str, float]:
    """Cosine score per (label, enroll, test) trial -> {"eer", "min_dcf", "num_trials"}; a trial utterance
    without an embedding is a ValueError naming it."""
    missing = sorted({u for _, a, b in trials for u in (a, b) if u not in emb})
    if missing:
        raise ValueError(f"{len(missing)} trial utterances have no embedding, e.g. {missing[:3]} (argument 'cuts' "
                         "must hold every utterance named in the trials)")
    scores = [float(emb[a] @ emb[b]) for _, a, b in trials]
    labels = [lab for lab, _, _ in trials]
    return {"eer": metrics.eer(scores, labels), "min_dcf": metrics.min_dcf(scores, labels, p_target),
            "num_trials": len(trials)}


def evaluate(model: str, cuts_path: str | Path, trials_path: str | Path, out_dir: str | Path | None = None,
             which: Literal["teacher", "student"] = "teacher", name: str | None = None) -> dict:
    """Score ``model`` (a DINO or OS-KDFT ``final/`` directory, or ``fbank``) on the trials; writes
    ``OUT/results.json`` when ``out_dir`` is given and returns the record."""
    from speechssl.data.loader import open_cuts
    from speechssl.superb.report import upstream_label

    extract, n_params = model_extractor(model, which)
    trials = read_trials(trials_path)
    needed = {u for _, a, b in trials for u in (a, b)}
    cuts = [c for c in open_cuts(cuts_path, "cuts") if c.id in needed]
    scores = score_trials(embed_cuts(extract, cuts), trials)
    label = name or (upstream_label(model) + ("" if model == "fbank" or which == "teacher" else "_student"))
    record = {"task": "asv", "upstream": label, "upstream_mode": "label_free_embedding", "upstream_params": n_params,
              "metric": "eer",
              "higher_better": False, "split": Path(cuts_path).name.removeprefix("cuts_").split(".")[0],
              "value": scores["eer"], "scores": scores, "scored": len(cuts), "embedding": which}
    if out_dir is not None:
        from speechssl.utils.io import atomic_write_text

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out_dir) / "results.json", json.dumps(record, indent=2) + "\n")
    return record


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``speechssl score-embeddings`` (and ``python -m speechssl.superb.embeddings``)."""
    p.add_argument("--model", required=True, help="a DINO or OS-KDFT experiment's final/ directory, or 'fbank'")
    p.add_argument("--cuts", required=True, help="manifest holding every trial utterance (cuts_*.jsonl.gz)")
    p.add_argument("--trials", required=True, help="trial list: '1|0 ENROLL_ID TEST_ID' per line")
    p.add_argument("--out", help="directory for results.json")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher", help="DINO network (teacher)")
    p.add_argument("--name", help="row name in the SUPERB table (default: from the model path)")


def run(args: argparse.Namespace) -> int:
    rec = evaluate(args.model, args.cuts, args.trials, args.out, args.which, args.name)
    print(f"{rec['upstream']}: EER {100 * rec['value']:.2f}% minDCF {rec['scores']['min_dcf']:.3f} "
          f"({rec['scores']['num_trials']} trials)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speechssl.superb.embeddings", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


DESCRIPTION = ("Score a label-free speaker embedding (DINO final/ or fbank) on ASV trials: cosine scores, EER and "
               "minDCF.")


if __name__ == "__main__":
    raise SystemExit(main())
