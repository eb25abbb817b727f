"""Find, validate and expose the raw MIMIC-IV tables to DuckDB.

Each table is looked for as `<module>/<name>.csv.gz`, `.csv` or `.parquet` under the MIMIC-IV root (the layout
PhysioNet distributes, or the same files converted). `register_tables` checks that each file exists, can be
read (gzip intact, parquet footer valid) and has the columns we use, then creates one DuckDB view per table
with canonical column names and types. Everything downstream writes SQL against these views only, so it does
not care about the file format or the MIMIC-IV version (v1.0 `ethnicity` is exposed as `race`).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from carebench.errors import UserError

FORMATS = (".csv.gz", ".csv", ".parquet")


class RawDataError(UserError, ValueError):
    """Raw input is missing or malformed. The message names the file/column/option and what was expected."""


@dataclass(frozen=True)
class TableSpec:
    module: str  # "hosp" | "icu"
    name: str
    columns: dict[str, str]  # canonical column -> DuckDB type
    aliases: dict[str, tuple[str, ...]]  # canonical column -> other names accepted (older/newer versions)


_TS = "TIMESTAMP"
TABLES: dict[str, TableSpec] = {
    "patients": TableSpec(
        "hosp",
        "patients",
        {
            "subject_id": "BIGINT",
            "gender": "VARCHAR",
            "anchor_age": "INTEGER",
            "anchor_year": "INTEGER",
        },
        {},
    ),
    "admissions": TableSpec(
        "hosp",
        "admissions",
        {
            "subject_id": "BIGINT",
            "hadm_id": "BIGINT",
            "admittime": _TS,
            "dischtime": _TS,
            "deathtime": _TS,
            "admission_type": "VARCHAR",
            "insurance": "VARCHAR",
            "race": "VARCHAR",
        },
        {"race": ("ethnicity",)},
    ),
    "icustays": TableSpec(
        "icu",
        "icustays",
        {
            "subject_id": "BIGINT",
            "hadm_id": "BIGINT",
            "stay_id": "BIGINT",
            "intime": _TS,
            "outtime": _TS,
        },
        {},
    ),
    "chartevents": TableSpec(
        "icu",
        "chartevents",
        {
            "subject_id": "BIGINT",
            "stay_id": "BIGINT",
            "itemid": "INTEGER",
            "charttime": _TS,
            "valuenum": "DOUBLE",
        },
        {},
    ),
    "labevents": TableSpec(
        "hosp",
        "labevents",
        {
            "subject_id": "BIGINT",
            "hadm_id": "BIGINT",
            "itemid": "INTEGER",
            "charttime": _TS,
            "valuenum": "DOUBLE",
        },
        {},
    ),
    "outputevents": TableSpec(
        "icu",
        "outputevents",
        {
            "subject_id": "BIGINT",
            "stay_id": "BIGINT",
            "itemid": "INTEGER",
            "charttime": _TS,
            "value": "DOUBLE",
        },
        {},
    ),
    "diagnoses_icd": TableSpec(
        "hosp",
        "diagnoses_icd",
        {
            "subject_id": "BIGINT",
            "hadm_id": "BIGINT",
            "icd_code": "VARCHAR",
            "icd_version": "INTEGER",
        },
        {},
    ),
}


@dataclass(frozen=True)
class RawTable:
    spec: TableSpec
    path: Path
    header: tuple[str, ...]

    @property
    def format(self) -> str:
        return next(f for f in FORMATS if self.path.name.endswith(f))


def find_table(root: Path, spec: TableSpec) -> Path:
    candidates = [root / spec.module / f"{spec.name}{ext}" for ext in FORMATS]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise RawDataError(
            f"required table {spec.module}/{spec.name} not found under {root} "
            f"(expected one of: {', '.join(str(p.relative_to(root)) for p in candidates)})"
        )
    return found[0]


def read_header(path: Path) -> tuple[str, ...]:
    """Column names of a csv(.gz) or parquet file; raises RawDataError if the file cannot be read."""
    name = path.name
    try:
        if name.endswith(".parquet"):
            return tuple(pq.read_schema(path).names)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", newline="") as fh:
            line = fh.readline()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        kind = (
            "gzip-compressed CSV"
            if name.endswith(".gz")
            else ("Parquet" if name.endswith(".parquet") else "CSV")
        )
        raise RawDataError(f"{path}: cannot be read as {kind} ({type(e).__name__}: {e})") from e
    except Exception as e:  # pyarrow raises ArrowInvalid for a bad footer
        raise RawDataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if not line.strip():
        raise RawDataError(f"{path}: empty file (expected a CSV header line)")
    return tuple(c.strip().strip('"') for c in line.rstrip("\r\n").split(","))


def locate(root: str | Path, names: list[str] | tuple[str, ...]) -> dict[str, RawTable]:
    """Find and validate each named table under a MIMIC-IV root (no data is read beyond the header)."""
    root = Path(root)
    if not root.exists():
        raise RawDataError(
            f"--mimic-iv {root}: path does not exist (expected the MIMIC-IV root with hosp/ and icu/)"
        )
    if not root.is_dir():
        raise RawDataError(
            f"--mimic-iv {root}: not a directory (expected the MIMIC-IV root with hosp/ and icu/)"
        )
    out: dict[str, RawTable] = {}
    for n in names:
        spec = TABLES[n]
        path = find_table(root, spec)
        header = read_header(path)
        lower = {h.lower(): h for h in header}
        for col in spec.columns:
            options = (col, *spec.aliases.get(col, ()))
            if not any(o in lower for o in options):
                raise RawDataError(f"{path}: missing column '{col}' (found columns: {', '.join(header)})")
        out[n] = RawTable(spec, path, header)
    return out


def _sql_str(s: str | Path) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def scan_sql(table: RawTable) -> str:
    """A SELECT that reads the file and yields the canonical columns with canonical types."""
    spec = table.spec
    lower = {h.lower(): h for h in table.header}
    source_col: dict[str, str] = {}
    for col in spec.columns:
        src = next(lower[o] for o in (col, *spec.aliases.get(col, ())) if o in lower)
        source_col[col] = src
    if table.format == ".parquet":
        reader = f"read_parquet({_sql_str(table.path)})"
    else:
        types = ", ".join(f"{_sql_str(source_col[c])}: {_sql_str(t)}" for c, t in spec.columns.items())
        reader = (
            f"read_csv({_sql_str(table.path)}, header=true, auto_detect=true, "
            f"types={{{types}}}, timestampformat='%Y-%m-%d %H:%M:%S')"
        )
    cols = ", ".join(f'CAST("{source_col[c]}" AS {t}) AS {c}' for c, t in spec.columns.items())
    return f"SELECT {cols} FROM {reader}"


def register_tables(
    con: duckdb.DuckDBPyConnection, root: str | Path, names: list[str] | tuple[str, ...] | None = None
) -> dict[str, RawTable]:
    """Create one view per table (named as the table) on `con`. Returns what was found, for the manifest."""
    tables = locate(root, list(names) if names is not None else list(TABLES))
    for n, t in tables.items():
        con.execute(f"CREATE OR REPLACE VIEW {n} AS {scan_sql(t)}")
    return tables
