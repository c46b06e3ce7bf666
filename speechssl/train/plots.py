"""Training curves from ``EXP/metrics.jsonl`` as PNG (matplotlib, headless).

One figure per call with up to four panels: loss (train solid, validation dashed), accuracies (``acc*`` keys),
learning rate, and audio seconds per second; several experiment directories are overlaid for comparison.

Example::

    plot_training_curves(["exp/hubert_iter1", "exp/hubert_iter2"], "exp/report/pretrain_curves.png")
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

__all__ = ["read_metrics", "summarize", "plot_training_curves"]
log = logging.getLogger(__name__)


def read_metrics(exp_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train records, valid records) of ``exp_dir/metrics.jsonl``; lines cut short by a kill are skipped."""
    path = Path(exp_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{exp_dir}: no metrics.jsonl (is it an experiment directory?)")
    train, valid = [], []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" not in rec:
                continue
            (valid if rec.get("split") == "valid" else train).append(rec)
    return train, valid


def _acc_keys(recs: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in recs:
        for k in r:
            if k.startswith("acc") and k not in keys:
                keys.append(k)
    return keys


def summarize(exp_dir: str | os.PathLike) -> dict:
    """Last logged train values (+ ``valid_*``) of an experiment, for report tables."""
    train, valid = read_metrics(exp_dir)
    out: dict = {"exp": str(exp_dir)}
    if train:
        last = train[-1]
        out.update({k: v for k, v in last.items() if k in ("step", "loss", "lr") or k.startswith("acc")})
    if valid:
        out.update({f"valid_{k}": v for k, v in valid[-1].items() if k not in ("step", "split")})
    return out


def plot_training_curves(exp_dirs: Sequence[str | os.PathLike], out_png: str | os.PathLike,
                         labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Draw the curves of every experiment in ``exp_dirs`` into ``out_png``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from speechssl.utils.io import atomic_write

    runs = []
    for i, d in enumerate(exp_dirs):
        train, valid = read_metrics(d)
        if not train:
            log.warning("%s: metrics.jsonl has no training records", d)
        runs.append((labels[i] if labels else Path(d).name, train, valid))
    panels = ["loss", "acc", "lr", "audio_sec_per_sec"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for label, train, valid in runs:
        steps = [r["step"] for r in train]
        ax = axes[0]
        line, = ax.plot(steps, [r.get("loss") for r in train], label=f"{label} train")
        if valid and any("loss" in r for r in valid):
            ax.plot([r["step"] for r in valid if "loss" in r], [r["loss"] for r in valid if "loss" in r], "--",
                    color=line.get_color(), label=f"{label} valid")
        for k in _acc_keys(train):
            pts = [(r["step"], r[k]) for r in train if k in r]
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], label=f"{label} {k}")
        axes[2].plot(steps, [r.get("lr") for r in train], label=label)
        axes[3].plot(steps, [r.get("audio_sec_per_sec") for r in train], label=label)
    for ax, name in zip(axes, ["loss", "accuracy", "learning rate", "audio seconds / second"]):
        ax.set_title(name)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
