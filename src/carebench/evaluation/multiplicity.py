"""Multiplicity adjustment of p-values: Holm (family-wise error) and Benjamini-Hochberg (false discovery rate).

Both are applied within a family of tests; a NaN p-value (a test that could not be made) stays NaN and does not
count in its family. docs/statistics.md has the definitions and the families the analysis uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from carebench.evaluation.statistics import StatisticsInputError


def _p_array(pvalues) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise StatisticsInputError(f"p-values: expected a 1-D array, got shape {p.shape}")
    if ((p[~np.isnan(p)] < 0) | (p[~np.isnan(p)] > 1)).any():
        raise StatisticsInputError("p-values must lie in [0, 1]")
    return p


def _adjust(pvalues, step: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply `step` (sorted p-values -> adjusted, same order) to the non-NaN p-values; NaN stays NaN and does
    not count in the family."""
    p = _p_array(pvalues)
    out = np.full(len(p), np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    order = np.argsort(q, kind="stable")
    adj = np.empty(len(q))
    adj[order] = np.minimum(1.0, step(q[order]))
    out[ok] = adj
    return out


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error). NaN stays NaN and does not count in the family."""
    return _adjust(pvalues, lambda q: np.maximum.accumulate((len(q) - np.arange(len(q))) * q))


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate). NaN stays NaN and does not count."""
    return _adjust(
        pvalues, lambda q: np.minimum.accumulate((q * len(q) / np.arange(1, len(q) + 1))[::-1])[::-1]
    )
