"""Patient-disjoint, stratified, seed-deterministic cross-validation folds: `prepare` stratifies by in-ICU death
(a subject's stratum is 1 if any of its stays died in the ICU). The dealing itself is generic
(`carebench.data.folds.assign_folds`, also used by `write_dataset` when a cohort comes without folds)."""

from __future__ import annotations

from carebench.data.folds import assign_folds

__all__ = ["assign_folds"]
