"""Read and write the processed dataset (docs/architecture.md, "Processed dataset").

A processed dataset is one directory:
  manifest.json   format version, options, source files, cohort step counts, timings, warnings, feature list
  cohort.parquet  one row per ICU stay, in the row order of the arrays
  ehr.npy         float32 [N, hours, F], raw hourly values, NaN where unobserved
  cxr.npy         uint8 [M, S, S] grayscale image cache (row = cohort.cxr_index), memory-mappable

Directories are written atomically: build everything under a temporary sibling directory, then rename it into
place (`atomic_output_dir`). A crash leaves no half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carebench import atomic
from carebench.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COHORT = "cohort.parquet"
EHR = "ehr.npy"
CXR = "cxr.npy"

# Columns every cohort.parquet has (the 25 pheno_* columns come from definitions.load_phenotypes()).
COHORT_COLUMNS = (
    "stay_id",
    "subject_id",
    "hadm_id",
    "intime",
    "outtime",
    "los_days",
    "age",
    "gender",
    "race",
    "race_group",
    "admission_type",
    "insurance",
    "fold",
    "label_mortality",
    "label_los",
    "has_cxr",
    "cxr_dicom_id",
    "cxr_time",
    "cxr_hours",
    "cxr_view",
    "cxr_index",
)


class DatasetError(UserError, ValueError):
    """A processed dataset is missing or malformed; the message names the file and what was expected."""


@dataclass
class ProcessedDataset:
    root: Path
    manifest: dict[str, Any]
    cohort: pd.DataFrame
    ehr: np.ndarray  # [N, hours, F] float32 (memory-mapped when opened with mmap=True)
    cxr: np.ndarray | None  # [M, S, S] uint8, None when the dataset has no images

    @property
    def features(self) -> list[str]:
        return list(self.manifest["features"])


def atomic_output_dir(out: str | Path, overwrite: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary directory next to `out`; on success rename it to `out`, on failure delete it
    (`carebench.atomic.output_dir`: also removes what a killed earlier run of ours left next to `out`)."""
    return atomic.output_dir(out, overwrite=overwrite)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def open_dataset(root: str | Path, mmap: bool = True) -> ProcessedDataset:
    """Open a processed dataset, checking that its files agree with each other."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (expected a dataset written by `carebench prepare`)")
    for name in (MANIFEST, COHORT, EHR):
        if not (root / name).is_file():
            raise DatasetError(f"{root / name}: missing (expected a dataset written by `carebench prepare`)")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"{root / MANIFEST}: unreadable ({_reason(e)}); expected the JSON manifest of a dataset "
            "written by `carebench prepare` (re-run prepare)"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("features"), list):
        raise DatasetError(f"{root / MANIFEST}: expected a mapping with a 'features' list (re-run prepare)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{root / MANIFEST}: format_version {manifest.get('format_version')!r}, "
            f"this carebench reads {FORMAT_VERSION}"
        )
    try:
        cohort = pd.read_parquet(root / COHORT)
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"{root / COHORT}: unreadable ({_reason(e)}); expected a Parquet file (re-run prepare)"
        ) from None
    missing = [c for c in COHORT_COLUMNS if c not in cohort.columns]
    if missing:
        raise DatasetError(f"{root / COHORT}: missing columns {missing}")
    ehr = _load_npy(root / EHR, mmap)
    if ehr.ndim != 3 or ehr.shape[0] != len(cohort) or ehr.shape[2] != len(manifest["features"]):
        raise DatasetError(
            f"{root / EHR}: shape {ehr.shape} does not match {len(cohort)} stays x "
            f"{len(manifest['features'])} features"
        )
    cxr = None
    if (root / CXR).is_file():
        cxr = _load_npy(root / CXR, mmap)
        n_img = int(cohort["has_cxr"].sum())
        if cxr.ndim != 3 or cxr.shape[0] != n_img:
            raise DatasetError(f"{root / CXR}: shape {cxr.shape} does not match {n_img} stays with an X-ray")
    return ProcessedDataset(root=root, manifest=manifest, cohort=cohort, ehr=ehr, cxr=cxr)


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    """A .npy array (never pickled objects); an unreadable or truncated file is a DatasetError naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(
            f"{path}: unreadable ({_reason(e)}); expected a NumPy .npy array (re-run prepare)"
        ) from None


def dataset_fingerprint(root: str | Path) -> str:
    """Identifies a processed dataset independently of its path and of when it was built.

    The manifest's `content_sha256` (digests of cohort.parquet, ehr.npy and cxr.npy, written by `prepare`), so
    re-preparing the same inputs keeps every run valid; for a dataset without it, the hash of manifest.json.
    Every run records it (`runs`), and a run is only evaluated on a dataset with the same fingerprint.
    """
    p = Path(root) / MANIFEST
    if not p.is_file():
        raise DatasetError(f"{p}: missing (expected a dataset written by `carebench prepare`)")
    raw = p.read_bytes()
    try:
        content = json.loads(raw).get("content_sha256")
    except (ValueError, AttributeError):
        content = None
    if isinstance(content, dict) and content:
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return hashlib.sha256(raw).hexdigest()[:16]
