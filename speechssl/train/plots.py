"""Training curves from ``EXP/metrics.jsonl`` as PNG (matplotlib, headless).

One figure per call with up to four panels: loss (train solid, validation dashed), accuracies (``acc*`` keys),
learning rate, and audio seconds per second; several experiment directories are overlaid for comparison.

``plot_diagnostics`` draws the collapse diagnostics of one pretraining run (``speechssl.train.diagnostics``,
logged on the validation records): temporal std and effective rank per layer over updates, and the masked
accuracy against the accuracy of always guessing the most frequent unit; ``read_warnings`` returns the
``CollapseMonitor`` warnings (``"split": "diagnostics"`` lines).

Example::

    plot_training_curves(["exp/hubert_iter1", "exp/hubert_iter2"], "exp/report/pretrain_curves.png")
    plot_diagnostics("exp/hubert_iter1", "exp/hubert_iter1/diagnostics.png")
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

__all__ = ["read_metrics", "read_warnings", "summarize", "plot_training_curves", "plot_diagnostics"]
log = logging.getLogger(__name__)


def read_metrics(exp_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train records, valid records) of ``exp_dir/metrics.jsonl``; lines cut short by a kill are skipped."""
    path = Path(exp_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{exp_dir}: no metrics.jsonl (is it an experiment directory?)")
    train, valid = [], []
    for rec in _records(path):
        if "step" not in rec or rec.get("split") == "diagnostics":
            continue
        (valid if rec.get("split") == "valid" else train).append(rec)
    return train, valid


def _records(path: Path):
    """The JSON records of a metrics file, skipping a line cut short by a kill."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def read_warnings(exp_dir: str | os.PathLike) -> list[tuple[int, list[str]]]:
    """(step, warnings) of every evaluation at which the collapse monitor warned, in file order."""
    path = Path(exp_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [(int(rec.get("step", 0)), [str(w) for w in rec["warnings"]]) for rec in _records(path)
            if rec.get("split") == "diagnostics" and rec.get("warnings")]


def _is_diagnostic(key: str) -> bool:
    return key.startswith(("layer", "units_", "diag_")) or key == "collapse_warnings"


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
        # diagnostics (dozens of per-layer keys) go to plot_diagnostics, not to the table
        out.update({f"valid_{k}": v for k, v in valid[-1].items()
                    if k not in ("step", "split") and not _is_diagnostic(k)})
    warned = read_warnings(exp_dir)
    if warned:
        out["collapse_warnings"] = sum(len(w) for _, w in warned)
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


def _layer_series(valid: list[dict], suffix: str) -> dict[int, list[tuple[int, float]]]:
    """{layer: [(step, value)]} of the ``layer{i}{suffix}`` keys."""
    series: dict[int, list[tuple[int, float]]] = {}
    for r in valid:
        for k, v in r.items():
            if k.startswith("layer") and k.endswith(suffix) and k[5:-len(suffix)].isdigit():
                series.setdefault(int(k[5:-len(suffix)]), []).append((r["step"], v))
    return dict(sorted(series.items()))


def _plot_series(ax, series: dict[int, list[tuple[int, float]]]) -> None:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    n = max(1, len(series) - 1)
    for i, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color=cmap(i / n), label=f"layer {i}")


def plot_diagnostics(exp_dir: str | os.PathLike, out_png: str | os.PathLike, title: str | None = None
                     ) -> Path | None:
    """Draw the collapse diagnostics of ``exp_dir`` into ``out_png``; None (nothing written) when its
    metrics.jsonl has no ``layer{i}_tstd`` keys. Panels: temporal std and effective rank per layer (log scales), and
    masked accuracy (train; ``diag_acc_masked`` on the fixed batch) against ``units_prior_acc``.
    Steps with collapse warnings are marked with red vertical lines."""
    train, valid = read_metrics(exp_dir)
    tstd, erank = _layer_series(valid, "_tstd"), _layer_series(valid, "_erank")
    if not tstd:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from speechssl.utils.io import atomic_write

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.6))
    # log scales: a collapse is a fall by orders of magnitude (rank 150 -> 2, std 0.9 -> 1e-4)
    for ax, series in ((axes[0], tstd), (axes[1], erank)):
        _plot_series(ax, series)
        if all(v > 0 for pts in series.values() for _, v in pts):
            ax.set_yscale("log")
    ax = axes[2]
    acc = [(r["step"], r["acc_masked"]) for r in train if "acc_masked" in r]
    if acc:
        ax.plot([p[0] for p in acc], [p[1] for p in acc], label="acc_masked (train)")
    for key, label, style in (("diag_acc_masked", "acc_masked (fixed batch)", "o-"),
                              ("units_prior_acc", "prior accuracy", "--")):
        pts = [(r["step"], r[key]) for r in valid if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    for step, _ in read_warnings(exp_dir):
        for a in axes:
            a.axvline(step, color="red", alpha=0.25, lw=1)
    for a, name in zip(axes, ["temporal std over frames", "effective rank", "masked accuracy vs unit prior"]):
        a.set_title(name)
        a.set_xlabel("update")
        a.grid(alpha=0.3)
        if a.lines and a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(title or f"{exp_dir}: collapse diagnostics")
    fig.tight_layout()
    out = Path(out_png)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
