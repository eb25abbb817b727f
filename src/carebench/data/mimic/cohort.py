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
order of every array of the processed dataset) and returns the number of stays left after each rule.
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


def build_cohort(
    con: duckdb.DuckDBPyConnection, *, min_age: int = 18, min_los_hours: float = 48.0
) -> dict[str, int]:
    """Create table `cohort` from the views patients, admissions, icustays; return stays left after each rule."""
    if min_los_hours < LOS_BINS_DAYS[0] * 24:
        raise ValueError(
            f"min_los_hours={min_los_hours}: the LOS classes start at {LOS_BINS_DAYS[0]} days, "
            f"so the cohort needs stays of at least {LOS_BINS_DAYS[0] * 24} h"
        )
    _check_unique(con, "icustays", "stay_id", "icu/icustays")
    _check_unique(con, "patients", "subject_id", "hosp/patients")
    _check_unique(con, "admissions", "hadm_id", "hosp/admissions")

    min_los_us = round(min_los_hours * 3600 * 1_000_000)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _stays AS
        SELECT i.stay_id, i.subject_id, i.hadm_id, i.intime, i.outtime,
               p.gender, a.race, a.admission_type, a.insurance, a.deathtime,
               (p.subject_id IS NOT NULL AND a.hadm_id IS NOT NULL) AS linked,
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
    if steps[names[-1]] == 0:
        trail = " -> ".join(f"{k} {v}" for k, v in steps.items())
        raise CohortError(
            f"no ICU stay passes the cohort rules ({trail}); expected at least one stay in "
            f"icu/icustays of a patient aged >= {min_age} lasting >= {min_los_hours:g} h"
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
