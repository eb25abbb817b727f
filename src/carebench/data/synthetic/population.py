"""Who the synthetic patients are and when they are in hospital: subjects, admissions, ICU stays, outcomes.

One call draws one chunk of `n_stays` ICU stays. Subjects have 1-3 admissions (months apart), an admission
has one ICU stay or, sometimes, two (a readmission to the ICU in the same hospital stay), so the data exercise
patient-disjoint folds and per-admission labels. Identifiers are unique across chunks and look like MIMIC's
(8-digit subject 1xxxxxxx, hadm 2xxxxxxx, stay 3xxxxxxx) through a fixed bijection of the global index.

Outcomes: ICU length of stay has a fixed 17% of short stays (< 48 h, dropped by the cohort), independent of
everything else so the cohort filter selects nothing; the rest is 2 days plus a log-normal tail lengthened by
acuity. In-ICU death (admissions.deathtime inside [intime, outtime]) depends on acuity, age and some latent
conditions of both sides; a further share dies in hospital after leaving the ICU (not an ICU death). Only a
subject's last ICU stay can end in death, so no one is admitted after dying. A small share of subjects are
minors (anchor_age 15-17); some of them turn 18 by the year of their ICU admission, exercising the age rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carebench.data.definitions import race_group
from carebench.data.synthetic.conditions import Latent, sample_latent

DAY = 86_400
HOUR = 3_600

SUBGROUP_RACE_GROUP = "BLACK/AFRICAN AMERICAN"
SHORT_STAY_SHARE = 0.17
MINOR_SHARE = 0.025
# Mortality logit = MORTALITY_INTERCEPT + acuity + 0.35 (age-65)/10 + condition terms (docs/synthetic.md).
MORTALITY_INTERCEPT = -3.0
POST_ICU_DEATH = 0.05

# Raw race strings (as in MIMIC-IV v2.2 admissions.race) with their shares; they map to the 5 race groups.
RACES = (
    ("WHITE", 0.52),
    ("WHITE - OTHER EUROPEAN", 0.06),
    ("WHITE - RUSSIAN", 0.02),
    ("PORTUGUESE", 0.01),
    ("BLACK/AFRICAN AMERICAN", 0.10),
    ("BLACK/CAPE VERDEAN", 0.02),
    ("BLACK/CARIBBEAN ISLAND", 0.01),
    ("BLACK/AFRICAN", 0.01),
    ("HISPANIC OR LATINO", 0.02),
    ("HISPANIC/LATINO - PUERTO RICAN", 0.02),
    ("HISPANIC/LATINO - DOMINICAN", 0.01),
    ("SOUTH AMERICAN", 0.005),
    ("ASIAN", 0.015),
    ("ASIAN - CHINESE", 0.015),
    ("ASIAN - SOUTH EAST ASIAN", 0.005),
    ("OTHER", 0.04),
    ("UNKNOWN", 0.07),
    ("UNABLE TO OBTAIN", 0.01),
    ("PATIENT DECLINED TO ANSWER", 0.01),
    ("AMERICAN INDIAN/ALASKA NATIVE", 0.005),
    ("MULTIPLE RACE/ETHNICITY", 0.005),
)
ADMISSION_TYPES = (
    ("EW EMER.", 0.42),
    ("URGENT", 0.14),
    ("SURGICAL SAME DAY ADMISSION", 0.10),
    ("OBSERVATION ADMIT", 0.10),
    ("DIRECT EMER.", 0.08),
    ("ELECTIVE", 0.06),
    ("EU OBSERVATION", 0.05),
    ("DIRECT OBSERVATION", 0.03),
    ("AMBULATORY OBSERVATION", 0.02),
)
ADMISSION_LOCATIONS = (
    ("EMERGENCY ROOM", 0.52),
    ("TRANSFER FROM HOSPITAL", 0.18),
    ("PHYSICIAN REFERRAL", 0.14),
    ("WALK-IN/SELF REFERRAL", 0.06),
    ("PROCEDURE SITE", 0.05),
    ("CLINIC REFERRAL", 0.05),
)
DISCHARGE_LOCATIONS = (
    ("HOME", 0.32),
    ("HOME HEALTH CARE", 0.25),
    ("SKILLED NURSING FACILITY", 0.22),
    ("REHAB", 0.12),
    ("CHRONIC/LONG TERM ACUTE CARE", 0.06),
    ("HOSPICE", 0.03),
)
CAREUNITS = (
    ("Medical Intensive Care Unit (MICU)", 0.22),
    ("Surgical Intensive Care Unit (SICU)", 0.16),
    ("Cardiac Vascular Intensive Care Unit (CVICU)", 0.17),
    ("Medical/Surgical Intensive Care Unit (MICU/SICU)", 0.17),
    ("Coronary Care Unit (CCU)", 0.11),
    ("Trauma SICU (TSICU)", 0.12),
    ("Neuro Surgical Intensive Care Unit (Neuro SICU)", 0.05),
)
MARITAL = (("MARRIED", 0.45), ("SINGLE", 0.30), ("WIDOWED", 0.13), ("DIVORCED", 0.08), ("", 0.04))
YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019")


def _choice(rng: np.random.Generator, table: tuple[tuple[str, float], ...], n: int) -> np.ndarray:
    names = np.array([t[0] for t in table], dtype=object)
    p = np.array([t[1] for t in table], dtype=np.float64)
    return names[rng.choice(len(names), size=n, p=p / p.sum())]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# Fixed bijections of the global index onto 7-digit offsets: (i * A + B) mod P, with P prime and A coprime to P.
_ID_PRIME = 9_999_991


def scramble(index: np.ndarray, base: int, salt: int) -> np.ndarray:
    """A unique, MIMIC-looking 8-digit id for each global index (< 9,999,991): base + bijection(index)."""
    a = (7_919 * (salt + 1) + 1_299_709) % _ID_PRIME
    return base + (np.asarray(index, dtype=np.int64) * a + 104_729 * salt) % _ID_PRIME


def year_start_seconds(year: np.ndarray) -> np.ndarray:
    """Seconds since 1970 of 1 January of each year."""
    return (
        (np.asarray(year, dtype=np.int64) - 1970)
        .astype("datetime64[Y]")
        .astype("datetime64[s]")
        .astype(np.int64)
    )


def year_of(seconds: np.ndarray) -> np.ndarray:
    return (
        np.asarray(seconds, dtype=np.int64).astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64)
        + 1970
    )


@dataclass
class Population:
    """One chunk. Times are int64 seconds since 1970 (NaT-free: `has_*` masks mark missing times)."""

    # subjects
    subject_id: np.ndarray
    gender: np.ndarray
    anchor_age: np.ndarray
    anchor_year: np.ndarray
    anchor_year_group: np.ndarray
    race: np.ndarray
    subgroup: np.ndarray  # bool: race_group == SUBGROUP_RACE_GROUP (planted lower EHR sensitivity)
    weight_kg: np.ndarray  # usual body weight (EHR weight charts; X-ray body size)
    dod: np.ndarray
    has_dod: np.ndarray
    # admissions
    adm_subject: np.ndarray
    hadm_id: np.ndarray
    admittime: np.ndarray
    dischtime: np.ndarray
    deathtime: np.ndarray
    has_deathtime: np.ndarray
    admission_type: np.ndarray
    admission_location: np.ndarray
    discharge_location: np.ndarray
    insurance: np.ndarray
    language: np.ndarray
    marital_status: np.ndarray
    has_ed: np.ndarray
    edregtime: np.ndarray
    edouttime: np.ndarray
    icd_version: np.ndarray
    age_at_admission: np.ndarray
    latent: Latent
    # stays
    stay_adm: np.ndarray
    stay_id: np.ndarray
    intime: np.ndarray
    outtime: np.ndarray
    careunit: np.ndarray
    acuity: np.ndarray
    ett: np.ndarray  # intubated (ventilated) during the stay
    central_line: np.ndarray
    art_line: np.ndarray
    died_in_icu: np.ndarray

    @property
    def stay_subject(self) -> np.ndarray:
        return self.adm_subject[self.stay_adm]

    def stay_subject_id(self) -> np.ndarray:
        return self.subject_id[self.adm_subject[self.stay_adm]]

    @property
    def n_stays(self) -> int:
        return len(self.stay_id)


def sample_population(rng: np.random.Generator, n_stays: int, first_index: int) -> Population:
    """Draw `n_stays` ICU stays whose global stay indices start at `first_index` (ids derive from it)."""
    rng_s, rng_l, rng_o = rng.spawn(3)
    # --- structure: subjects -> admissions -> stays, cut at exactly n_stays stays ---
    adm_per_sub = rng_s.choice([1, 2, 3], size=n_stays, p=[0.84, 0.12, 0.04])
    adm_subject = np.repeat(np.arange(n_stays), adm_per_sub)
    stays_per_adm = 1 + (rng_s.random(len(adm_subject)) < 0.06)
    stay_adm = np.repeat(np.arange(len(adm_subject)), stays_per_adm)[:n_stays]
    n_adm = int(stay_adm[-1]) + 1
    adm_subject = adm_subject[:n_adm]
    n_sub = int(adm_subject[-1]) + 1
    adm_rank = np.arange(n_adm) - np.searchsorted(adm_subject, adm_subject)  # 0 for a subject's 1st admission
    stay_rank = np.arange(n_stays) - np.searchsorted(stay_adm, stay_adm)  # 0 for an admission's 1st stay

    # --- subjects ---
    gender = np.where(rng_s.random(n_sub) < 0.44, "F", "M").astype(object)
    minor = rng_s.random(n_sub) < MINOR_SHARE
    adult_age = np.clip(np.round(rng_s.normal(64, 16, n_sub)), 18, 91)
    anchor_age = np.where(minor, rng_s.integers(15, 18, n_sub), adult_age).astype(np.int64)
    anchor_year = rng_s.integers(2110, 2206, n_sub)
    group_idx = rng_s.integers(0, len(YEAR_GROUPS), n_sub)
    anchor_year_group = np.array(YEAR_GROUPS, dtype=object)[group_idx]
    race = _choice(rng_s, RACES, n_sub)
    subgroup = np.array([race_group(r) == SUBGROUP_RACE_GROUP for r in race], dtype=bool)
    weight_kg = np.clip(np.where(gender == "F", 71.0, 84.0) + rng_s.normal(0, 17, n_sub), 38, 220)

    # --- admissions: first within 2.5 years of anchor_year, then 150-600 days apart (an admission lasts
    # at most ~100 days here, so a subject's admissions never overlap) ---
    first = np.searchsorted(adm_subject, np.arange(n_sub))
    gaps = (rng_s.uniform(150, 600, n_adm) * DAY).astype(np.int64)
    gaps[adm_rank == 0] = 0
    cum = np.cumsum(gaps)
    offsets = cum - cum[first][adm_subject]
    start = year_start_seconds(anchor_year) + (rng_s.random(n_sub) * 2.5 * 365 * DAY).astype(np.int64)
    admittime = start[adm_subject] + offsets
    admittime -= admittime % 60
    years_after_anchor = year_of(admittime) - anchor_year[adm_subject]
    age_at_admission = anchor_age[adm_subject] + years_after_anchor
    # the real (de-shifted) year decides the ICD version: ICD-10-CM from 2016 on (October 2015 in reality)
    real_first_year = 2008 + 3 * group_idx + rng_s.integers(0, 3, n_sub)
    icd_version = np.where(real_first_year[adm_subject] + years_after_anchor >= 2016, 10, 9).astype(np.int64)
    admission_type = _choice(rng_s, ADMISSION_TYPES, n_adm)
    admission_location = _choice(rng_s, ADMISSION_LOCATIONS, n_adm)
    has_ed = admission_location == "EMERGENCY ROOM"
    edregtime = admittime - (rng_s.uniform(2, 10, n_adm) * HOUR).astype(np.int64)
    edouttime = admittime + (rng_s.uniform(0, 0.5, n_adm) * HOUR).astype(np.int64)
    edregtime -= edregtime % 60
    edouttime -= edouttime % 60
    older = age_at_admission >= 65
    insurance = np.where(
        rng_s.random(n_adm) < np.where(older, 0.85, 0.1),
        "Medicare",
        np.where(rng_s.random(n_adm) < 0.3, "Medicaid", "Other"),
    ).astype(object)
    language = np.where(rng_s.random(n_adm) < 0.9, "ENGLISH", "?").astype(object)
    marital_status = _choice(rng_s, MARITAL, n_adm)

    latent = sample_latent(rng_l, age_at_admission)

    # --- stays: acuity, devices, length, death ---
    acuity = rng_o.normal(0.0, 1.0, n_stays)
    ett = rng_o.random(n_stays) < _sigmoid(-0.9 + 1.3 * acuity)
    central_line = rng_o.random(n_stays) < _sigmoid(-0.3 + 1.1 * acuity)
    art_line = rng_o.random(n_stays) < _sigmoid(-0.2 + 1.2 * acuity)
    careunit = _choice(rng_o, CAREUNITS, n_stays)
    e, x = latent.ehr, latent.cxr
    e_s = {k: v[stay_adm] for k, v in e.items()}
    x_s = {k: v[stay_adm] for k, v in x.items()}
    short = rng_o.random(n_stays) < SHORT_STAY_SHARE
    tail = np.exp(
        np.log(1.5)
        + 0.3 * acuity
        + 0.25 * (x_s["pneumonia"] | e_s["resp_failure"])
        + rng_o.normal(0, 1.1, n_stays)
    )
    los_days = np.where(short, rng_o.uniform(0.2, 1.97, n_stays), 2.0 + np.minimum(tail, 38.0))
    age_s = age_at_admission[stay_adm]
    logit = (
        MORTALITY_INTERCEPT
        + 1.0 * acuity
        + 0.35 * (age_s - 65) / 10
        + 0.8 * e_s["shock"]
        + 0.5 * e_s["sepsis"]
        + 0.6 * e_s["resp_failure"]
        + 0.5 * e_s["liver"]
        + 0.3 * e_s["arf"]
        + 0.5 * x_s["chf"]
        + 0.4 * x_s["pneumonia"]
    )
    stay_subject = adm_subject[stay_adm]
    last_of_subject = np.r_[stay_subject[1:] != stay_subject[:-1], True]
    died_in_icu = (rng_o.random(n_stays) < _sigmoid(logit)) & last_of_subject
    post_icu_death = ~died_in_icu & last_of_subject & (rng_o.random(n_stays) < POST_ICU_DEATH)

    intime = np.zeros(n_stays, dtype=np.int64)
    outtime = np.zeros(n_stays, dtype=np.int64)
    to_icu = (np.minimum(rng_o.exponential(6.0, n_stays), 72.0) * HOUR).astype(np.int64) + 600
    stay_seconds = (los_days * DAY).astype(np.int64)
    readmit_gap = (rng_o.uniform(1.0, 5.0, n_stays) * DAY).astype(np.int64)
    for r in range(int(stay_rank.max()) + 1):  # at most 2 passes: stays are in order within an admission
        sel = stay_rank == r
        if r == 0:
            intime[sel] = admittime[stay_adm[sel]] + to_icu[sel] + rng_o.integers(0, 60, int(sel.sum()))
        else:
            intime[sel] = outtime[np.flatnonzero(sel) - 1] + readmit_gap[sel]
        outtime[sel] = intime[sel] + stay_seconds[sel]

    # --- admission end and death ---
    last_out = np.zeros(n_adm, dtype=np.int64)
    np.maximum.at(last_out, stay_adm, outtime)
    deathtime = np.zeros(n_adm, dtype=np.int64)
    has_deathtime = np.zeros(n_adm, dtype=bool)
    d_icu = np.flatnonzero(died_in_icu)
    deathtime[stay_adm[d_icu]] = outtime[d_icu] - rng_o.integers(0, HOUR, len(d_icu))
    d_post = np.flatnonzero(post_icu_death)
    deathtime[stay_adm[d_post]] = outtime[d_post] + (rng_o.uniform(0.5, 10, len(d_post)) * DAY).astype(
        np.int64
    )
    has_deathtime[stay_adm[d_icu]] = True
    has_deathtime[stay_adm[d_post]] = True
    deathtime -= deathtime % 60
    # discharge: at death (never before the last ICU outtime, rounded up to the minute) or days after the ICU
    at_death = np.maximum(deathtime, last_out + (-last_out) % 60)
    dischtime = np.where(
        has_deathtime, at_death, last_out + (rng_o.uniform(0.3, 12.0, n_adm) * DAY).astype(np.int64)
    )
    dischtime -= dischtime % 60
    discharge_location = np.where(has_deathtime, "DIED", _choice(rng_o, DISCHARGE_LOCATIONS, n_adm)).astype(
        object
    )

    # dod: date of an in-hospital death, or for 8% of survivors a death within a year of the last discharge
    last_adm = np.r_[adm_subject[1:] != adm_subject[:-1], True]
    sub_last_adm = np.flatnonzero(last_adm)
    has_dod = has_deathtime[sub_last_adm] | (rng_o.random(n_sub) < 0.08)
    dod = np.where(
        has_deathtime[sub_last_adm],
        deathtime[sub_last_adm],
        dischtime[sub_last_adm] + (rng_o.uniform(5, 365, n_sub) * DAY).astype(np.int64),
    )

    sub_index = first_index + np.arange(n_sub)  # at most one subject per stay, so indices never collide
    adm_index = first_index + np.arange(n_adm)
    stay_index = first_index + np.arange(n_stays)
    return Population(
        subject_id=scramble(sub_index, 10_000_000, 1),
        gender=gender,
        anchor_age=anchor_age,
        anchor_year=anchor_year,
        anchor_year_group=anchor_year_group,
        race=race,
        subgroup=subgroup,
        weight_kg=weight_kg,
        dod=dod,
        has_dod=has_dod,
        adm_subject=adm_subject,
        hadm_id=scramble(adm_index, 20_000_000, 2),
        admittime=admittime,
        dischtime=dischtime,
        deathtime=deathtime,
        has_deathtime=has_deathtime,
        admission_type=admission_type,
        admission_location=admission_location,
        discharge_location=discharge_location,
        insurance=insurance,
        language=language,
        marital_status=marital_status,
        has_ed=has_ed,
        edregtime=edregtime,
        edouttime=edouttime,
        icd_version=icd_version,
        age_at_admission=age_at_admission,
        latent=latent,
        stay_adm=stay_adm,
        stay_id=scramble(stay_index, 30_000_000, 3),
        intime=intime,
        outtime=outtime,
        careunit=careunit,
        acuity=acuity,
        ett=ett,
        central_line=central_line,
        art_line=art_line,
        died_in_icu=died_in_icu,
    )
