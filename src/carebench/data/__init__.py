"""Processed datasets: the contract (`store`), folds and loading, and the producers (`mimic/`, the simulator).

`write_dataset` turns your own arrays and tables into a processed dataset that every later step (train,
benchmark, analyze, report) reads unchanged; `open_dataset` reads one (docs/dataset.md).
"""

from carebench.data.store import DatasetError, DatasetWriter, open_dataset, write_dataset

__all__ = ["DatasetError", "DatasetWriter", "open_dataset", "write_dataset"]
