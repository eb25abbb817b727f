"""Measure the true signals the way an ICU charts them: chartevents, labevents and outputevents rows.

Why these rules: `prepare` must meet the same difficulties as on MIMIC-IV, with no special path. So the events
use the itemids, units and conversions of features.yaml and the realistic ways data go wrong:

- vital signs at clock hours (some hours skipped, extra unscheduled readings in unstable patients); blood
  pressure from an arterial line (220050-2) when the stay has one, else non-invasive (220179-81);
- temperature every 4 h, ~70% of readings in Fahrenheit (223761, converted by prepare), and 1% of Celsius
  entries holding a Fahrenheit number (an out-of-range value prepare must drop);
- FiO2 only for patients on oxygen or ventilated, 8% of entries as a fraction (0.4) instead of percent;
- GCS every 4 h; glucose by finger stick more often in diabetics; admission and daily weights;
- urine by Foley hourly or by void every few hours (plus GU irrigant rows, which are not urine);
- labs in draws (chemistry, blood count, coagulation, liver panel, blood gas) at a rate that rises with
  acuity, one draw in the hours before ICU admission (outside the window), blood gases mostly when ventilated;
- the planted subgroup is drawn half as often (under-recorded) and its SpO2 reads 2.5 points high;
- rare charting errors (heart rate 0, weight 0, ...) outside features.yaml's valid ranges;
- a few itemids that are not features (alarm limits, height, RDW) that prepare must ignore.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from carebench.data.synthetic.population import HOUR, Population
from carebench.data.synthetic.signals import Signals, ragged

SUBGROUP_SPO2_BIAS = 2.5
SUBGROUP_DRAW_RATE = 0.5
FAHRENHEIT_SHARE = 0.7
FIO2_FRACTION_SHARE = 0.08


class _Rows:
    """Accumulates (stay, time, itemid, valuenum[, text]) pieces of one events table."""

    def __init__(self) -> None:
        self.stay: list[np.ndarray] = []
        self.time: list[np.ndarray] = []
        self.itemid: list[np.ndarray] = []
        self.value: list[np.ndarray] = []
        self.uom: list[np.ndarray] = []
        self.extra: dict[str, list[np.ndarray]] = {}

    def add(
        self,
        stay: np.ndarray,
        time: np.ndarray,
        itemid: int | np.ndarray,
        value: np.ndarray,
        uom: str,
        **extra: np.ndarray,
    ) -> None:
        n = len(stay)
        self.stay.append(np.asarray(stay, dtype=np.int64))
        self.time.append(np.asarray(time, dtype=np.int64))
        self.itemid.append(np.broadcast_to(np.asarray(itemid, dtype=np.int32), (n,)).copy())
        self.value.append(np.asarray(value, dtype=np.float64))
        self.uom.append(np.full(n, uom, dtype=object))
        for k, v in extra.items():
            self.extra.setdefault(k, []).append(np.asarray(v))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "stay": np.concatenate(self.stay),
            "time": np.concatenate(self.time),
            "itemid": np.concatenate(self.itemid),
            "value": np.concatenate(self.value),
            "uom": np.concatenate(self.uom),
        }
        out.update({k: np.concatenate(v) for k, v in self.extra.items()})
        order = np.lexsort((out["itemid"], out["time"], out["stay"]))
        return {k: v[order] for k, v in out.items()}


def _clock_grid(pop: Population, every: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(stay, time) at each clock hour divisible by `every` within [intime, outtime)."""
    c0 = -(-pop.intime // (every * HOUR)) * (every * HOUR)
    counts = np.maximum(0, (pop.outtime - 1 - c0) // (every * HOUR) + 1)
    stay, k = ragged(counts)
    return stay, c0[stay] + k * every * HOUR


def _poisson_times(
    rng: np.random.Generator,
    pop: Population,
    sig: Signals,
    rate: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Event times at a per-stay hourly rate (one Bernoulli per stay-hour, uniform minute inside the hour)."""
    stay, k = ragged(sig.hours)
    t = pop.intime[stay] + k * HOUR + rng.integers(0, HOUR, len(stay))
    keep = (rng.random(len(stay)) < rate[stay]) & (t < pop.outtime[stay])
    return stay[keep], t[keep]


def _hour(pop: Population, stay: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (t - pop.intime[stay]) // HOUR


def _glitch(rng: np.random.Generator, value: np.ndarray, share: float, bad: float | np.ndarray) -> np.ndarray:
    """Replace a `share` of values by `bad` (a charting error outside the valid range)."""
    hit = rng.random(len(value)) < share
    out = value.copy()
    out[hit] = bad if np.isscalar(bad) else np.asarray(bad)[hit]
    return out


def chart_events(rng: np.random.Generator, pop: Population, sig: Signals) -> dict[str, np.ndarray]:
    """chartevents rows for a chunk (stay index, time, itemid, valuenum, valueuom), sorted by stay and time."""
    rows = _Rows()
    sub = pop.subgroup[pop.stay_subject]
    # --- hourly vitals, plus unscheduled readings in unstable patients ---
    stay, t = _clock_grid(pop)
    extra = rng.random(len(stay)) < np.where(pop.acuity[stay] > 1.0, 0.3, 0.08)
    stay = np.concatenate([stay, stay[extra]])
    t = np.concatenate([t, t[extra] + rng.integers(5, 55, int(extra.sum())) * 60])
    keep = (rng.random(len(stay)) < 0.93) & (t < pop.outtime[stay])
    stay, t = stay[keep], t[keep]
    h = _hour(pop, stay, t)
    n = len(stay)

    def vital(name: str, noise: float) -> np.ndarray:
        return np.round(sig.at(name, stay, h) + rng.normal(0, noise, n))

    hr = _glitch(rng, vital("heart_rate", 1.0), 0.001, 0.0)
    m = rng.random(n) < 0.99
    rows.add(stay[m], t[m], 220045, hr[m], "bpm")
    sbp, dbp = vital("sbp", 2.0), vital("dbp", 2.0)
    dbp = np.minimum(dbp, sbp - 10)
    mbp = np.round((sbp + 2 * dbp) / 3 + rng.normal(0, 1.5, n))
    art = pop.art_line[stay]
    nibp = ~art | (rng.random(n) < 0.15)
    for ids, mask in (
        ((220050, 220051, 220052), art & (rng.random(n) < 0.97)),
        ((220179, 220180, 220181), nibp & (rng.random(n) < 0.95)),
    ):
        sb = _glitch(rng, sbp, 0.001, 0.0)
        rows.add(stay[mask], t[mask], ids[0], sb[mask], "mmHg")
        rows.add(stay[mask], t[mask], ids[1], dbp[mask], "mmHg")
        rows.add(stay[mask], t[mask], ids[2], mbp[mask], "mmHg")
    second_line = art & (rng.random(n) < 0.03)
    rows.add(stay[second_line], t[second_line], 225312, mbp[second_line], "mmHg")
    rr = vital("resp_rate", 1.0)
    m = rng.random(n) < 0.95
    rows.add(stay[m], t[m], 220210, rr[m], "insp/min")
    vent = pop.ett[stay] & (rng.random(n) < 0.6)
    rows.add(stay[vent], t[vent], 224690, np.maximum(rr[vent], 10), "insp/min")
    spo2 = np.minimum(100.0, vital("spo2", 0.6) + np.where(sub[stay], SUBGROUP_SPO2_BIAS, 0.0))
    spo2 = _glitch(rng, spo2, 0.001, 0.0)
    m = rng.random(n) < 0.96
    rows.add(stay[m], t[m], 220277, np.round(spo2[m]), "%")

    # --- every 4 h: temperature (F or C), GCS ---
    stay, t = _clock_grid(pop, 4)
    keep = rng.random(len(stay)) < 0.9
    stay, t = stay[keep], t[keep]
    h = _hour(pop, stay, t)
    n = len(stay)
    temp_c = sig.at("temperature", stay, h) + rng.normal(0, 0.1, n)
    prefers_f = rng.random(pop.n_stays) < 0.85
    fahrenheit = rng.random(n) < np.where(prefers_f[stay], FAHRENHEIT_SHARE / 0.85, 0.0)
    temp_f = np.round(temp_c * 9 / 5 + 32, 1)
    rows.add(stay[fahrenheit], t[fahrenheit], 223761, temp_f[fahrenheit], "°F")
    c = ~fahrenheit
    celsius = _glitch(rng, np.round(temp_c, 1), 0.01, temp_f)
    rows.add(stay[c], t[c], 223762, celsius[c], "°C")
    z = sig.at("consciousness", stay, h)
    eye = 1 + (z > -2.0) + (z > -1.3) + (z > -0.6)
    verbal = np.where(pop.ett[stay], 1, 1 + (z > -2.2) + (z > -1.6) + (z > -1.0) + (z > -0.5))
    motor = 1 + (z > -3.0) + (z > -2.6) + (z > -2.1) + (z > -1.5) + (z > -0.8)
    for itemid, score in ((220739, eye), (223900, verbal), (223901, motor)):
        m = rng.random(n) < 0.95
        rows.add(stay[m], t[m], itemid, score[m].astype(np.float64), "")

    # --- FiO2 for patients on support: ventilated (every 2 h), oxygen (every 4 h) ---
    resp_fail = pop.latent.ehr["resp_failure"][pop.stay_adm]
    on_o2 = resp_fail | (rng.random(pop.n_stays) < 0.35)
    stay, t = _clock_grid(pop, 2)
    rate = np.where(pop.ett, 0.9, np.where(on_o2, 0.45, 0.0))
    keep = rng.random(len(stay)) < rate[stay]
    stay, t = stay[keep], t[keep]
    h = _hour(pop, stay, t)
    level = np.where(pop.ett[stay], 40.0, 28.0) + sig.at("fio2", stay, h)
    fio2 = np.clip(np.where(pop.ett[stay], np.round(level / 5) * 5, np.round(level)), 21, 100)
    as_fraction = rng.random(len(stay)) < FIO2_FRACTION_SHARE
    rows.add(stay, t, 223835, np.where(as_fraction, fio2 / 100, fio2), "")

    # --- glucose by finger stick (more often in diabetics); occasional serum glucose charted ---
    dm = (pop.latent.ehr["dm_uncomplicated"] | pop.latent.ehr["dm_complicated"])[pop.stay_adm]
    stay, t = _poisson_times(rng, pop, sig, np.where(dm, 0.25, 0.08))
    t -= t % 60
    glu = np.round(sig.at("glucose", stay, _hour(pop, stay, t)) * rng.normal(1, 0.05, len(stay)))
    rows.add(stay, t, 225664, _glitch(rng, glu, 0.0005, 0.0), "mg/dL")
    stay, t = _poisson_times(rng, pop, sig, np.full(pop.n_stays, 0.01))
    t -= t % 60
    rows.add(stay, t, 220621, np.round(sig.at("glucose", stay, _hour(pop, stay, t))), "mg/dL")

    # --- weight: admission weight once, daily weight some mornings ---
    w = pop.weight_kg[pop.stay_subject] + rng.normal(0, 2.0, pop.n_stays)
    has_w = rng.random(pop.n_stays) < 0.93
    s = np.flatnonzero(has_w)
    tw = pop.intime[s] + rng.integers(5, 180, len(s)) * 60
    ok = tw < pop.outtime[s]
    rows.add(s[ok], tw[ok], 226512, _glitch(rng, np.round(w[s[ok]], 1), 0.005, 0.0), "kg")
    stay, t = _clock_grid(pop, 24)
    keep = rng.random(len(stay)) < 0.5
    stay, t = stay[keep], t[keep] + 4 * HOUR
    ok = t < pop.outtime[stay]
    stay, t = stay[ok], t[ok]
    drift = -0.2 * (t - pop.intime[stay]) / 86_400
    rows.add(stay, t, 224639, np.round(w[stay] + drift + rng.normal(0, 0.7, len(stay)), 1), "kg")

    # --- distractors: alarm limits and height (not features) ---
    stay, t = _clock_grid(pop, 12)
    rows.add(stay, t, 220046, np.full(len(stay), 120.0), "bpm")
    rows.add(stay, t, 220047, np.full(len(stay), 50.0), "bpm")
    s = np.flatnonzero(rng.random(pop.n_stays) < 0.5)
    rows.add(s, pop.intime[s] + 600, 226707, np.round(rng.normal(67, 4, len(s))), "Inch")
    out = rows.arrays()
    out["time"] -= out["time"] % 60
    return out


# --- labs: itemid -> (signal, unit, decimals, reference range) ---
LAB_ITEMS: dict[int, tuple[str, str, int, float, float]] = {
    50912: ("creatinine", "mg/dL", 1, 0.5, 1.2),
    51006: ("bun", "mg/dL", 0, 6, 20),
    50983: ("sodium", "mEq/L", 0, 135, 145),
    50971: ("potassium", "mEq/L", 1, 3.3, 5.1),
    50902: ("chloride", "mEq/L", 0, 96, 108),
    50882: ("bicarbonate", "mEq/L", 0, 22, 32),
    50868: ("anion_gap", "mEq/L", 0, 8, 20),
    50931: ("glucose", "mg/dL", 0, 70, 100),
    50893: ("calcium", "mg/dL", 1, 8.4, 10.3),
    50960: ("magnesium", "mg/dL", 1, 1.6, 2.6),
    50970: ("phosphate", "mg/dL", 1, 2.7, 4.5),
    51222: ("hemoglobin", "g/dL", 1, 13.7, 17.5),
    51221: ("hematocrit", "%", 1, 40, 51),
    51301: ("wbc", "K/uL", 1, 4, 11),
    51300: ("wbc", "K/uL", 1, 4, 11),
    51265: ("platelets", "K/uL", 0, 150, 400),
    51277: ("rdw", "%", 1, 10.5, 15.5),
    51237: ("inr", "", 1, 0.9, 1.1),
    51274: ("pt", "sec", 1, 9.4, 12.5),
    51275: ("ptt", "sec", 1, 25, 36.5),
    50885: ("bilirubin_total", "mg/dL", 1, 0, 1.5),
    50861: ("alt", "IU/L", 0, 0, 40),
    50878: ("ast", "IU/L", 0, 0, 40),
    50862: ("albumin", "g/dL", 1, 3.5, 5.2),
    50820: ("ph", "units", 2, 7.35, 7.45),
    50821: ("po2", "mm Hg", 0, 85, 105),
    50818: ("pco2", "mm Hg", 0, 35, 45),
    50813: ("lactate", "mmol/L", 1, 0.5, 2.0),
    50824: ("sodium", "mEq/L", 0, 133, 145),
    50822: ("potassium", "mEq/L", 1, 3.5, 5.3),
    50806: ("chloride", "mEq/L", 0, 96, 108),
    50809: ("glucose", "mg/dL", 0, 70, 105),
    50811: ("hemoglobin", "g/dL", 1, 13.7, 17.5),
    50810: ("hematocrit", "%", 0, 40, 51),
}
PANELS: dict[str, tuple[int, ...]] = {
    "chem": (50912, 51006, 50983, 50971, 50902, 50882, 50868, 50931),
    "chem_extra": (50893, 50960, 50970),
    "cbc": (51222, 51221, 51301, 51265, 51277),
    "coag": (51237, 51274, 51275),
    "lft": (50885, 50861, 50878, 50862),
    "lactate": (50813,),
    "abg": (50820, 50821, 50818),
    "abg_extra": (50824, 50822, 50806, 50809, 50811, 50810),
}


def _lab_value(
    rng: np.random.Generator, pop: Population, sig: Signals, name: str, stay: np.ndarray, hour: np.ndarray
) -> np.ndarray:
    """Measured value of a lab (true value x ~2% analytic noise); derived labs computed from their parts."""
    n = len(stay)
    if name == "anion_gap":
        v = (
            sig.at("sodium", stay, hour)
            - sig.at("chloride", stay, hour)
            - sig.at("bicarbonate", stay, hour)
            + rng.normal(0, 1.0, n)
        )
        return np.clip(v, 1, 45)
    if name == "hematocrit":
        return sig.at("hemoglobin", stay, hour) * 3.0 + rng.normal(0, 0.8, n)
    if name == "pt":
        return sig.at("inr", stay, hour) * 11.0 + rng.normal(0, 0.3, n)
    if name == "rdw":
        return rng.normal(14.5, 1.5, n)
    return sig.at(name, stay, hour) * rng.normal(1.0, 0.02, n)


def lab_events(rng: np.random.Generator, pop: Population, sig: Signals) -> dict[str, np.ndarray]:
    """labevents rows: one row per (draw, itemid); `draw` numbers the specimen within the chunk."""
    sub = pop.subgroup[pop.stay_subject]
    slow = np.where(sub, SUBGROUP_DRAW_RATE, 1.0)
    e = {k: v[pop.stay_adm] for k, v in pop.latent.ehr.items()}
    # routine draws at an acuity-dependent rate, one soon after ICU admission, one before it (pre-ICU)
    rate = (0.07 + 0.07 * (pop.acuity > 0.5)) * slow
    stay_r, t_r = _poisson_times(rng, pop, sig, rate)
    first = np.flatnonzero(rng.random(pop.n_stays) < 0.95)
    t_first = pop.intime[first] + rng.integers(10, 150, len(first)) * 60
    pre = np.flatnonzero(rng.random(pop.n_stays) < 0.85)
    t_pre = pop.intime[pre] - rng.integers(60, 360, len(pre)) * 60
    stay = np.concatenate([stay_r, first, pre])
    t = np.concatenate([t_r, t_first, t_pre])
    kind = np.concatenate(
        [np.zeros(len(stay_r), np.int8), np.ones(len(first), np.int8), np.full(len(pre), 2, np.int8)]
    )
    n = len(stay)
    u = rng.random((5, n))
    admission_draw = kind > 0
    liver = e["liver"][stay]
    septic = (e["sepsis"] | e["shock"])[stay]
    panel_mask = {
        "chem": np.ones(n, dtype=bool),
        "chem_extra": u[0] < 0.8,
        "cbc": u[1] < 0.9,
        "coag": u[2] < np.where(admission_draw, 0.9, 0.5),
        "lft": u[3] < np.where(liver, 0.7, np.where(admission_draw, 0.6, 0.3)),
        "lactate": u[4] < np.where(septic, 0.6, 0.2),
    }
    # blood gases: mostly in ventilated patients
    abg_rate = np.where(pop.ett, 0.25, np.where(e["resp_failure"], 0.1, 0.033)) * slow
    stay_g, t_g = _poisson_times(rng, pop, sig, abg_rate)
    ng = len(stay_g)
    gas_mask = {
        "abg": np.ones(ng, dtype=bool),
        "lactate": rng.random(ng) < 0.8,
        "abg_extra": rng.random(ng) < 0.3,
    }

    out: dict[str, list[np.ndarray]] = {k: [] for k in ("stay", "time", "itemid", "value", "draw")}
    for draw_offset, (d_stay, d_time, masks) in enumerate(((stay, t, panel_mask), (stay_g, t_g, gas_mask))):
        d_time = d_time - d_time % 60
        draw_id = np.arange(len(d_stay)) + draw_offset * n
        hour = _hour(pop, d_stay, d_time)
        alt_wbc = rng.random(len(d_stay)) < 0.05
        for panel, mask in masks.items():
            for itemid in PANELS[panel]:
                name, _, dec, _, _ = LAB_ITEMS[itemid]
                m = mask
                if itemid in (51300, 51301):  # 5% of blood counts report WBC under the older itemid
                    m = mask & (alt_wbc == (itemid == 51300))
                s, tt, hh = d_stay[m], d_time[m], hour[m]
                v = np.round(_lab_value(rng, pop, sig, name, s, hh), dec)
                if itemid == 50971:
                    v = _glitch(rng, v, 0.0005, 0.0)
                out["stay"].append(s)
                out["time"].append(tt)
                out["itemid"].append(np.full(len(s), itemid, dtype=np.int32))
                out["value"].append(v)
                out["draw"].append(draw_id[m])
    res = {k: np.concatenate(v) for k, v in out.items()}
    order = np.lexsort((res["itemid"], res["time"], res["stay"]))
    return {k: v[order] for k, v in res.items()}


URINE_ITEMS = {"foley": 226559, "void": 226560, "condom": 226561, "irrigant": 227489}


def output_events(rng: np.random.Generator, pop: Population, sig: Signals) -> dict[str, np.ndarray]:
    """outputevents rows: Foley hourly, or voids every few hours, plus rare GU irrigant rows."""
    rows = _Rows()
    foley = pop.ett | (rng.random(pop.n_stays) < 0.75)
    stay, t = _clock_grid(pop)
    keep = foley[stay] & (rng.random(len(stay)) < 0.9)
    stay, t = stay[keep], t[keep]
    v = np.round(sig.at("urine", stay, _hour(pop, stay, t)) / 5) * 5
    v = _glitch(rng, v, 0.001, rng.uniform(6000, 9000, len(v)).round())
    rows.add(stay, t, URINE_ITEMS["foley"], v, "ml")
    stay, t = _poisson_times(rng, pop, sig, np.where(foley, 0.0, 0.22))
    t -= t % 60
    v = np.round(sig.at("urine", stay, _hour(pop, stay, t)) * rng.uniform(3, 6, len(stay)) / 10) * 10
    condom = (pop.gender[pop.stay_subject] == "M") & (rng.random(pop.n_stays) < 0.1)
    rows.add(stay, t, np.where(condom[stay], URINE_ITEMS["condom"], URINE_ITEMS["void"]), v, "ml")
    s = np.flatnonzero(rng.random(pop.n_stays) < 0.01)
    rows.add(s, pop.intime[s] + 2 * HOUR, URINE_ITEMS["irrigant"], np.full(len(s), 3000.0), "ml")
    out = rows.arrays()
    ok = out["time"] < pop.outtime[out["stay"]]
    return {k: v[ok] for k, v in out.items()}


def lab_reference(itemid: np.ndarray) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(valueuom, ref_range_lower, ref_range_upper) arrays for lab itemids."""
    ids = np.array(sorted(LAB_ITEMS), dtype=np.int32)
    idx = np.searchsorted(ids, itemid)
    uom = np.array([LAB_ITEMS[i][1] for i in ids], dtype=object)[idx]
    lo = np.array([LAB_ITEMS[i][3] for i in ids])[idx]
    hi = np.array([LAB_ITEMS[i][4] for i in ids])[idx]
    return pa.array(uom, pa.string()), pa.array(lo), pa.array(hi)
