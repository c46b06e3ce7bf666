"""The layer analysis as a PNG: one panel per measure, layers on the x axis, one curve per model.

An encoder is a curve (with a band of one standard deviation when several seeds ran); a single-state upstream
(FBANK, MFCC) is a dashed horizontal reference line; the probe panels carry the chance level (always answering
the most frequent training class) as a dotted grey line. Measures nobody computed get no panel.
"""
from __future__ import annotations

import os
from pathlib import Path

from speechssl.analysis.layers import MEASURES

__all__ = ["plot_layers", "TITLES"]

TITLES = {"phone_acc": "phone probe accuracy", "speaker_acc": "speaker probe accuracy", "pnmi": "PNMI (k-means)",
          "phone_purity": "phone purity (k-means)", "cluster_purity": "cluster purity (k-means)"}


def _series(report: dict, model: str, measure: str) -> tuple[list[int], list[float], list[float]]:
    pts = [(e["layer"], e[measure], e[f"{measure}_std"] or 0.0) for e in report["table"]
           if e["model"] == model and e[measure] is not None]
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def _panel(ax, report: dict, measure: str, colors) -> None:
    """One measure's curves, reference lines and chance level on ``ax``."""
    from matplotlib.ticker import MaxNLocator

    for i, m in enumerate(report["models"]):
        x, y, sd = _series(report, m["name"], measure)
        if not x:
            continue
        color = colors[i % len(colors)]
        if m["reference"]:
            ax.axhline(y[0], color=color, linestyle="--", label=f"{m['name']} (reference)")
            continue
        ax.plot(x, y, marker="o", color=color, label=m["name"])
        if any(sd):
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], color=color,
                            alpha=0.2, linewidth=0)
    chance = [m["chance"].get(measure) for m in report["models"] if m.get("chance", {}).get(measure) is not None]
    if chance:
        ax.axhline(max(chance), color="grey", linestyle=":", label="chance")
    ax.set_title(TITLES[measure])
    ax.set_xlabel("layer (0 = transformer input)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_layers(report: dict, out: str | os.PathLike) -> Path | None:
    """Write the report's measures over layers to ``out`` (PNG); None (nothing written) when no measure has a
    value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from speechssl.utils.io import atomic_write

    measures = [m for m in MEASURES if any(e[m] is not None for e in report["table"])]
    if not measures:
        return None
    cols = min(3, len(measures))
    rows = (len(measures) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, measure in zip(axes.flat, measures):
        _panel(ax, report, measure, colors)
    for ax in list(axes.flat)[len(measures):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    k = report.get("settings", {}).get("n_clusters")
    fig.suptitle(f"What each layer knows (k-means K={k}, {report['cuts_used']['held_out']} held-out cuts)")
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
