"""The latent state of each synthetic admission: conditions, markers and the 25 phenotype labels.

Why this shape: the simulator exists to give the benchmark a ground truth. Every phenotype is planted as one of
four kinds, and the latent structure is built so that the kind is *exactly* true of the generated data:

- ``ehr``:  the label drives only EHR signals (vitals, labs, urine output). Nothing on the X-ray depends on it.
- ``cxr``:  the label drives only X-ray findings. Nothing in the EHR depends on it.
- ``both``: the label is a logical function of an EHR-visible marker and an X-ray-visible finding
            (AND, AND-NOT or XOR), so neither modality alone determines it.
- ``none``: the label is an independent coin flip, unrelated to anything observable.

To keep the kinds honest, the latent variables are split into two independent sides. The EHR side (E-kind
phenotypes, the EHR markers of the ``both`` rules; base rates may depend on age) and the X-ray side (X-kind
phenotypes and X-ray findings; no demographic dependence at all) share no parent, so an X-ray label cannot leak
into the EHR through co-occurrence, and vice versa. Co-occurrence is realistic *within* a side (sepsis raises
the odds of shock and acute renal failure; heart failure raises the odds of a pacemaker and of effusion).
Acuity (per ICU stay, in ``population.py``) is independent of every label: it drives generic derangement,
devices, X-ray availability, mortality and length of stay, so it is visible in both modalities but carries no
phenotype. docs/synthetic.md lists every rule; planted.json records them per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carebench.data.definitions import load_phenotypes

KINDS = ("ehr", "cxr", "both", "none")

# phenotype column -> (kind, rule in words). The rule names the latent variables sampled below.
PLAN: dict[str, tuple[str, str]] = {
    "pheno_septicemia": ("ehr", "sepsis: fever, leukocytosis, raised lactate, tachycardia"),
    "pheno_diabetes_without_complication": ("ehr", "diabetes without complication: raised glucose"),
    "pheno_diabetes_with_complications": (
        "ehr",
        "complicated diabetes: high glucose, low bicarbonate "
        "(ketoacidosis-like); exclusive with the uncomplicated form",
    ),
    "pheno_lipid_disorders": ("none", "independent coin, p=0.28"),
    "pheno_fluid_electrolyte_disorders": ("ehr", "low sodium, chloride and potassium"),
    "pheno_essential_hypertension": (
        "both",
        "H AND NOT cardiomegaly (H: hypertensive marker, raised "
        "SBP/DBP in the EHR; cardiomegaly on the X-ray)",
    ),
    "pheno_hypertension_with_complications": ("both", "H AND cardiomegaly"),
    "pheno_acute_myocardial_infarction": ("none", "independent coin, p=0.08"),
    "pheno_coronary_atherosclerosis": (
        "both",
        "A XOR effusion (A: anticoagulation marker, PTT raised in the "
        "EHR, p=0.5; pleural effusion on the X-ray)",
    ),
    "pheno_conduction_disorders": ("cxr", "pacemaker visible on the X-ray"),
    "pheno_cardiac_dysrhythmias": ("ehr", "irregular, faster heart rate (hour-to-hour variability x1.6)"),
    "pheno_congestive_heart_failure": ("cxr", "cardiomegaly and (85%) pulmonary edema on the X-ray"),
    "pheno_acute_cerebrovascular_disease": ("ehr", "lowered GCS, raised blood pressure"),
    "pheno_pneumonia": ("cxr", "consolidation (left, right or both) on the X-ray"),
    "pheno_copd_bronchiectasis": (
        "both",
        "R AND NOT effusion (R: chronic hypercapnia marker, raised pCO2 and "
        "bicarbonate, lowered chloride in the EHR)",
    ),
    "pheno_pleurisy_pneumothorax_collapse": ("cxr", "pneumothorax (60%) or atelectasis (40%) on the X-ray"),
    "pheno_respiratory_failure": ("ehr", "low SpO2, raised FiO2, pCO2 and respiratory rate, low pH and pO2"),
    "pheno_other_lower_respiratory": ("both", "R AND effusion"),
    "pheno_other_upper_respiratory": ("none", "independent coin, p=0.05"),
    "pheno_other_liver_diseases": ("ehr", "raised bilirubin, ALT, AST, INR; low albumin and platelets"),
    "pheno_gastrointestinal_hemorrhage": ("ehr", "falling hemoglobin/hematocrit, raised BUN and heart rate"),
    "pheno_acute_renal_failure": (
        "ehr",
        "rising creatinine, raised BUN, potassium, phosphate; low urine output",
    ),
    "pheno_chronic_kidney_disease": ("ehr", "stable raised creatinine, BUN and phosphate; anemia"),
    "pheno_surgical_medical_complications": ("none", "independent coin, p=0.20"),
    "pheno_shock": ("ehr", "low blood pressure, high lactate, tachycardia, low urine output"),
}

# EHR-side latent variables that shape the time series (phenotype labels and the markers of `both` rules).
EHR_LATENTS = (
    "sepsis",
    "shock",
    "resp_failure",
    "ckd",
    "arf",
    "dm_uncomplicated",
    "dm_complicated",
    "fluid_electrolyte",
    "dysrhythmia",
    "cerebrovascular",
    "liver",
    "gi_bleed",
    "marker_h",
    "marker_r",
    "marker_a",
)
# X-ray-side latent variables that shape the findings.
CXR_LATENTS = ("chf", "conduction", "pneumonia", "pleural", "cardiomegaly", "effusion")
NONE_RATES = {
    "pheno_lipid_disorders": 0.28,
    "pheno_acute_myocardial_infarction": 0.08,
    "pheno_other_upper_respiratory": 0.05,
    "pheno_surgical_medical_complications": 0.20,
}


def check_plan() -> None:
    """The plan covers exactly the 25 phenotype columns, with at least 4 of each informative kind."""
    cols = [p.column for p in load_phenotypes()]
    if sorted(cols) != sorted(PLAN):
        raise AssertionError(
            f"synthetic PLAN does not match phenotypes.yaml: {sorted(set(cols) ^ set(PLAN))}"
        )
    for kind in ("ehr", "cxr", "both"):
        n = sum(k == kind for k, _ in PLAN.values())
        if n < 4:
            raise AssertionError(f"synthetic PLAN has {n} '{kind}' phenotypes; at least 4 are required")


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _bern(rng: np.random.Generator, p: np.ndarray | float, n: int) -> np.ndarray:
    return rng.random(n) < np.broadcast_to(np.asarray(p, dtype=np.float64), (n,))


@dataclass
class Latent:
    """Per-admission latent state: named boolean variables and the [n, 25] label matrix (phenotype order)."""

    ehr: dict[str, np.ndarray]
    cxr: dict[str, np.ndarray]
    labels: np.ndarray  # bool [n_adm, 25], columns in load_phenotypes() order

    def label(self, column: str) -> np.ndarray:
        cols = [p.column for p in load_phenotypes()]
        return self.labels[:, cols.index(column)]


def sample_latent(rng: np.random.Generator, age: np.ndarray) -> Latent:
    """Draw the latent conditions of `len(age)` admissions (age in years at admission).

    The EHR side, the X-ray side and the `none` coins are drawn from separate child generators, so each side is
    independent of the others by construction (not only in expectation of the formulas).
    """
    n = len(age)
    rng_e, rng_x, rng_n = rng.spawn(3)
    a = (np.asarray(age, dtype=np.float64) - 65.0) / 10.0

    e: dict[str, np.ndarray] = {}
    e["sepsis"] = _bern(rng_e, _sigmoid(-1.5 + 0.1 * a), n)
    e["shock"] = _bern(rng_e, _sigmoid(-2.8 + 1.9 * e["sepsis"]), n)
    e["resp_failure"] = _bern(rng_e, _sigmoid(-1.3 + 0.7 * e["sepsis"]), n)
    e["ckd"] = _bern(rng_e, _sigmoid(-1.9 + 0.35 * a), n)
    e["arf"] = _bern(rng_e, _sigmoid(-1.4 + 1.0 * e["ckd"] + 0.9 * e["sepsis"] + 0.6 * e["shock"]), n)
    dm = _bern(rng_e, _sigmoid(-0.9 + 0.15 * a), n)
    complicated = _bern(rng_e, _sigmoid(-0.8 + 1.0 * e["ckd"]), n)
    e["dm_uncomplicated"] = dm & ~complicated
    e["dm_complicated"] = dm & complicated
    e["fluid_electrolyte"] = _bern(rng_e, _sigmoid(-0.9 + 0.5 * e["arf"] + 0.5 * e["dm_complicated"]), n)
    e["dysrhythmia"] = _bern(rng_e, _sigmoid(-0.8 + 0.35 * a), n)
    e["cerebrovascular"] = _bern(rng_e, _sigmoid(-2.4), n)
    e["liver"] = _bern(rng_e, _sigmoid(-2.2), n)
    e["gi_bleed"] = _bern(rng_e, _sigmoid(-2.6 + 1.2 * e["liver"]), n)
    e["marker_h"] = _bern(rng_e, _sigmoid(0.1 + 0.3 * a + 0.6 * e["ckd"]), n)  # hypertensive
    e["marker_r"] = _bern(rng_e, _sigmoid(0.0 + 0.2 * a), n)  # chronic hypercapnia
    e["marker_a"] = _bern(rng_e, 0.5, n)  # anticoagulated (PTT)

    x: dict[str, np.ndarray] = {}
    x["chf"] = _bern(rng_x, 0.24, n)
    x["conduction"] = _bern(rng_x, _sigmoid(-2.5 + 1.0 * x["chf"]), n)
    x["pneumonia"] = _bern(rng_x, 0.22, n)
    x["pleural"] = _bern(rng_x, _sigmoid(-2.2 + 0.8 * x["pneumonia"]), n)
    x["cardiomegaly"] = x["chf"] | _bern(rng_x, 0.4, n)
    x["effusion"] = _bern(rng_x, _sigmoid(-0.25 + 0.5 * x["chf"]), n)

    value: dict[str, np.ndarray] = {
        "pheno_septicemia": e["sepsis"],
        "pheno_diabetes_without_complication": e["dm_uncomplicated"],
        "pheno_diabetes_with_complications": e["dm_complicated"],
        "pheno_fluid_electrolyte_disorders": e["fluid_electrolyte"],
        "pheno_essential_hypertension": e["marker_h"] & ~x["cardiomegaly"],
        "pheno_hypertension_with_complications": e["marker_h"] & x["cardiomegaly"],
        "pheno_coronary_atherosclerosis": e["marker_a"] ^ x["effusion"],
        "pheno_conduction_disorders": x["conduction"],
        "pheno_cardiac_dysrhythmias": e["dysrhythmia"],
        "pheno_congestive_heart_failure": x["chf"],
        "pheno_acute_cerebrovascular_disease": e["cerebrovascular"],
        "pheno_pneumonia": x["pneumonia"],
        "pheno_copd_bronchiectasis": e["marker_r"] & ~x["effusion"],
        "pheno_pleurisy_pneumothorax_collapse": x["pleural"],
        "pheno_respiratory_failure": e["resp_failure"],
        "pheno_other_lower_respiratory": e["marker_r"] & x["effusion"],
        "pheno_other_liver_diseases": e["liver"],
        "pheno_gastrointestinal_hemorrhage": e["gi_bleed"],
        "pheno_acute_renal_failure": e["arf"],
        "pheno_chronic_kidney_disease": e["ckd"],
        "pheno_shock": e["shock"],
    }
    for col, p in NONE_RATES.items():
        value[col] = _bern(rng_n, p, n)
    labels = np.stack([value[p.column] for p in load_phenotypes()], axis=1)
    return Latent(ehr=e, cxr=x, labels=labels)


def plan_for_planted() -> dict[str, dict[str, str]]:
    """Phenotype column -> {kind, rule} for planted.json."""
    return {col: {"kind": kind, "rule": rule} for col, (kind, rule) in PLAN.items()}
