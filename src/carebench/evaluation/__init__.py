"""The kernels: pure functions of arrays that know nothing of run folders (a leaf anyone may import).

`metrics` (every performance metric from probabilities), `statistics` (rank metrics, bootstrap CIs, paired
permutation tests), `multiplicity` (Holm, Benjamini-Hochberg), `fairness` (per-group metrics, gaps, parity,
their bootstrap). Reading finished runs into pooled tables is `carebench.analysis`.
"""
