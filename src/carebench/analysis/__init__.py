"""Analysis: finished runs -> pooled tables (comparisons, fairness, missing X-rays, modality contribution).

`options` (what `carebench analyze` computes, resolved once), `pooling` (run records -> groups and long
prediction tables), `comparisons` (leaderboards and paired tests), `fairness` (per-run fairness tables),
`modality` (re-predicting a run under ablations and test-time X-ray dropout), `analyze` (the driver) and `outputs`
(RUNS/analysis/, what the report reads). Every number comes from the kernels in `carebench.evaluation`.
"""
