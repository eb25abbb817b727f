"""The options of `carebench prepare` and their defaults, written once (the CLI and `pipeline.prepare` read them).

Kept apart from the pipeline so the command line can show the defaults without importing DuckDB and the ETL.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrepareOptions:
    image_size: int = 256  # side in pixels of the square grayscale X-ray cache
    threads: int = 2  # DuckDB and image-decoding threads
    memory_limit: str = "8GB"  # DuckDB memory limit; it spills to disk beyond it
    cxr_lookback_hours: float = 0.0  # also accept X-rays up to this many hours before ICU admission
    seed: int = 0  # seed of the patient-disjoint fold assignment


PREPARE = PrepareOptions()
