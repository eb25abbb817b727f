"""Find, validate and expose the raw MIMIC-IV tables to DuckDB.

Each table is looked for as `<module>/<name>.csv.gz`, `.csv` or `.parquet` under the MIMIC-IV root (the layout
PhysioNet distributes, or the same files converted). `register_tables` checks that each file exists, can be
read (gzip intact, parquet footer valid, UTF-8 with or without a byte-order mark) and has the columns we use,
then creates one DuckDB view per table with canonical column names and types. Everything downstream writes SQL
against these views only, so it does not care about the file format or the MIMIC-IV release.

Releases (docs/cohort.md, "Supported MIMIC-IV releases"): v1.0 keeps patients and admissions under `core/` and
names the race column `ethnicity`; v2.x and v3.x keep them under `hosp/` and call it `race`. Both layouts are
found (`TableSpec.legacy_modules`) and `ethnicity` is exposed as `race`; `describe_release` records which layout
and release was read, and `check_itemids` checks the features' itemids against the release's own item
dictionaries (`icu/d_items`, `hosp/d_labitems`), so a release that renumbered an item is reported by name.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    legacy_modules: tuple[str, ...] = ()  # other folders of older releases (v1.0: core/)
    rows: str = "rows"  # what one row is, for the message about an empty table


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
        ("core",),
        "one row per patient",
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
        ("core",),
        "one row per hospital admission",
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
        (),
        "one row per ICU stay",
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
        (),
        "the ICD codes of each admission",
    ),
}


# What a required table without rows would silently turn into, for the error message.
EMPTY_MEANS = {
    "patients": "no stay could be aged or linked",
    "admissions": "no stay could be linked or labelled",
    "icustays": "there are no ICU stays",
    "diagnoses_icd": "every phenotype label would be 0",
}
EVENT_TABLES = ("chartevents", "labevents", "outputevents")


@dataclass(frozen=True)
class RawTable:
    spec: TableSpec
    path: Path
    header: tuple[str, ...]
    root: Path | None = None

    @property
    def format(self) -> str:
        return next(f for f in FORMATS if self.path.name.endswith(f))

    @property
    def module(self) -> str:
        """The folder the table was found in (`core` for a v1.0 patients table)."""
        return self.path.parent.name

    @property
    def label(self) -> str:
        """`<module>/<name>`, as found (e.g. `core/patients` in v1.0, `hosp/patients` later)."""
        return f"{self.module}/{self.spec.name}"

    def source_column(self, col: str) -> str:
        """The file's own name of canonical column `col` (e.g. `ethnicity` for `race` in v1.0)."""
        lower = {h.lower(): h for h in self.header}
        return next(lower[o] for o in (col, *self.spec.aliases.get(col, ())) if o in lower)


def find_table(root: Path, spec: TableSpec) -> Path:
    """The file of one table: `<module>/<name>` in the first format found; a v1.0 folder (`core/`) is looked in
    too, and a table present in both layouts is an error (two releases mixed in one root)."""
    modules = (spec.module, *spec.legacy_modules)
    per_module = {
        m: [p for p in (root / m / f"{spec.name}{ext}" for ext in FORMATS) if p.is_file()] for m in modules
    }
    found = {m: ps[0] for m, ps in per_module.items() if ps}
    if len(found) > 1:
        a, b = (str(p.relative_to(root)) for p in found.values())
        raise RawDataError(
            f"table {spec.name} found twice under {root}: {a} and {b} (expected one: MIMIC-IV v1.0 keeps it in "
            f"{spec.legacy_modules[0]}/, v2.0 and later in {spec.module}/; remove the copy of the other release)"
        )
    if not found:
        candidates = [root / m / f"{spec.name}{ext}" for m in modules for ext in FORMATS]
        hint = _root_hint(root)
        raise RawDataError(
            f"required table {spec.module}/{spec.name} not found under {root} "
            f"(expected one of: {', '.join(str(p.relative_to(root)) for p in candidates)}){hint}"
        )
    return next(iter(found.values()))


def _root_hint(root: Path) -> str:
    """When --mimic-iv points one level too high (e.g. at `mimiciv/` holding `2.2/`), name the release folder."""
    if (root / "hosp").is_dir() or (root / "icu").is_dir():
        return ""
    try:
        subs = sorted(
            d.name for d in root.iterdir() if d.is_dir() and ((d / "hosp").is_dir() or (d / "icu").is_dir())
        )
    except OSError:
        return ""
    if subs:
        return f"; {root} holds the release folder(s) {', '.join(subs)}: pass --mimic-iv {root / subs[-1]}"
    return "; there is no hosp/ or icu/ folder there (expected the MIMIC-IV release folder)"


def read_header(path: Path) -> tuple[str, ...]:
    """Column names of a csv(.gz) or parquet file; raises RawDataError if the file cannot be read.

    A UTF-8 byte-order mark (what spreadsheet programs write) is skipped; a UTF-16 file is an error that says so.
    """
    name = path.name
    try:
        if name.endswith(".parquet"):
            return tuple(pq.read_schema(path).names)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(4)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise RawDataError(
                f"{path}: the file is UTF-16 encoded (as some spreadsheet programs save 'Unicode text'); "
                "expected UTF-8 CSV (re-save it as 'CSV UTF-8' or re-download the original)"
            )
        with opener(path, "rt", newline="", encoding="utf-8-sig") as fh:
            line = fh.readline()
    except RawDataError:
        raise
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
                also = (
                    f" or {', '.join(repr(a) for a in options[1:])} (MIMIC-IV v1.0)"
                    if len(options) > 1
                    else ""
                )
                raise RawDataError(
                    f"{path}: missing column '{col}'{also} (found columns: {', '.join(header)})"
                )
        out[n] = RawTable(spec, path, header, root)
    return out


def _sql_str(s: str | Path) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def scan_sql(table: RawTable) -> str:
    """A SELECT that reads the file and yields the canonical columns with canonical types."""
    spec = table.spec
    source_col = {col: table.source_column(col) for col in spec.columns}
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


def empty_tables(con: duckdb.DuckDBPyConnection, tables: dict[str, RawTable]) -> list[str]:
    """The registered tables with a header but no row (reads at most one row of each)."""
    return [n for n in tables if con.execute(f"SELECT 1 FROM {n} LIMIT 1").fetchone() is None]


def check_required_rows(tables: dict[str, RawTable], empty: list[str]) -> None:
    """A required table without rows is an error naming its file (an empty event table is judged later, by the
    feature groups it leaves empty)."""
    for n in empty:
        if n in EMPTY_MEANS:
            t = tables[n]
            raise RawDataError(
                f"{t.path}: has a header but no rows (expected {t.spec.rows}; without them "
                f"{EMPTY_MEANS[n]}). Is the file complete? Re-download or re-export it"
            )


_VERSION = re.compile(r"(?:^|[^0-9.])v?(\d+\.\d+)(?:\.\d+)?$")
DICTIONARIES = {
    "chartevents": ("icu", "d_items"),
    "outputevents": ("icu", "d_items"),
    "labevents": ("hosp", "d_labitems"),
}


def describe_release(root: str | Path, tables: dict[str, RawTable]) -> dict[str, Any]:
    """Which MIMIC-IV layout and release the tables came from, for the manifest.

    `layout`: "v1.0 (core/, hosp/, icu/)" when patients/admissions were found under core/, else "v2.0+ (hosp/,
    icu/)". `version`: the release number in the root folder's name as PhysioNet names it (`2.2`,
    `mimic-iv-demo-2.2`, `mimiciv/3.1`), else null. `release`: the version, or what the layout implies.
    `race_column`: the column read as race. `notes`: disagreements (a folder named 2.2 with the v1.0 layout).
    """
    root = Path(root)
    legacy = sorted(t.label for t in tables.values() if t.module in t.spec.legacy_modules)
    layout = "v1.0 (core/, hosp/, icu/)" if legacy else "v2.0+ (hosp/, icu/)"
    m = _VERSION.search(root.name)
    version = m.group(1) if m else None
    race = tables["admissions"].source_column("race") if "admissions" in tables else None
    notes = []
    if version is not None:
        major = int(version.split(".")[0])
        if legacy and major >= 2:
            notes.append(
                f"the folder says release {version} but {', '.join(legacy)} use the v1.0 core/ layout"
            )
        if not legacy and major < 2 and "patients" in tables:
            notes.append(
                f"the folder says release {version} but patients/admissions are under hosp/ (v2.0+ layout)"
            )
    release = version or ("1.x" if legacy else "2.0 or later")
    return {
        "release": release,
        "version_from_folder": version,
        "layout": layout,
        "demo": "demo" in root.name.lower(),
        "race_column": race,
        "legacy_tables": legacy,
        "notes": notes,
    }


def find_dictionary(root: Path, module: str, name: str) -> Path | None:
    for ext in FORMATS:
        p = root / module / f"{name}{ext}"
        if p.is_file():
            return p
    return None


def check_itemids(root: str | Path, itemids: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """Check each feature's itemids against the release's item dictionaries (`icu/d_items`, `hosp/d_labitems`),
    when they are present: an itemid the release does not define was renumbered or dropped by it.

    `itemids`: feature -> source table -> itemids. Returns {"dictionaries": {table: path or None},
    "missing": {feature: {source: [itemids]}}} (only features with missing itemids).
    """
    root = Path(root)
    known: dict[str, set[int] | None] = {}
    used: dict[str, str | None] = {}
    con = duckdb.connect(":memory:")
    try:
        for source, (module, name) in DICTIONARIES.items():
            path = find_dictionary(root, module, name)
            used[source] = f"{module}/{path.name}" if path else None
            if path is None:
                known[source] = None
                continue
            header = read_header(path)
            if "itemid" not in {h.lower() for h in header}:
                raise RawDataError(f"{path}: missing column 'itemid' (found columns: {', '.join(header)})")
            reader = (
                f"read_parquet({_sql_str(path)})"
                if path.name.endswith(".parquet")
                else f"read_csv({_sql_str(path)}, header=true, auto_detect=true, all_varchar=true)"
            )
            rows = con.execute(f"SELECT DISTINCT TRY_CAST(itemid AS BIGINT) FROM {reader}").fetchall()
            known[source] = {int(r[0]) for r in rows if r[0] is not None}
    except duckdb.Error as e:
        raise RawDataError(
            f"reading the item dictionaries under {root} failed: {str(e).splitlines()[0]}"
        ) from e
    finally:
        con.close()
    missing: dict[str, dict[str, list[int]]] = {}
    for feature, per_source in itemids.items():
        for source, ids in per_source.items():
            have = known.get(source)
            if have is None:
                continue
            gone = sorted(i for i in ids if i not in have)
            if gone:
                missing.setdefault(feature, {})[source] = gone
    return {"dictionaries": used, "missing": missing}
