"""Arrow tables with the MIMIC-IV v2.2 columns and value formats, built from one simulated chunk.

Formats follow the real files: timestamps 'YYYY-MM-DD HH:MM:SS' (shifted future years), dates 'YYYY-MM-DD',
`value` as text beside `valuenum`, lab glucose text de-identified as '___' like MIMIC, empty cells for NULL.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from carebench.data.definitions import load_phenotypes
from carebench.data.synthetic.charting import lab_reference
from carebench.data.synthetic.population import DAY, Population


def ts(seconds: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """int64 seconds since 1970 -> timestamp[s] (NULL where not valid)."""
    arr = pa.array(
        np.asarray(seconds, dtype=np.int64),
        pa.int64(),
        mask=None if valid is None else ~np.asarray(valid, dtype=bool),
    )
    return arr.cast(pa.timestamp("s"))


def _str(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    return pa.array(values, pa.string(), mask=None if valid is None else ~np.asarray(valid, dtype=bool))


def _text(valuenum: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(valuenum, pa.float64()), pa.string())


def patients(pop: Population) -> pa.Table:
    dod_days = pop.dod // DAY
    return pa.table(
        {
            "subject_id": pop.subject_id,
            "gender": _str(pop.gender),
            "anchor_age": pop.anchor_age,
            "anchor_year": pop.anchor_year,
            "anchor_year_group": _str(pop.anchor_year_group),
            "dod": pa.array(dod_days.astype(np.int32), pa.int32(), mask=~pop.has_dod).cast(pa.date32()),
        }
    )


def admissions(rng: np.random.Generator, pop: Population) -> pa.Table:
    n = len(pop.hadm_id)
    providers = np.array([f"P{v:05X}" for v in rng.integers(0, 0xFFFFF, 64)], dtype=object)
    return pa.table(
        {
            "subject_id": pop.subject_id[pop.adm_subject],
            "hadm_id": pop.hadm_id,
            "admittime": ts(pop.admittime),
            "dischtime": ts(pop.dischtime),
            "deathtime": ts(pop.deathtime, pop.has_deathtime),
            "admission_type": _str(pop.admission_type),
            "admit_provider_id": _str(providers[rng.integers(0, len(providers), n)]),
            "admission_location": _str(pop.admission_location),
            "discharge_location": _str(pop.discharge_location),
            "insurance": _str(pop.insurance),
            "language": _str(pop.language),
            "marital_status": _str(pop.marital_status, pop.marital_status != ""),
            "race": _str(pop.race[pop.adm_subject]),
            "edregtime": ts(pop.edregtime, pop.has_ed),
            "edouttime": ts(pop.edouttime, pop.has_ed),
            "hospital_expire_flag": pop.has_deathtime.astype(np.int64),
        }
    )


def icustays(pop: Population) -> pa.Table:
    return pa.table(
        {
            "subject_id": pop.stay_subject_id(),
            "hadm_id": pop.hadm_id[pop.stay_adm],
            "stay_id": pop.stay_id,
            "first_careunit": _str(pop.careunit),
            "last_careunit": _str(pop.careunit),
            "intime": ts(pop.intime),
            "outtime": ts(pop.outtime),
            "los": (pop.outtime - pop.intime) / DAY,
        }
    )


def _stay_keys(pop: Population, stay: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "subject_id": pop.stay_subject_id()[stay],
        "hadm_id": pop.hadm_id[pop.stay_adm[stay]],
        "stay_id": pop.stay_id[stay],
    }


def chartevents(rng: np.random.Generator, pop: Population, ev: dict[str, np.ndarray]) -> pa.Table:
    stay, t = ev["stay"], ev["time"]
    keys = _stay_keys(pop, stay)
    caregivers = rng.integers(1000, 99_999, (pop.n_stays, 3))
    shift = (t // 3600 % 24) // 8
    n = len(stay)
    return pa.table(
        {
            **keys,
            "caregiver_id": caregivers[stay, shift],
            "charttime": ts(t),
            "storetime": ts(t + rng.integers(0, 40, n) * 60),
            "itemid": ev["itemid"],
            "value": _text(ev["value"]),
            "valuenum": ev["value"],
            "valueuom": _str(ev["uom"], ev["uom"] != ""),
            "warning": np.zeros(n, dtype=np.int64),
        }
    )


def outputevents(rng: np.random.Generator, pop: Population, ev: dict[str, np.ndarray]) -> pa.Table:
    stay, t = ev["stay"], ev["time"]
    n = len(stay)
    return pa.table(
        {
            **_stay_keys(pop, stay),
            "caregiver_id": rng.integers(1000, 99_999, n),
            "charttime": ts(t),
            "storetime": ts(t + rng.integers(-20, 30, n) * 60),
            "itemid": ev["itemid"],
            "value": ev["value"],
            "valueuom": _str(ev["uom"]),
        }
    )


def labevents(
    rng: np.random.Generator, pop: Population, ev: dict[str, np.ndarray], first_id: int
) -> pa.Table:
    stay, t, itemid, value = ev["stay"], ev["time"], ev["itemid"], ev["value"]
    n = len(stay)
    uom, lo, hi = lab_reference(itemid)
    v = pa.array(value)
    abnormal = pc.or_(pc.less(v, lo), pc.greater(v, hi))
    text = _text(value)
    hidden = (itemid == 50931) & (rng.random(n) < 0.3)  # MIMIC de-identifies some glucose text
    text = pc.if_else(pa.array(hidden), pa.scalar("___"), text)
    return pa.table(
        {
            "labevent_id": first_id + np.arange(n, dtype=np.int64),
            "subject_id": pop.stay_subject_id()[stay],
            "hadm_id": pop.hadm_id[pop.stay_adm[stay]],
            "specimen_id": first_id // 10 + ev["draw"],
            "itemid": ev["itemid"],
            "order_provider_id": pa.nulls(n, pa.string()),
            "charttime": ts(t),
            "storetime": ts(t + rng.integers(20, 150, n) * 60),
            "value": text,
            "valuenum": value,
            "valueuom": pc.if_else(pc.equal(uom, ""), pa.scalar(None, pa.string()), uom),
            "ref_range_lower": lo,
            "ref_range_upper": hi,
            "flag": pc.if_else(abnormal, pa.scalar("abnormal"), pa.scalar(None, pa.string())),
            "priority": _str(np.where(rng.random(n) < 0.7, "STAT", "ROUTINE").astype(object)),
            "comments": pa.nulls(n, pa.string()),
        }
    )


def diagnoses(pop: Population, dx: dict[str, np.ndarray]) -> pa.Table:
    adm = dx["adm"]
    return pa.table(
        {
            "subject_id": pop.subject_id[pop.adm_subject[adm]],
            "hadm_id": pop.hadm_id[adm],
            "seq_num": dx["seq_num"],
            "icd_code": _str(dx["icd_code"]),
            "icd_version": dx["icd_version"],
        }
    )


def cxr_metadata(
    subject_id: np.ndarray,
    study_id: np.ndarray,
    dicom_id: np.ndarray,
    view: np.ndarray,
    study_date: np.ndarray,
    study_time: np.ndarray,
    size: int,
) -> pa.Table:
    from carebench.data.synthetic.studies import DESCRIPTION, ORIENTATION, VIEW_MEANING

    desc = np.array([DESCRIPTION[v] for v in view], dtype=object)
    return pa.table(
        {
            "dicom_id": _str(dicom_id),
            "subject_id": subject_id,
            "study_id": study_id,
            "PerformedProcedureStepDescription": _str(desc),
            "ViewPosition": _str(view),
            "Rows": np.full(len(view), size, dtype=np.int64),
            "Columns": np.full(len(view), size, dtype=np.int64),
            "StudyDate": study_date,
            "StudyTime": _text(study_time),
            "ProcedureCodeSequence_CodeMeaning": _str(desc),
            "ViewCodeSequence_CodeMeaning": _str(np.array([VIEW_MEANING[v] for v in view], dtype=object)),
            "PatientOrientationCodeSequence_CodeMeaning": _str(
                np.array([ORIENTATION[v] for v in view], dtype=object)
            ),
        }
    )


PLANTED_STAY_COLUMNS_FIXED = (
    "stay_id",
    "subject_id",
    "hadm_id",
    "age",
    "subgroup",
    "acuity",
    "ett",
    "central_line",
    "died_in_icu",
    "cxr_in_window",
)


def planted_stays(pop: Population, cxr_in_window: np.ndarray) -> pa.Table:
    """The truth per ICU stay: acuity, subgroup, devices, planned X-ray, every latent variable and label."""
    from carebench.data.synthetic.population import year_of

    age = pop.anchor_age[pop.stay_subject] + year_of(pop.intime) - pop.anchor_year[pop.stay_subject]
    cols: dict[str, object] = {
        "stay_id": pop.stay_id,
        "subject_id": pop.stay_subject_id(),
        "hadm_id": pop.hadm_id[pop.stay_adm],
        "age": age,
        "subgroup": pop.subgroup[pop.stay_subject].astype(np.int8),
        "acuity": np.round(pop.acuity, 4),
        "ett": pop.ett.astype(np.int8),
        "central_line": pop.central_line.astype(np.int8),
        "died_in_icu": pop.died_in_icu.astype(np.int8),
        "cxr_in_window": cxr_in_window.astype(np.int8),
    }
    for side, values in (("ehr", pop.latent.ehr), ("cxr", pop.latent.cxr)):
        for k, v in values.items():
            cols[f"{side}_{k}"] = v[pop.stay_adm].astype(np.int8)
    for j, p in enumerate(load_phenotypes()):
        cols[p.column] = pop.latent.labels[pop.stay_adm, j].astype(np.int8)
    return pa.table(cols)
