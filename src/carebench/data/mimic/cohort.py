"""The cohort stage: which ICU stays enter the benchmark, their demographics and two of the three labels.

Rules (docs/cohort.md gives the reasoning and the counts on the demo):
  1. every row of icu/icustays;
  2. whose subject is in hosp/patients and whose hadm_id is in hosp/admissions for the same subject
     (a stay we cannot age or label cannot be used);
  3. adult: age at ICU admission `anchor_age + year(intime) - anchor_year` >= min_age (18);
  4. ICU stay of at least min_los_hours (48 h): the EHR window is the first 48 h, and the LOS task predicts
     the remaining stay at 48 h. A stay without outtime has no length and is excluded here.

Labels: `label_mortality` = admissions.deathtime within [intime, outtime] (death in this ICU stay);
`label_los` = class of the ICU length of stay over `definitions.LOS_BINS_DAYS` (the last class is open-ended,
so very long stays are class 6, never an error).

The stage creates the DuckDB table `cohort` (one row per stay, `row_idx` 0..N-1 in stay_id order: the row
order of every array of the processed dataset) and returns the number of stays left after each rule. It also
creates `cohort_exclusions(step, reason, kind, stays)`: every stay left out, under the first reason that applies
(`EXCLUSIONS`), so malformed rows (a missing id or time, an out-time before the in-time) are counted apart from the
stays the cohort rules exclude on purpose (too young, too short).
"""

from __future__ import annotations

import duckdb
import pandas as pd

from carebench.data.definitions import LOS_BINS_DAYS, race_group
from carebench.data.mimic.tables import RawDataError
from carebench.errors import UserError

_US_PER_DAY = 86_400 * 1_000_000


class CohortError(UserError, ValueError):
    """The cohort rules leave no stay; the message gives the count after each rule."""


def step_rules(min_age: int = 18, min_los_hours: float = 48.0) -> dict[str, str]:
    """Step name -> the rule in words, in the order the rules are applied (for the manifest and `describe`)."""
    return {
        "icu_stays": "all rows of icu/icustays",
        "linked": "subject in hosp/patients and hadm_id in hosp/admissions (same subject)",
        f"age_ge_{min_age}": f"age at ICU admission (anchor_age + year(intime) - anchor_year) >= {min_age}",
        f"los_ge_{min_los_hours:g}h": f"ICU stay (outtime - intime) >= {min_los_hours:g} h",
    }


# Why a stay leaves the cohort, in the order checked (a stay counts under its first reason): (step, reason,
# kind, what it means, SQL condition on _stays). kind "malformed": the row lacks what the rule needs or contradicts
# itself; kind "rule": a valid stay outside the cohort's definition.
EXCLUSIONS: tuple[tuple[str, str, str, str, str], ...] = (
    ("linked", "no_stay_id", "malformed", "icu/icustays row without stay_id", "stay_id IS NULL"),
    ("linked", "no_patient", "malformed", "subject_id not in hosp/patients", "NOT has_patient"),
    (
        "linked",
        "no_admission",
        "malformed",
        "hadm_id missing or not an admission of the subject in hosp/admissions",
        "NOT has_admission",
    ),
    ("age", "no_intime", "malformed", "intime missing", "intime IS NULL"),
    (
        "age",
        "no_anchor_age",
        "malformed",
        "anchor_age or anchor_year missing in hosp/patients",
        "age IS NULL",
    ),
    ("age", "under_min_age", "rule", "younger than the minimum age at ICU admission", "age < {min_age}"),
    ("los", "no_outtime", "malformed", "outtime missing", "outtime IS NULL"),
    (
        "los",
        "outtime_before_intime",
        "malformed",
        "outtime earlier than intime (inverted times)",
        "los_us < 0",
    ),
    ("los", "short_stay", "rule", "ICU stay shorter than the minimum length", "los_us < {min_los_us}"),
)


def _los_class_sql(us: str) -> str:
    """CASE expression: LOS class from a duration in microseconds (integer arithmetic, exact at bin edges)."""
    whens = " ".join(
        f"WHEN {us} >= {lo * _US_PER_DAY} THEN {k}" for k, lo in reversed(list(enumerate(LOS_BINS_DAYS)))
    )
    return f"CASE {whens} END"


def _check_unique(con: duckdb.DuckDBPyConnection, table: str, key: str, where: str) -> None:
    row = con.execute(
        f"SELECT {key}, count(*) AS n FROM {table} WHERE {key} IS NOT NULL "
        f"GROUP BY {key} HAVING count(*) > 1 ORDER BY n DESC, {key} LIMIT 1"
    ).fetchone()
    if row is not None:
        raise RawDataError(f"{where}: {key} {row[0]} appears {row[1]} times (expected one row per {key})")


def _exclusions(
    con: duckdb.DuckDBPyConnection, steps: list[str], min_age: int, min_los_us: int
) -> list[tuple[str, str, str, str, int]]:
    """Table `cohort_exclusions` and its rows (step, reason, kind, meaning, stays): each stay left out of the
    cohort counted once, under the first reason of `EXCLUSIONS` that applies to it; `step` is the name of the cohort
    step (`step_rules`) that excludes it, so the reasons of a step add up to the stays it removes."""
    step_of = {"linked": steps[1], "age": steps[2], "los": steps[3]}
    cases = " ".join(
        f"WHEN {cond.format(min_age=int(min_age), min_los_us=int(min_los_us))} THEN {k}"
        for k, (*_, cond) in enumerate(EXCLUSIONS)
    )
    got = dict(
        con.execute(
            f"SELECT k, count(*) FROM (SELECT CASE {cases} END AS k FROM _stays) WHERE k IS NOT NULL GROUP BY k"
        ).fetchall()
    )
    rows = [(step_of[step], reason, kind, meaning, int(got.get(k, 0))) for k, (step, reason, kind, meaning, _)
            in enumerate(EXCLUSIONS)]  # fmt: skip
    con.execute("CREATE OR REPLACE TEMP TABLE cohort_exclusions (step VARCHAR, reason VARCHAR, kind VARCHAR, "
                "meaning VARCHAR, stays BIGINT)")  # fmt: skip
    con.executemany("INSERT INTO cohort_exclusions VALUES (?, ?, ?, ?, ?)", rows)
    return rows


def exclusions(con: duckdb.DuckDBPyConnection) -> list[dict[str, object]]:
    """The rows of `cohort_exclusions` (written by `build_cohort`) as dicts, in `EXCLUSIONS` order."""
    cols = ("step", "reason", "kind", "meaning", "stays")
    return [
        dict(zip(cols, r, strict=True))
        for r in con.execute(f"SELECT {', '.join(cols)} FROM cohort_exclusions").fetchall()
    ]


def build_cohort(
    con: duckdb.DuckDBPyConnection,
    *,
    min_age: int = 18,
    min_los_hours: float = 48.0,
    labels: dict[str, str] | None = None,
) -> dict[str, int]:
    """Create table `cohort` from the views patients, admissions, icustays; return stays left after each rule.

    `labels`: table -> where it was found (e.g. patients -> core/patients in MIMIC-IV v1.0), for messages."""
    where = {
        "icustays": "icu/icustays",
        "patients": "hosp/patients",
        "admissions": "hosp/admissions",
        **(labels or {}),
    }
    if min_los_hours < LOS_BINS_DAYS[0] * 24:
        raise ValueError(
            f"min_los_hours={min_los_hours}: the LOS classes start at {LOS_BINS_DAYS[0]} days, "
            f"so the cohort needs stays of at least {LOS_BINS_DAYS[0] * 24} h"
        )
    _check_unique(con, "icustays", "stay_id", where["icustays"])
    _check_unique(con, "patients", "subject_id", where["patients"])
    _check_unique(con, "admissions", "hadm_id", where["admissions"])

    min_los_us = round(min_los_hours * 3600 * 1_000_000)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _stays AS
        SELECT i.stay_id, i.subject_id, i.hadm_id, i.intime, i.outtime,
               p.gender, a.race, a.admission_type, a.insurance, a.deathtime,
               p.subject_id IS NOT NULL AS has_patient, a.hadm_id IS NOT NULL AS has_admission,
               (i.stay_id IS NOT NULL AND p.subject_id IS NOT NULL AND a.hadm_id IS NOT NULL) AS linked,
               p.anchor_age + year(i.intime) - p.anchor_year AS age,
               epoch_us(i.outtime) - epoch_us(i.intime) AS los_us
        FROM icustays i
        LEFT JOIN patients p ON p.subject_id = i.subject_id
        LEFT JOIN admissions a ON a.hadm_id = i.hadm_id AND a.subject_id = i.subject_id
    """)
    names = list(step_rules(min_age, min_los_hours))
    counts = con.execute(f"""
        SELECT count(*),
               count(*) FILTER (WHERE linked),
               count(*) FILTER (WHERE linked AND age >= {int(min_age)}),
               count(*) FILTER (WHERE linked AND age >= {int(min_age)} AND los_us >= {min_los_us})
        FROM _stays
    """).fetchone()
    steps = dict(zip(names, (int(c) for c in counts), strict=True))
    reasons = _exclusions(con, names, min_age, min_los_us)
    if steps[names[-1]] == 0:
        trail = " -> ".join(f"{k} {v}" for k, v in steps.items())
        why = ", ".join(f"{n} {r}" for _, r, _, _, n in sorted(reasons, key=lambda x: -x[4]) if n)
        raise CohortError(
            f"no ICU stay passes the cohort rules ({trail}; stays left out: {why}); expected at least one stay "
            f"in icu/icustays of a patient aged >= {min_age} lasting >= {min_los_hours:g} h"
        )

    races = [r[0] for r in con.execute("SELECT DISTINCT race FROM _stays WHERE race IS NOT NULL").fetchall()]
    race_map = pd.DataFrame(
        {
            "race": pd.Series(races, dtype=object),
            "race_group": pd.Series([race_group(r) for r in races], dtype=object),
        }
    )
    con.register("_race_map_df", race_map)
    default_group = race_group(None).replace("'", "''")
    con.execute(f"""
        CREATE OR REPLACE TABLE cohort AS
        SELECT CAST(row_number() OVER (ORDER BY s.stay_id) - 1 AS INTEGER) AS row_idx,
               s.stay_id, s.subject_id, s.hadm_id, s.intime, s.outtime,
               s.los_us / {float(_US_PER_DAY)} AS los_days,
               CAST(s.age AS INTEGER) AS age,
               s.gender, s.race,
               COALESCE(m.race_group, '{default_group}') AS race_group,
               s.admission_type, s.insurance,
               CAST(COALESCE(s.deathtime >= s.intime AND s.deathtime <= s.outtime, false) AS TINYINT)
                   AS label_mortality,
               CAST({_los_class_sql("s.los_us")} AS TINYINT) AS label_los
        FROM _stays s
        LEFT JOIN _race_map_df m ON m.race = s.race
        WHERE s.linked AND s.age >= {int(min_age)} AND s.los_us >= {min_los_us}
        ORDER BY s.stay_id
    """)
    con.unregister("_race_map_df")
    con.execute("DROP TABLE _stays")
    return steps
