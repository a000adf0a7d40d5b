"""Human-readable outputs of a search: the front as a table, and ``pareto.png``."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .pareto import maximize

logger = logging.getLogger(__name__)


def front_table(front: pd.DataFrame, metric: str) -> str:
    """The front as a fixed-width text table, smallest model first."""
    if front.empty:
        return "(no completed trial: the front is empty)"
    extra = metric not in ("accuracy", "perplexity")
    header = (f"{'trial':<10} {'weights MB':>10} {'avg bits':>8} {'perplexity':>10} {'accuracy':>8}"
              + (f" {metric:>14}" if extra else "") + "  plan (4=nf4 f=fp4 8=int8 H=bf16)")
    lines = [header, "-" * len(header)]
    for _, r in front.iterrows():
        lines.append(f"{str(r['trial_id']):<10} {r['weight_bytes'] / 1e6:>10.2f} {r['avg_bits']:>8.2f} "
                     f"{r['perplexity']:>10.3f} {r['accuracy']:>8.4f}" + (f" {r[metric]:>14.4f}" if extra else "")
                     + f"  {r['plan_code']}")
    lines.append(f"objective: {'max' if maximize(metric) else 'min'} {metric}")
    return "\n".join(lines)


def plot_front(trials: pd.DataFrame, front: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """Scatter every completed trial (memory vs metric) and draw the front as a step line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ok = trials[trials["status"] == "ok"] if not trials.empty and "status" in trials else trials.iloc[0:0]
    if not ok.empty:
        for origin, marker in (("searcher", "o"), ("seed:sampled", "s"), ("seed:uniform", "D")):
            part = ok[ok["origin"] == origin]
            if not part.empty:
                ax.scatter(part["weight_bytes"] / 1e6, part[metric], marker=marker, alpha=0.6,
                           label=f"{origin} ({len(part)})")
    if not front.empty:
        ax.step(front["weight_bytes"] / 1e6, front[metric], where="post" if maximize(metric) else "pre",
                color="black", linewidth=1.2, label=f"Pareto front ({len(front)})")
        ax.scatter(front["weight_bytes"] / 1e6, front[metric], facecolors="none", edgecolors="black", s=90)
        for _, r in front.iterrows():
            ax.annotate(f"{r['avg_bits']:.2f}b", (r["weight_bytes"] / 1e6, r[metric]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("weight memory (MB)")
    ax.set_ylabel(f"{metric} ({'higher' if maximize(metric) else 'lower'} is better)")
    ax.set_title("QPruner: accuracy vs. memory of the quantized pruned model")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
