"""The options of `carebench prepare --meds` and their defaults, written once (the CLI and `pipeline.prepare_meds`
read them). Kept apart from the pipeline so `--help` shows the defaults without importing DuckDB."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MedsOptions:
    image_size: int = 256  # side in pixels of the square grayscale image cache
    image_lookback_hours: float | None = None  # None: the EHR window (the spec's hours)
    folds: str = "auto"  # auto | splits | hash (data/meds/splits.py)
    seed: int = 0  # seed of the subject-disjoint fold assignment
    threads: int = 2  # DuckDB and image-decoding threads
    memory_limit: str = "8GB"  # DuckDB memory limit; it spills to disk beyond it


MEDS = MedsOptions()
