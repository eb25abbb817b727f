"""Streaming gzip CSV output in the MIMIC-IV / MIMIC-CXR-JPG file formats.

Why gzip members: each chunk of stays is serialised to CSV and compressed *in the worker that generated it*
(one complete gzip member); the parent only appends members to the open file. A file of concatenated gzip
members is a valid gzip file (RFC 1952) that zcat, Python, pandas and DuckDB read as one stream, so both
cores compress and memory stays flat in the number of stays. `mtime=0` makes the bytes reproducible.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv

COMPRESS_LEVEL = 1

# Column order of MIMIC-IV v2.2 (hosp/, icu/) and of mimic-cxr-2.0.0-metadata.csv.
HEADERS: dict[str, tuple[str, ...]] = {
    "mimic-iv/hosp/patients.csv.gz": (
        "subject_id",
        "gender",
        "anchor_age",
        "anchor_year",
        "anchor_year_group",
        "dod",
    ),
    "mimic-iv/hosp/admissions.csv.gz": (
        "subject_id",
        "hadm_id",
        "admittime",
        "dischtime",
        "deathtime",
        "admission_type",
        "admit_provider_id",
        "admission_location",
        "discharge_location",
        "insurance",
        "language",
        "marital_status",
        "race",
        "edregtime",
        "edouttime",
        "hospital_expire_flag",
    ),
    "mimic-iv/hosp/diagnoses_icd.csv.gz": ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"),
    "mimic-iv/hosp/labevents.csv.gz": (
        "labevent_id",
        "subject_id",
        "hadm_id",
        "specimen_id",
        "itemid",
        "order_provider_id",
        "charttime",
        "storetime",
        "value",
        "valuenum",
        "valueuom",
        "ref_range_lower",
        "ref_range_upper",
        "flag",
        "priority",
        "comments",
    ),
    "mimic-iv/hosp/d_labitems.csv.gz": ("itemid", "label", "fluid", "category"),
    "mimic-iv/icu/icustays.csv.gz": (
        "subject_id",
        "hadm_id",
        "stay_id",
        "first_careunit",
        "last_careunit",
        "intime",
        "outtime",
        "los",
    ),
    "mimic-iv/icu/chartevents.csv.gz": (
        "subject_id",
        "hadm_id",
        "stay_id",
        "caregiver_id",
        "charttime",
        "storetime",
        "itemid",
        "value",
        "valuenum",
        "valueuom",
        "warning",
    ),
    "mimic-iv/icu/outputevents.csv.gz": (
        "subject_id",
        "hadm_id",
        "stay_id",
        "caregiver_id",
        "charttime",
        "storetime",
        "itemid",
        "value",
        "valueuom",
    ),
    "mimic-iv/icu/d_items.csv.gz": (
        "itemid",
        "label",
        "abbreviation",
        "linksto",
        "category",
        "unitname",
        "param_type",
        "lownormalvalue",
        "highnormalvalue",
    ),
    "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz": (
        "dicom_id",
        "subject_id",
        "study_id",
        "PerformedProcedureStepDescription",
        "ViewPosition",
        "Rows",
        "Columns",
        "StudyDate",
        "StudyTime",
        "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ),
    "planted_stays.csv.gz": (),  # columns decided by the simulator (truth per ICU stay)
}
# MIMIC quotes a value only when it holds a comma or quote: "none" writes strings bare and raises if one would
# need quoting, so a table that may hold such text (the dictionaries) is written with quote="needed".
_OPTIONS = {q: pacsv.WriteOptions(include_header=False, quoting_style=q) for q in ("none", "needed")}


def gzip_member(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=COMPRESS_LEVEL, mtime=0)


def csv_member(table: pa.Table, columns: tuple[str, ...], quote: str = "none") -> bytes:
    """One gzip member holding the rows of `table` (columns in `columns` order, no header)."""
    if columns and tuple(table.column_names) != columns:
        raise ValueError(f"columns {table.column_names} do not match the expected header {columns}")
    buf = io.BytesIO()
    pacsv.write_csv(table, buf, write_options=_OPTIONS[quote])
    return gzip_member(buf.getvalue())


class GzipCsvFiles:
    """The open output files of one run; `append` adds a chunk's member, `close` closes all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[str, BinaryIO] = {}

    def append(self, name: str, member: bytes, columns: tuple[str, ...]) -> None:
        fh = self._files.get(name)
        if fh is None:
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "wb")
            fh.write(gzip_member((",".join(columns) + "\n").encode()))
            self._files[name] = fh
        fh.write(member)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


# Dictionary rows (as in MIMIC-IV v2.2) for the itemids the simulator writes.
D_ITEMS: tuple[tuple, ...] = (
    (220045, "Heart Rate", "HR", "chartevents", "Routine Vital Signs", "bpm", "Numeric", None, None),
    (
        220046,
        "Heart rate Alarm - High",
        "HR Alarm - High",
        "chartevents",
        "Alarms",
        "bpm",
        "Numeric",
        None,
        None,
    ),
    (
        220047,
        "Heart Rate Alarm - Low",
        "HR Alarm - Low",
        "chartevents",
        "Alarms",
        "bpm",
        "Numeric",
        None,
        None,
    ),
    (
        220050,
        "Arterial Blood Pressure systolic",
        "ABPs",
        "chartevents",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        90,
        140,
    ),
    (
        220051,
        "Arterial Blood Pressure diastolic",
        "ABPd",
        "chartevents",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        60,
        90,
    ),
    (
        220052,
        "Arterial Blood Pressure mean",
        "ABPm",
        "chartevents",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        None,
        None,
    ),
    (
        220179,
        "Non Invasive Blood Pressure systolic",
        "NBPs",
        "chartevents",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        None,
        None,
    ),
    (
        220180,
        "Non Invasive Blood Pressure diastolic",
        "NBPd",
        "chartevents",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        None,
        None,
    ),
    (
        220181,
        "Non Invasive Blood Pressure mean",
        "NBPm",
        "chartevents",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        None,
        None,
    ),
    (
        225312,
        "ART BP Mean",
        "ART BP Mean",
        "chartevents",
        "Routine Vital Signs",
        "mmHg",
        "Numeric",
        None,
        None,
    ),
    (220210, "Respiratory Rate", "RR", "chartevents", "Respiratory", "insp/min", "Numeric", None, None),
    (
        224690,
        "Respiratory Rate (Total)",
        "Respiratory Rate (Total)",
        "chartevents",
        "Respiratory",
        "insp/min",
        "Numeric",
        None,
        36,
    ),
    (220277, "O2 saturation pulseoxymetry", "SpO2", "chartevents", "Respiratory", "%", "Numeric", None, None),
    (
        223761,
        "Temperature Fahrenheit",
        "Temperature F",
        "chartevents",
        "Routine Vital Signs",
        "°F",
        "Numeric",
        None,
        None,
    ),
    (
        223762,
        "Temperature Celsius",
        "Temperature C",
        "chartevents",
        "Routine Vital Signs",
        "°C",
        "Numeric",
        None,
        None,
    ),
    (220621, "Glucose (serum)", "Glucose (serum)", "chartevents", "Labs", "None", "Numeric", None, None),
    (
        225664,
        "Glucose finger stick (range 70-100)",
        "Glucose FS (range 70 -100)",
        "chartevents",
        "Labs",
        "None",
        "Numeric",
        None,
        None,
    ),
    (220739, "GCS - Eye Opening", "Eye Opening", "chartevents", "Neurological", None, "Text", None, None),
    (
        223900,
        "GCS - Verbal Response",
        "Verbal Response",
        "chartevents",
        "Neurological",
        None,
        "Text",
        None,
        None,
    ),
    (
        223901,
        "GCS - Motor Response",
        "Motor Response",
        "chartevents",
        "Neurological",
        None,
        "Text",
        None,
        None,
    ),
    (223835, "Inspired O2 Fraction", "FiO2", "chartevents", "Respiratory", "None", "Numeric", None, None),
    (
        226512,
        "Admission Weight (Kg)",
        "Admission Weight (Kg)",
        "chartevents",
        "General",
        "kg",
        "Numeric",
        None,
        None,
    ),
    (224639, "Daily Weight", "Daily Weight", "chartevents", "General", "kg", "Numeric", None, None),
    (226707, "Height", "Height", "chartevents", "General", "Inch", "Numeric", None, None),
    (226559, "Foley", "Foley", "outputevents", "Output", "mL", "Numeric", None, None),
    (226560, "Void", "Void", "outputevents", "Output", "mL", "Numeric", None, None),
    (226561, "Condom Cath", "Condom Cath", "outputevents", "Output", "mL", "Numeric", None, None),
    (
        227489,
        "GU Irrigant/Urine Volume Out",
        "GU Irrigant/Urine Volume Out",
        "outputevents",
        "Output",
        "mL",
        "Numeric",
        None,
        None,
    ),
)
D_LABITEMS: tuple[tuple, ...] = (
    (50806, "Chloride, Whole Blood", "Blood", "Blood Gas"),
    (50809, "Glucose", "Blood", "Blood Gas"),
    (50810, "Hematocrit, Calculated", "Blood", "Blood Gas"),
    (50811, "Hemoglobin", "Blood", "Blood Gas"),
    (50813, "Lactate", "Blood", "Blood Gas"),
    (50818, "pCO2", "Blood", "Blood Gas"),
    (50820, "pH", "Blood", "Blood Gas"),
    (50821, "pO2", "Blood", "Blood Gas"),
    (50822, "Potassium, Whole Blood", "Blood", "Blood Gas"),
    (50824, "Sodium, Whole Blood", "Blood", "Blood Gas"),
    (50861, "Alanine Aminotransferase (ALT)", "Blood", "Chemistry"),
    (50862, "Albumin", "Blood", "Chemistry"),
    (50868, "Anion Gap", "Blood", "Chemistry"),
    (50878, "Asparate Aminotransferase (AST)", "Blood", "Chemistry"),
    (50882, "Bicarbonate", "Blood", "Chemistry"),
    (50885, "Bilirubin, Total", "Blood", "Chemistry"),
    (50893, "Calcium, Total", "Blood", "Chemistry"),
    (50902, "Chloride", "Blood", "Chemistry"),
    (50912, "Creatinine", "Blood", "Chemistry"),
    (50931, "Glucose", "Blood", "Chemistry"),
    (50960, "Magnesium", "Blood", "Chemistry"),
    (50970, "Phosphate", "Blood", "Chemistry"),
    (50971, "Potassium", "Blood", "Chemistry"),
    (50983, "Sodium", "Blood", "Chemistry"),
    (51006, "Urea Nitrogen", "Blood", "Chemistry"),
    (51221, "Hematocrit", "Blood", "Hematology"),
    (51222, "Hemoglobin", "Blood", "Hematology"),
    (51237, "INR(PT)", "Blood", "Hematology"),
    (51265, "Platelet Count", "Blood", "Hematology"),
    (51274, "PT", "Blood", "Hematology"),
    (51275, "PTT", "Blood", "Hematology"),
    (51277, "RDW", "Blood", "Hematology"),
    (51300, "WBC Count", "Blood", "Hematology"),
    (51301, "White Blood Cells", "Blood", "Hematology"),
)


def dictionary_members() -> dict[str, bytes]:
    """d_items and d_labitems as gzip members (header written by GzipCsvFiles)."""
    out = {}
    for name, rows in (
        ("mimic-iv/icu/d_items.csv.gz", D_ITEMS),
        ("mimic-iv/hosp/d_labitems.csv.gz", D_LABITEMS),
    ):
        cols = HEADERS[name]
        data = {c: [r[i] for r in rows] for i, c in enumerate(cols)}
        out[name] = csv_member(pa.table(data), cols, quote="needed")
    return out
