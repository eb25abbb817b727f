"""The true physiological state of each ICU stay, hour by hour, before anyone measures it.

Each signal (heart rate, creatinine, ...) is, for stay s and hour h:

    x[s, h] = patient baseline + sum of condition effects (x subgroup scale) + acuity effect + AR(1) noise

in the signal's natural unit, or in log units for skewed labs (creatinine, lactate, ...), then clipped to a
physiological range. Condition effects come from the EHR-side latent variables only (conditions.py), so an
X-ray-only phenotype never shifts a signal. A few effects develop over time (acute renal failure: creatinine
rises over the first ~36 h; GI hemorrhage: hemoglobin falls over ~24 h), and a dysrhythmia multiplies by 1.6 the
hour-to-hour variability of the heart rate. In the planted subgroup every condition effect is scaled by
SUBGROUP_EFFECT_SCALE: the disease is there (the label is true) but its signature is weaker.

Hours are held ragged: stay s owns flat positions offset[s] .. offset[s] + hours[s] - 1, so memory follows the
total number of stay-hours of a chunk, not the longest stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from carebench.data.synthetic.population import HOUR, Population

SUBGROUP_EFFECT_SCALE = 0.5


@dataclass(frozen=True)
class Spec:
    mean: float  # population mean (geometric mean for log signals)
    between: float  # sd of the patient baseline (log units for log signals)
    within: float  # sd of the hour-to-hour AR(1) noise
    phi: float  # AR(1) coefficient per hour
    lo: float  # physiological clip range of the true value
    hi: float
    log: bool = False


SPECS: dict[str, Spec] = {
    "heart_rate": Spec(86, 12, 6, 0.8, 30, 220),
    "sbp": Spec(121, 14, 8, 0.7, 50, 240),
    "dbp": Spec(62, 9, 6, 0.7, 25, 140),
    "resp_rate": Spec(19, 3.5, 3, 0.6, 6, 50),
    "spo2": Spec(96.5, 1.4, 1.3, 0.6, 70, 100),
    "temperature": Spec(36.9, 0.35, 0.3, 0.7, 33.5, 41.5),
    "glucose": Spec(125, 22, 22, 0.5, 40, 700),
    "consciousness": Spec(0.0, 0.5, 0.35, 0.9, -6, 2),
    "fio2": Spec(0.0, 6, 4, 0.8, -40, 80),  # added to the support level set in charting.py
    "urine": Spec(70, 0.35, 0.45, 0.3, 0.5, 600, log=True),
    "creatinine": Spec(0.95, 0.3, 0.06, 0.95, 0.2, 15, log=True),
    "bun": Spec(18, 0.35, 0.05, 0.95, 3, 200, log=True),
    "sodium": Spec(139, 3, 1.0, 0.9, 110, 170),
    "potassium": Spec(4.1, 0.35, 0.2, 0.8, 2.0, 8.0),
    "chloride": Spec(104, 3.5, 1.2, 0.9, 75, 135),
    "bicarbonate": Spec(24, 2.5, 1.0, 0.9, 5, 50),
    "hemoglobin": Spec(10.6, 1.5, 0.3, 0.95, 4, 18),
    "wbc": Spec(10, 0.35, 0.08, 0.95, 0.3, 80, log=True),
    "platelets": Spec(210, 0.35, 0.06, 0.95, 5, 900, log=True),
    "lactate": Spec(1.5, 0.3, 0.15, 0.8, 0.3, 25, log=True),
    "ph": Spec(7.40, 0.035, 0.02, 0.8, 6.85, 7.7),
    "po2": Spec(105, 0.25, 0.15, 0.7, 35, 550, log=True),
    "pco2": Spec(40, 4.5, 2.5, 0.8, 18, 120),
    "bilirubin_total": Spec(0.7, 0.45, 0.08, 0.95, 0.1, 40, log=True),
    "albumin": Spec(3.2, 0.45, 0.1, 0.95, 1.0, 5.5),
    "calcium": Spec(8.5, 0.5, 0.2, 0.9, 5, 13),
    "magnesium": Spec(2.0, 0.22, 0.12, 0.8, 0.8, 4.5),
    "phosphate": Spec(3.5, 0.7, 0.25, 0.9, 0.8, 12),
    "inr": Spec(1.2, 0.15, 0.04, 0.95, 0.8, 10, log=True),
    "ptt": Spec(31, 4.5, 2.5, 0.8, 18, 150),
    "alt": Spec(28, 0.6, 0.1, 0.95, 4, 8000, log=True),
    "ast": Spec(34, 0.6, 0.1, 0.95, 5, 12000, log=True),
}

# latent variable -> {signal: shift} (natural units, log units for log signals)
EFFECTS: dict[str, dict[str, float]] = {
    "sepsis": {
        "temperature": 0.9,
        "wbc": 0.4,
        "lactate": 0.3,
        "heart_rate": 10,
        "resp_rate": 2,
        "platelets": -0.2,
        "bicarbonate": -1.5,
        "albumin": -0.3,
        "creatinine": 0.1,
        "bilirubin_total": 0.15,
    },
    "shock": {
        "sbp": -22,
        "dbp": -10,
        "lactate": 0.55,
        "heart_rate": 8,
        "urine": -0.35,
        "bicarbonate": -2.5,
        "ph": -0.04,
    },
    "resp_failure": {"spo2": -3.5, "fio2": 16, "pco2": 7, "ph": -0.05, "po2": -0.2, "resp_rate": 5},
    "ckd": {"creatinine": 0.6, "bun": 0.45, "phosphate": 1.1, "hemoglobin": -0.8, "calcium": -0.3},
    "arf": {"creatinine": 0.7, "bun": 0.4, "potassium": 0.3, "phosphate": 0.4, "urine": -0.6},
    "dm_uncomplicated": {"glucose": 50},
    "dm_complicated": {"glucose": 85, "bicarbonate": -3, "ph": -0.03},
    "fluid_electrolyte": {"sodium": -7, "chloride": -5, "potassium": -0.5},
    "dysrhythmia": {"heart_rate": 4},
    "cerebrovascular": {"consciousness": -1.6, "sbp": 10, "dbp": 4},
    "liver": {
        "bilirubin_total": 0.7,
        "alt": 0.8,
        "ast": 0.9,
        "inr": 0.3,
        "albumin": -0.5,
        "platelets": -0.4,
        "lactate": 0.1,
        "ptt": 3,
        "hemoglobin": -0.5,
    },
    "gi_bleed": {"hemoglobin": -2.0, "bun": 0.35, "heart_rate": 6},
    "marker_h": {"sbp": 36, "dbp": 16},
    "marker_r": {"pco2": 14, "bicarbonate": 6, "chloride": -4, "ph": -0.015},
    "marker_a": {"ptt": 40},
}
# (latent, signal) effects that develop over the stay: full size after `hours` hours (linear ramp from `start`)
RAMPS: dict[tuple[str, str], tuple[float, float]] = {
    ("arf", "creatinine"): (0.3, 36.0),
    ("gi_bleed", "hemoglobin"): (0.25, 24.0),
}
ACUITY: dict[str, float] = {
    "heart_rate": 9,
    "sbp": -7,
    "dbp": -4,
    "resp_rate": 2.5,
    "spo2": -0.8,
    "temperature": 0.1,
    "consciousness": -0.7,
    "urine": -0.2,
    "creatinine": 0.08,
    "bun": 0.05,
    "bicarbonate": -1.0,
    "wbc": 0.1,
    "lactate": 0.18,
    "ast": 0.1,
    "ph": -0.01,
    "fio2": 6,
}
DYSRHYTHMIA_NOISE = 1.6


def ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, position) for a ragged layout: owner repeats i counts[i] times, position runs 0..counts[i]-1."""
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    return owner, np.arange(int(counts.sum()), dtype=np.int64) - starts[owner]


def ar1(
    rng: np.random.Generator, owner: np.ndarray, pos: np.ndarray, phi: float, sd: np.ndarray
) -> np.ndarray:
    """Stationary AR(1) noise with marginal sd `sd` (per position), restarted at each owner's position 0.

    One lfilter over the whole flat array, then the state carried over from the previous owner is removed:
    y_t = phi^(k+1) y_end(prev) + within-stay part, so subtracting phi^(k+1) y_end(prev) leaves an exact
    per-stay AR(1) whatever the neighbours.
    """
    e = rng.standard_normal(len(owner)) * np.sqrt(1 - phi * phi)
    e[pos == 0] /= np.sqrt(1 - phi * phi)
    y = lfilter([1.0], [1.0, -phi], e)
    starts = np.flatnonzero(pos == 0)
    prev_end = np.zeros(len(starts))
    prev_end[1:] = y[starts[1:] - 1]
    y -= np.power(phi, pos + 1.0) * prev_end[np.searchsorted(starts, np.arange(len(owner)), side="right") - 1]
    return y * sd


@dataclass
class Signals:
    """Hourly true values of every signal for one chunk, in the ragged layout."""

    hours: np.ndarray  # [n_stays] number of hourly positions (covers intime .. outtime)
    offset: np.ndarray  # [n_stays] first flat position of each stay
    values: dict[str, np.ndarray]

    def at(self, name: str, stay: np.ndarray, hour: np.ndarray) -> np.ndarray:
        """True value of `name` for (stay, hour) pairs; hours before intime read hour 0, after the end the last."""
        h = np.clip(hour, 0, self.hours[stay] - 1)
        return self.values[name][self.offset[stay] + h]


def build_signals(rng: np.random.Generator, pop: Population) -> Signals:
    n = pop.n_stays
    hours = (pop.outtime - pop.intime + HOUR - 1) // HOUR + 1
    owner, pos = ragged(hours)
    offset = np.cumsum(hours) - hours
    sub = pop.subgroup[pop.stay_subject]
    scale = np.where(sub, SUBGROUP_EFFECT_SCALE, 1.0)
    lat = {k: v[pop.stay_adm].astype(np.float64) for k, v in pop.latent.ehr.items()}
    values: dict[str, np.ndarray] = {}
    for name, spec in SPECS.items():
        child = rng.spawn(1)[0]
        centre = np.log(spec.mean) if spec.log else spec.mean
        base = centre + spec.between * child.standard_normal(n)
        shift = np.zeros(n)
        ramped = np.zeros(len(owner))
        for latent, effects in EFFECTS.items():
            if name not in effects:
                continue
            if (latent, name) in RAMPS:
                start, full = RAMPS[(latent, name)]
                ramp = np.minimum(1.0, start + (1 - start) * pos / full)
                ramped += (lat[latent] * effects[name])[owner] * ramp
            else:
                shift += lat[latent] * effects[name]
        shift *= scale
        ramped *= scale[owner]
        level = base + shift + ACUITY.get(name, 0.0) * pop.acuity
        sd = np.full(n, spec.within)
        if name == "heart_rate":
            sd = np.where(lat["dysrhythmia"] > 0, spec.within * DYSRHYTHMIA_NOISE, sd)
        x = level[owner] + ramped + ar1(child, owner, pos, spec.phi, sd[owner])
        if spec.log:
            x = np.exp(x)
        values[name] = np.clip(x, spec.lo, spec.hi)
    return Signals(hours=hours, offset=offset, values=values)
