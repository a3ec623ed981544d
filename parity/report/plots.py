"""PNG plots for the report: percent-error heatmap (tests x sizes) and |delta loglik| histogram.

Byte-identical on regeneration: Agg backend, fixed size and dpi, no 'Software' / date metadata,
and the histogram is drawn from the report's stored bin counts, not from raw samples.
"""

from __future__ import annotations

import math
from pathlib import Path

from parity.io import atomic_file
from parity.report.metrics import HIST_BIN, HIST_EDGES

PNG_METADATA = {"Software": None}  # matplotlib otherwise stamps its version; PNG has no date by default


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, metadata=PNG_METADATA)


def heatmap(report: dict, other: str, path: Path) -> None:
    import numpy as np

    plt = _plt()
    sizes = report["sizes"]
    rows = [r for suite_rows in report["tables"][other].values() for r in suite_rows]
    data = np.array([[math.nan if r["values"][s] is None else r["values"][s] for s in sizes] for r in rows],
                    dtype=float).reshape(len(rows), len(sizes))
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(sizes), 1.2 + 0.28 * max(len(rows), 1)))
    # no percent error (no data, failed, ref 0): grey, not zero
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    finite = data[np.isfinite(data)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax)
    ax.set_xticks(range(len(sizes)), labels=sizes)
    ax.set_yticks(range(len(rows)), labels=[r["test"] for r in rows], fontsize=7)
    for i, r in enumerate(rows):
        for j, s in enumerate(sizes):
            ax.text(j, i, r["cells"][s].split(" (")[0], ha="center", va="center", fontsize=6,
                    color="white" if np.isfinite(data[i, j]) and data[i, j] < 0.6 * vmax else "black")
    ax.set_title(f"percent error, {report['reference']} vs {other}", fontsize=9)
    fig.colorbar(im, ax=ax, label="%")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def delta_histogram(report: dict, other: str, path: Path) -> None:
    plt = _plt()
    h = report["histograms"][other]
    edges = HIST_EDGES
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    ax.bar(edges[:-1], h["counts"], width=HIST_BIN, align="edge", color="tab:blue", edgecolor="black", linewidth=0.3)
    ax.set_xlabel("log10 |delta log-likelihood| per choice")
    ax.set_ylabel("choices")
    total = h["zeros"] + sum(h["counts"])
    ax.set_title(f"{report['reference']} vs {other}: {total} choices, {h['zeros']} identical (delta 0)",
                 fontsize=9)
    ax.set_xlim(edges[0], edges[-1])
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_plots(report: dict, run_dir: Path) -> dict:
    """Draw both plots per backend pair under RUN/plots/; returns {other: {heatmap, deltas}} (relative)."""
    out = {}
    for o in report["others"]:
        rel = {"heatmap": f"plots/heatmap-{o}.png", "deltas": f"plots/deltas-{o}.png"}
        heatmap(report, o, run_dir / rel["heatmap"])
        delta_histogram(report, o, run_dir / rel["deltas"])
        out[o] = rel
    return out
