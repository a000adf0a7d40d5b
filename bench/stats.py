"""Rank statistics the benchmarks share (one definition): Spearman's correlation and its bootstrap interval."""

from __future__ import annotations

import numpy as np
import pandas as pd


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties get their average rank); nan when either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(set(a.tolist())) < 2 or len(set(b.tolist())) < 2:
        return float("nan")
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def bootstrap_spearman(a, b, n: int = 2000, seed: int = 0) -> list:
    """95% percentile interval of :func:`spearman` over ``n`` resamples of the pairs."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a), np.asarray(b)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(a), len(a))
        v = spearman(a[idx], b[idx])
        if np.isfinite(v):
            vals.append(v)
    if not vals:   # a constant input: no rank correlation
        return [None, None]
    return [round(float(np.percentile(vals, 2.5)), 3), round(float(np.percentile(vals, 97.5)), 3)]


def bootstrap_spearman_diff(a, b, truth, n: int = 2000, seed: int = 0) -> list:
    """95% percentile interval of ``spearman(a, truth) - spearman(b, truth)`` over ``n`` paired resamples
    (the same resampled units for both): whether ``a`` ranks ``truth`` better than ``b`` beyond noise."""
    rng = np.random.default_rng(seed)
    a, b, truth = np.asarray(a), np.asarray(b), np.asarray(truth)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(a), len(a))
        v = spearman(a[idx], truth[idx]) - spearman(b[idx], truth[idx])
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return [None, None]
    return [round(float(np.percentile(vals, 2.5)), 3), round(float(np.percentile(vals, 97.5)), 3)]
