"""The SUPERB table (upstreams x tasks, with parameter counts) as Markdown and CSV, and layer-weight plots.

``make_report(exp_dirs, out_dir)`` gathers every ``results.json`` in or under the given directories (the layout
``exp/superb/UPSTREAM/TASK/results.json`` or any other), so ``speechssl report exp/superb/*`` works as is.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

__all__ = ["make_report", "collect_results", "upstream_label", "SuperbReport"]

TASK_ORDER = ["pr", "asr", "ks", "sid", "er", "asv", "lid", "mlasr"]
# how each metric is shown: (column title, scale to percent, lower is better)
METRICS = {"per": ("PER%", True), "wer": ("WER%", True), "cer": ("CER%", True), "acc": ("Acc%", False),
           "eer": ("EER%", True)}


def upstream_label(spec: str) -> str:
    """A short row name: ``fbank`` stays, ``exp/hubert_iter2/final`` becomes ``hubert_iter2``; a random-init
    control ``random:exp/hubert/final`` becomes ``random_hubert`` (``random:conf/model/tiny_hubert.yaml`` and
    ``random:tiny_hubert`` both ``random_tiny_hubert``), so it never shares a row with the pretrained model."""
    spec = str(spec)
    if spec.startswith("random:"):
        inner = upstream_label(spec[len("random:"):])
        for ext in (".yaml", ".yml"):
            inner = inner[: -len(ext)] if inner.endswith(ext) else inner
        return f"random_{inner}"
    p = Path(spec.rstrip("/"))
    if p.name in ("final", "model", "best") and p.parent.name:
        return p.parent.name
    return p.name or str(spec)


def collect_results(exp_dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """Every result record (a results.json holds one dict or a list) in or under ``exp_dirs``, with its path."""
    seen, out = set(), []
    for d in exp_dirs:
        d = Path(d)
        files = [d] if d.is_file() else ([d / "results.json"] if (d / "results.json").is_file() else [])
        if d.is_dir():
            files += sorted(p for p in d.rglob("results.json") if p != d / "results.json")
        for f in files:
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read SUPERB results {f}: {e}") from None
            for r in data if isinstance(data, list) else [data]:
                missing = [k for k in ("task", "upstream", "metric", "value") if k not in r]
                if missing:
                    raise ValueError(f"{f}: results record lacks {missing}")
                out.append({**r, "_path": str(f)})
    return out


@dataclass
class SuperbReport:
    markdown: str
    md_path: Path
    csv_path: Path
    plots: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        files = ", ".join(str(p) for p in [self.md_path, self.csv_path, *self.plots])
        return f"\n{self.markdown}\nwritten: {files}"


def _column(r: dict, splits_of_task: dict[str, set]) -> str:
    """The task name, or ``task:split`` when results for that task come from several test splits."""
    return r["task"] if len(splits_of_task[r["task"]]) == 1 else f"{r['task']}:{r.get('split', 'test')}"


def _fmt(metric: str, value: float) -> str:
    return f"{100 * value:.2f}" if metric in METRICS else f"{value:.4g}"


def make_report(exp_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> SuperbReport | None:
    """Write ``OUT/superb.md``, ``OUT/superb.csv`` and ``OUT/layer_weights_TASK.png``; returns a
    :class:`SuperbReport` whose ``str()`` is the table (None when no results were found)."""
    from speechssl.utils.io import atomic_write, atomic_write_text

    results = collect_results(exp_dirs)
    if not results:
        log.warning("no SUPERB results.json under %s", ", ".join(map(str, exp_dirs)))
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, columns = _table_cells(results)
    order = sorted(columns, key=lambda c: (TASK_ORDER.index(columns[c][0]) if columns[c][0] in TASK_ORDER else 99, c))
    # FBANK-like baselines first, then by parameter count
    names = sorted(rows, key=lambda n: (n not in ("fbank", "mfcc"), rows[n]["params"] or 0, n))
    md, csv_text = _render_table(rows, columns, order, names)
    notes = _fbank_notes(rows, columns, order, names)
    if notes:
        md += "\nAgainst the FBANK baseline:\n" + "\n".join(notes) + "\n"
    md_path, csv_path = out / "superb.md", out / "superb.csv"
    atomic_write_text(md_path, "# SUPERB results\n\n" + md)
    atomic_write_text(csv_path, csv_text)
    plots = _plot_layer_weights(rows, order, columns, out, atomic_write)
    return SuperbReport(md, md_path, csv_path, plots)


def _table_cells(results: list[dict]) -> tuple[dict[str, dict], dict[str, tuple[str, str]]]:
    """(rows: upstream label -> {upstream, params, cells: column -> result}, columns: column -> (task, metric))."""
    rows: dict[str, dict] = {}
    columns: dict[str, tuple[str, str]] = {}
    splits_of_task: dict[str, set] = {}
    for r in results:
        splits_of_task.setdefault(r["task"], set()).add(r.get("split", "test"))
    for r in results:
        name = upstream_label(r["upstream"])
        row = rows.setdefault(name, {"upstream": name, "params": r.get("upstream_params"), "cells": {}})
        col = _column(r, splits_of_task)
        if col in row["cells"]:
            log.warning("duplicate result for %s / %s (%s); keeping the first", name, col, r["_path"])
            continue
        row["cells"][col] = r
        columns.setdefault(col, (r["task"], r["metric"]))
    return rows, columns


def _render_table(rows: dict, columns: dict, order: list[str], names: list[str]) -> tuple[str, str]:
    """The markdown table and the CSV text (values and each cell's best learning rate)."""
    head = ["upstream", "params (M)"] + [f"{c} {METRICS.get(columns[c][1], (columns[c][1],))[0]}" for c in order]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["upstream", "params"] + [f"{c}_{columns[c][1]}" for c in order] +
                    [f"{c}_best_lr" for c in order])
    for n in names:
        row = rows[n]
        params = row["params"]
        cells = [_fmt(columns[c][1], row["cells"][c]["value"]) if c in row["cells"] else "-" for c in order]
        lines.append("| " + " | ".join([n, f"{(params or 0) / 1e6:.2f}"] + cells) + " |")
        writer.writerow([n, params] + [row["cells"][c]["value"] if c in row["cells"] else "" for c in order] +
                        [row["cells"][c].get("best_lr", "") if c in row["cells"] else "" for c in order])
    return "\n".join(lines) + "\n", buf.getvalue()


def _fbank_notes(rows: dict, columns: dict, order: list[str], names: list[str]) -> list[str]:
    """One line per column: how many upstreams beat the FBANK baseline there, and which."""
    base = rows.get("fbank")
    notes: list[str] = []
    if not base:
        return notes
    for c in order:
        if c not in base["cells"]:
            continue
        metric = columns[c][1]
        lower = METRICS.get(metric, (None, False))[1] if metric in METRICS else False
        b = base["cells"][c]["value"]
        better = [n for n in names if n != "fbank" and c in rows[n]["cells"] and (
            rows[n]["cells"][c]["value"] < b if lower else rows[n]["cells"][c]["value"] > b)]
        others = [n for n in names if n != "fbank" and c in rows[n]["cells"]]
        if others:
            notes.append(f"- {c}: {len(better)}/{len(others)} upstreams beat FBANK"
                         + (f" ({', '.join(better)})" if better else ""))
    return notes


def _plot_layer_weights(rows, order, columns, out: Path, atomic_write) -> list[Path]:
    """One PNG per task: the softmax layer weights each multi-layer upstream learned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    for c in order:
        series = [(n, r["cells"][c]["layer_weights"]) for n, r in rows.items()
                  if c in r["cells"] and len(r["cells"][c].get("layer_weights") or []) > 1]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for n, w in series:
            ax.plot(range(len(w)), w, marker="o", label=n)
        ax.set_xticks(range(max(len(w) for _, w in series)))
        ax.set_xlabel("hidden state (0 = input of the first layer)")
        ax.set_ylabel("softmax weight")
        ax.set_title(f"{c}: learned layer weights")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"layer_weights_{c.replace(':', '_')}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        plots.append(path)
    return plots
