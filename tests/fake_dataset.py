"""A small MIMIC-shaped processed dataset written through `write_dataset`, for tests of loading, training and
analysis.

Why: training tests must not wait for (or depend on) the full `prepare` pipeline, yet they should read exactly
what `prepare` writes: the same writer, the same declarations (the MIMIC tasks, fairness attributes and
intersections), cohort.parquet with the MIMIC columns (25 pheno_* columns, folds 1-5 that are patient-disjoint),
ehr.npy float32 [N, 48, F] with NaN where unobserved, cxr.npy uint8 [M, S, S]. Labels depend on the inputs (a
planted signal), so a trained model can beat chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from carebench.data import write_dataset
from carebench.data.definitions import load_phenotypes
from carebench.data.mimic.pipeline import MIMIC_FAIRNESS, MIMIC_INTERSECTIONS, mimic_tasks

HOURS = 48


def make_fake_dataset(
    tmp_path: str | Path,
    n: int = 200,
    *,
    with_cxr: bool = True,
    cxr_fraction: float = 0.6,
    n_features: int = 6,
    image_size: int = 32,
    missing_rate: float = 0.6,
    seed: int = 0,
    name: str = "data",
) -> Path:
    """Write a fake processed dataset to `tmp_path / name` and return its path.

    n stays of n // 2 + 1 patients; fold = 1 + (subject index mod 5) (patient-disjoint); `cxr_fraction` of the
    stays have an X-ray when `with_cxr` (otherwise has_cxr is all False and no cxr.npy is written). Mortality,
    LOS and phenotype labels are drawn from a logistic model of the first feature's mean and image brightness.
    """
    rng = np.random.default_rng(seed)
    root = Path(tmp_path) / name
    if root.exists():
        raise FileExistsError(root)
    features = [f"feat_{i}" for i in range(n_features)]

    base = rng.normal(0.0, 1.0, size=(n, 1, n_features))
    ehr = (base * 10 + 50 + rng.normal(0, 2.0, size=(n, HOURS, n_features))).astype(np.float32)
    ehr[rng.random(ehr.shape) < missing_rate] = np.nan
    severity = base[:, 0, 0]

    has_cxr = (rng.random(n) < cxr_fraction) if with_cxr else np.zeros(n, dtype=bool)
    cxr_index = np.full(n, -1, dtype=np.int64)
    cxr_index[has_cxr] = np.arange(int(has_cxr.sum()))
    brightness = np.zeros(n)
    if with_cxr:
        brightness[has_cxr] = rng.normal(0.0, 1.0, size=int(has_cxr.sum()))
        m = int(has_cxr.sum())
        noise = rng.normal(0, 20, size=(m, image_size, image_size))
        level = 128 + 40 * brightness[has_cxr][:, None, None]
        cxr = np.clip(level + noise, 0, 255).astype(np.uint8)

    logit = 1.5 * severity + 1.0 * brightness - 1.0
    mortality = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    los = np.clip(np.round(2 + 1.2 * severity + rng.normal(0, 1, n)), 0, 6).astype(np.int8)
    subject = np.arange(n) // 2 + 10_000
    intime = pd.Timestamp("2150-01-01") + pd.to_timedelta(np.arange(n) * 7, unit="h")
    cxr_hours = np.where(has_cxr, rng.uniform(-12, 47, n), np.nan)
    cohort = pd.DataFrame(
        {
            "stay_id": np.arange(n, dtype=np.int64) * 3 + 30_000_000,
            "subject_id": subject.astype(np.int64),
            "hadm_id": np.arange(n, dtype=np.int64) + 20_000_000,
            "intime": intime,
            "outtime": intime + pd.to_timedelta(2 + los, unit="D"),
            "los_days": (2.5 + los).astype(float),
            "age": rng.uniform(18, 90, n).round(),
            "gender": rng.choice(["M", "F"], n),
            "race": rng.choice(["WHITE", "BLACK/AFRICAN AMERICAN", "ASIAN"], n),
            "race_group": "WHITE",
            "admission_type": "EW EMER.",
            "insurance": "Other",
            "fold": (1 + (subject - subject.min()) % 5).astype(np.int8),
            "label_mortality": mortality,
            "label_los": los,
        }
    )
    for j, ph in enumerate(load_phenotypes()):
        logit_j = severity * (1 if j % 2 else -1) + 0.5 * brightness - 0.5 + 0.05 * j
        cohort[ph.column] = (rng.random(n) < 1 / (1 + np.exp(-logit_j))).astype(np.int8)
    cohort["has_cxr"] = has_cxr
    cohort["cxr_dicom_id"] = [f"dicom{i}" if h else None for i, h in enumerate(has_cxr)]
    cohort["cxr_time"] = intime + pd.to_timedelta(np.nan_to_num(cxr_hours), unit="h")
    cohort.loc[~has_cxr, "cxr_time"] = pd.NaT
    cohort["cxr_hours"] = cxr_hours
    cohort["cxr_view"] = np.where(has_cxr, "AP", None)
    cohort["cxr_index"] = cxr_index

    return write_dataset(
        root,
        cohort=cohort,
        ehr=ehr,
        features=features,
        tasks=mimic_tasks(),
        images=cxr if with_cxr else None,
        fairness=MIMIC_FAIRNESS,
        intersections=MIMIC_INTERSECTIONS,
        producer={"name": "tests/fake_dataset.py", "options": {"seed": seed, "image_size": image_size}},
    )
