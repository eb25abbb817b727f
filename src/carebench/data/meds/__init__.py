"""The MEDS producer: a MEDS dataset (event shards + metadata), MEDS label files, an image table and a feature
spec -> a processed dataset, written through the one validated writer (`store.DatasetWriter`; docs/dataset.md, "MEDS").

Stages: source (find and schema-check the files; time order) -> labels (one row per labelled subject and
prediction time) -> splits (folds) -> timeseries (the hourly grid before each prediction time) -> attributes
(age, fairness attributes) -> images (last image before the prediction time, cache) -> write.
"""
