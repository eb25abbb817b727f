"""Cohort stage (build_cohort) and fold assignment (assign_folds).

Expected numbers on the demo come from `expected_demo_cohort`, a plain-pandas reading of the raw files written
from the rules in docs/cohort.md, independent of the SQL under test.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from carebench.data.definitions import race_group
from carebench.data.mimic.cohort import CohortError, build_cohort, step_rules
from carebench.data.mimic.splits import assign_folds
from carebench.data.mimic.tables import RawDataError, register_tables

LOS_EDGES = [2, 3, 4, 5, 6, 7, 14, np.inf]


def expected_demo_cohort(root: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The cohort and step counts from the raw csv.gz files with pandas only (sorted by stay_id)."""
    p = pd.read_csv(root / "hosp" / "patients.csv.gz")
    a = pd.read_csv(root / "hosp" / "admissions.csv.gz", parse_dates=["deathtime"])
    i = pd.read_csv(root / "icu" / "icustays.csv.gz", parse_dates=["intime", "outtime"])
    steps = {"icu_stays": len(i)}
    m = i.merge(p[["subject_id", "gender", "anchor_age", "anchor_year"]], on="subject_id", how="inner")
    m = m.merge(
        a[["subject_id", "hadm_id", "deathtime", "race", "admission_type", "insurance"]],
        on=["subject_id", "hadm_id"],
        how="inner",
    )
    steps["linked"] = len(m)
    m["age"] = m["anchor_age"] + m["intime"].dt.year - m["anchor_year"]
    m = m[m["age"] >= 18]
    steps["age_ge_18"] = len(m)
    m = m[(m["outtime"] - m["intime"]) >= pd.Timedelta(hours=48)].copy()
    steps["los_ge_48h"] = len(m)
    m["los_days"] = (m["outtime"] - m["intime"]) / pd.Timedelta(days=1)
    m["label_mortality"] = ((m["deathtime"] >= m["intime"]) & (m["deathtime"] <= m["outtime"])).astype(int)
    m["label_los"] = pd.cut(m["los_days"], LOS_EDGES, right=False, labels=False).astype(int)
    return m.sort_values("stay_id").reset_index(drop=True), steps


def _cohort_df(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    return con.execute("SELECT * FROM cohort ORDER BY row_idx").df()


# ---------------------------------------------------------------- the real demo


@pytest.fixture(scope="module")
def demo_cohort(demo_root):
    con = duckdb.connect()
    con.execute("SET threads = 2")
    register_tables(con, demo_root, ["patients", "admissions", "icustays"])
    steps = build_cohort(con)
    return steps, _cohort_df(con)


def test_demo_step_counts_match_pandas(demo_root, demo_cohort):
    steps, _ = demo_cohort
    _, exp_steps = expected_demo_cohort(demo_root)
    assert steps == exp_steps
    assert list(steps) == list(step_rules())
    # the demo as documented in docs/cohort.md: 140 stays, all adult, 74 last >= 48 h
    assert exp_steps == {"icu_stays": 140, "linked": 140, "age_ge_18": 140, "los_ge_48h": 74}


def test_demo_labels_and_demographics_match_pandas(demo_root, demo_cohort):
    _, got = demo_cohort
    exp, _ = expected_demo_cohort(demo_root)
    assert got["row_idx"].tolist() == list(range(len(exp)))
    for col in [
        "stay_id",
        "subject_id",
        "hadm_id",
        "age",
        "gender",
        "race",
        "admission_type",
        "insurance",
        "label_mortality",
        "label_los",
    ]:
        assert got[col].tolist() == exp[col].tolist(), col
    assert got["intime"].tolist() == exp["intime"].tolist()
    assert got["outtime"].tolist() == exp["outtime"].tolist()
    np.testing.assert_allclose(got["los_days"], exp["los_days"], rtol=1e-12)
    assert got["race_group"].tolist() == [race_group(r) for r in exp["race"]]
    assert int(got["label_mortality"].sum()) == int(exp["label_mortality"].sum()) == 9
    los_counts = got["label_los"].value_counts().sort_index().to_dict()
    assert los_counts == exp["label_los"].value_counts().sort_index().to_dict()
    assert los_counts == {0: 19, 1: 14, 2: 10, 3: 6, 4: 5, 5: 15, 6: 5}


# ---------------------------------------------------------------- rules at their edges (hand-built tables)

T0 = pd.Timestamp("2150-01-01 08:00:00")
H = pd.Timedelta(hours=1)
S = pd.Timedelta(seconds=1)


def _con(stays: list[dict], patients: list[dict] | None = None, admissions: list[dict] | None = None):
    """A connection whose patients/admissions/icustays are small hand-written tables."""
    stays_df = pd.DataFrame(stays)
    subjects = sorted(set(stays_df["subject_id"]))
    if patients is None:
        patients = [{"subject_id": s, "gender": "F", "anchor_age": 60, "anchor_year": 2150} for s in subjects]
    if admissions is None:
        admissions = [
            {
                "subject_id": r["subject_id"],
                "hadm_id": r["hadm_id"],
                "deathtime": pd.NaT,
                "race": "WHITE",
                "admission_type": "URGENT",
                "insurance": "Other",
            }
            for r in stays_df.drop_duplicates("hadm_id").to_dict("records")
        ]
    con = duckdb.connect()
    for name, rows in (("patients", patients), ("admissions", admissions), ("icustays", stays)):
        df = pd.DataFrame(rows)
        for c in ("intime", "outtime", "deathtime"):
            if c in df:
                df[c] = pd.to_datetime(df[c]).astype("datetime64[us]")
        con.register(f"{name}_df", df)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM {name}_df")
    return con


def _stay(stay_id, hours, subject_id=None, hadm_id=None, intime=T0):
    return {
        "subject_id": subject_id or stay_id,
        "hadm_id": hadm_id or stay_id * 10,
        "stay_id": stay_id,
        "intime": intime,
        "outtime": intime + hours if isinstance(hours, pd.Timedelta) else intime + hours * H,
    }


def test_los_threshold_is_inclusive_and_classes_exact_at_bin_edges():
    con = _con(
        [
            _stay(1, 48),
            _stay(2, 48 * H - S),
            _stay(3, 72),
            _stay(4, 72 * H - S),
            _stay(5, 14 * 24),
            _stay(6, 400 * 24),
            _stay(7, 7 * 24 - 1),
        ]
    )
    steps = build_cohort(con)
    got = _cohort_df(con).set_index("stay_id")
    assert steps["los_ge_48h"] == 6
    assert 2 not in got.index  # 47:59:59 is not 48 h
    assert got["label_los"].to_dict() == {1: 0, 3: 1, 4: 0, 5: 6, 6: 6, 7: 4}  # 400 days: class 6, no crash
    assert got.loc[3, "los_days"] == 3.0


def test_age_uses_anchor_year_shift():
    patients = [
        {"subject_id": 1, "gender": "M", "anchor_age": 17, "anchor_year": 2150},
        {"subject_id": 2, "gender": "F", "anchor_age": 17, "anchor_year": 2149},
        {"subject_id": 3, "gender": "F", "anchor_age": 91, "anchor_year": 2140},
    ]
    con = _con([_stay(1, 50), _stay(2, 50), _stay(3, 50)], patients=patients)
    steps = build_cohort(con)
    got = _cohort_df(con).set_index("stay_id")
    assert steps == {"icu_stays": 3, "linked": 3, "age_ge_18": 2, "los_ge_48h": 2}
    assert got["age"].to_dict() == {2: 18, 3: 101}


def test_mortality_is_death_within_the_icu_stay_inclusive():
    stays = [_stay(k, 60) for k in range(1, 6)]
    deaths = {
        1: T0 + 60 * H,  # exactly at outtime -> in-ICU death
        2: T0 + 60 * H + S,  # one second after outtime -> not
        3: T0 - S,  # before intime (an earlier stay of the admission) -> not
        4: T0,  # exactly at intime -> yes
        5: pd.NaT,
    }
    admissions = [
        {
            "subject_id": k,
            "hadm_id": k * 10,
            "deathtime": deaths[k],
            "race": None,
            "admission_type": "URGENT",
            "insurance": "Other",
        }
        for k in deaths
    ]
    con = _con(stays, admissions=admissions)
    build_cohort(con)
    got = _cohort_df(con).set_index("stay_id")
    assert got["label_mortality"].to_dict() == {1: 1, 2: 0, 3: 0, 4: 1, 5: 0}
    assert set(got["race_group"]) == {"OTHER"}  # NULL race -> OTHER


def test_unlinked_stays_and_missing_outtime_are_excluded_and_counted():
    stays = [_stay(1, 50), _stay(2, 50), _stay(3, 50), _stay(4, 50)]
    stays[3]["outtime"] = pd.NaT
    patients = [{"subject_id": s, "gender": "F", "anchor_age": 50, "anchor_year": 2150} for s in (1, 3, 4)]
    admissions = [
        {
            "subject_id": s,
            "hadm_id": s * 10,
            "deathtime": pd.NaT,
            "race": "ASIAN - KOREAN",
            "admission_type": "URGENT",
            "insurance": "Other",
        }
        for s in (1, 2, 4)
    ]
    admissions.append(
        {
            "subject_id": 99,
            "hadm_id": 30,
            "deathtime": pd.NaT,
            "race": "WHITE",
            "admission_type": "URGENT",
            "insurance": "Other",
        }
    )  # stay 3's hadm, other subject
    con = _con(stays, patients=patients, admissions=admissions)
    steps = build_cohort(con)
    assert steps == {"icu_stays": 4, "linked": 2, "age_ge_18": 2, "los_ge_48h": 1}
    got = _cohort_df(con)
    assert got["stay_id"].tolist() == [1]
    assert got["race_group"].tolist() == ["ASIAN"]


def test_row_idx_follows_stay_id_whatever_the_input_order():
    con = _con([_stay(30, 50), _stay(10, 50), _stay(20, 50)])
    build_cohort(con)
    got = _cohort_df(con)
    assert got["stay_id"].tolist() == [10, 20, 30]
    assert got["row_idx"].tolist() == [0, 1, 2]


def test_empty_cohort_raises_with_the_counts():
    con = _con([_stay(1, 10), _stay(2, 47)])
    with pytest.raises(CohortError, match=r"icu_stays 2 -> linked 2 -> age_ge_18 2 -> los_ge_48h 0"):
        build_cohort(con)


def test_duplicate_keys_are_reported():
    con = _con([_stay(1, 50), _stay(1, 60, subject_id=2, hadm_id=20)])
    with pytest.raises(RawDataError, match=r"icu/icustays: stay_id 1 appears 2 times"):
        build_cohort(con)
    patients = [{"subject_id": 1, "gender": "F", "anchor_age": 50, "anchor_year": 2150}] * 2
    con = _con([_stay(1, 50)], patients=patients)
    with pytest.raises(RawDataError, match=r"hosp/patients: subject_id 1 appears 2 times"):
        build_cohort(con)


def test_min_los_below_the_first_los_class_is_refused():
    con = _con([_stay(1, 50)])
    with pytest.raises(ValueError, match="LOS classes start at 2 days"):
        build_cohort(con, min_los_hours=24)


# ---------------------------------------------------------------- folds


def _subjects(n_subjects=200, seed=1):
    rng = np.random.default_rng(seed)
    subj = pd.Series(rng.integers(10_000_000, 20_000_000, size=n_subjects))
    stays_per = rng.integers(1, 4, size=n_subjects)
    subject_id = pd.Series(np.repeat(subj.to_numpy(), stays_per))
    died = pd.Series((rng.random(len(subject_id)) < 0.1).astype(int))
    return subject_id, died


def test_folds_are_patient_disjoint_balanced_and_stratified():
    subject_id, died = _subjects()
    folds = assign_folds(subject_id, seed=0, strata=died)
    assert folds.index.equals(subject_id.index)
    frame = pd.DataFrame({"subject": subject_id, "died": died, "fold": folds})
    assert (frame.groupby("subject")["fold"].nunique() == 1).all()  # no subject in two folds
    assert set(folds) == {1, 2, 3, 4, 5}
    per_subject = frame.groupby("subject").agg(fold=("fold", "first"), died=("died", "max"))
    sizes = per_subject["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    dying = per_subject[per_subject["died"] == 1]["fold"].value_counts().reindex(range(1, 6), fill_value=0)
    assert dying.max() - dying.min() <= 1
    surviving = (
        per_subject[per_subject["died"] == 0]["fold"].value_counts().reindex(range(1, 6), fill_value=0)
    )
    assert surviving.max() - surviving.min() <= 1


def test_folds_are_deterministic_order_free_and_seed_dependent():
    subject_id, died = _subjects()
    a = assign_folds(subject_id, seed=0, strata=died)
    b = assign_folds(subject_id, seed=0, strata=died)
    assert a.equals(b)
    perm = np.random.default_rng(7).permutation(len(subject_id))
    shuffled = assign_folds(subject_id.iloc[perm], seed=0, strata=died.iloc[perm])
    assert shuffled.sort_index().equals(a)  # row order does not matter
    other = assign_folds(subject_id, seed=1, strata=died)
    assert (other != a).mean() > 0.5  # another seed: a different partition
    sizes = other.groupby(subject_id).first().value_counts()  # subjects per fold, still balanced
    assert sizes.max() - sizes.min() <= 1


def test_fold_arguments_are_validated():
    with pytest.raises(ValueError, match="n_folds"):
        assign_folds(pd.Series([1, 2, 3]), seed=0, n_folds=1)
    with pytest.raises(ValueError, match="strata has 2 rows"):
        assign_folds(pd.Series([1, 2, 3]), seed=0, strata=pd.Series([0, 1]))


def test_demo_deaths_as_documented(demo_root, demo_cohort):
    """docs/cohort.md: no in-ICU death before the 48 h prediction time; 3 stays of admissions ending in death
    after ICU discharge are survivors of this task."""
    _, got = demo_cohort
    a = pd.read_csv(demo_root / "hosp" / "admissions.csv.gz", parse_dates=["deathtime"])
    m = got.merge(a[["hadm_id", "deathtime"]], on="hadm_id")
    died = m[m["label_mortality"] == 1]
    assert ((died["deathtime"] - died["intime"]) >= pd.Timedelta(hours=48)).all()
    assert int(((m["label_mortality"] == 0) & m["deathtime"].notna()).sum()) == 3
