"""Chest X-ray studies of each stay: when they are taken, which views, what they show, and their files.

Availability (the planted missingness mechanism, missing not at random): a stay has a frontal (AP/PA) study
inside the 48 h window with probability sigmoid(alpha + CXR_ACUITY_SLOPE * acuity), sicker patients being
imaged more often; alpha is solved so that the share of such stays equals `--cxr-rate`. Acuity also drives
mortality, so models see X-rays mostly for the sicker stays. Other studies test the linkage rule of `prepare`:
an earlier frontal in the window (the last one must be chosen), PA studies with their LATERAL companion,
studies before ICU admission (ED films) and after the window (some exactly at intime + 48 h, which is outside
[intime, intime + 48 h)), and a LATERAL-only study inside the window (never linked).

Findings come from the X-ray side of the latent state only (conditions.py): consolidation (pneumonia),
cardiomegaly and edema (heart failure; cardiomegaly also without it), effusion, pneumothorax or atelectasis,
a pacemaker; ICU devices (endotracheal tube, central line) from the stay's acuity-driven devices, shown only on
films taken after ICU admission. Each film of an admission shows the same findings with a small per-film
variation of severity. Body size follows the patient's weight (visible in both modalities, like in life).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from carebench.data.synthetic.population import HOUR, Population, year_of

CXR_ACUITY_SLOPE = 1.2
WINDOW_HOURS = 48
SEVERITY_KEYS = (
    "cardiomegaly",
    "consolidation_left",
    "consolidation_right",
    "effusion_left",
    "effusion_right",
    "edema",
    "atelectasis",
    "pneumothorax",
    "pacemaker",
)
DESCRIPTION = {"AP": "CHEST (PORTABLE AP)", "PA": "CHEST (PA AND LAT)", "LATERAL": "CHEST (PA AND LAT)"}
VIEW_MEANING = {"AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral"}
ORIENTATION = {"AP": "Recumbent", "PA": "Erect", "LATERAL": "Erect"}
JPEG_QUALITY = 90
MAX_STUDIES_PER_STAY = 8


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def solve_intercept(rate: float, slope: float = CXR_ACUITY_SLOPE) -> float:
    """alpha with E[sigmoid(alpha + slope * a)] = rate for a ~ N(0, 1) (Gauss-Hermite quadrature, bisection)."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    lo, hi = -30.0, 30.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(np.sum(w * _sigmoid(mid + slope * x))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class Images:
    """One row per image of the chunk (stays index local stays)."""

    stay: np.ndarray
    study: np.ndarray  # global study index -> study_id
    view: np.ndarray  # "AP" | "PA" | "LATERAL"
    time_ms: np.ndarray  # study time, milliseconds since 1970
    in_icu: np.ndarray  # taken at or after intime (ICU devices visible)


def admission_findings(rng: np.random.Generator, pop: Population) -> dict[str, np.ndarray]:
    """Severity (0..1) of each finding per admission, from the X-ray-side latent variables."""
    x = pop.latent.cxr
    n = len(pop.hadm_id)
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    chf = x["chf"]
    card = np.where(chf, u(0.55, 1.0), np.where(x["cardiomegaly"], u(0.45, 0.85), u(0.0, 0.12)))
    edema = np.where(chf & (rng.random(n) < 0.85), u(0.35, 0.9), 0.0)
    side = rng.random(n)
    cons = u(0.6, 1.0)
    pn = x["pneumonia"]
    cons_l = np.where(pn & (side < 0.55), cons, 0.0)
    cons_r = np.where(pn & (side >= 0.35), cons, 0.0)
    eff_side = rng.random(n)
    eff = u(0.4, 1.0)
    ef = x["effusion"]
    eff_l = np.where(ef & (eff_side < 0.65), eff, 0.0)
    eff_r = np.where(ef & (eff_side >= 0.30), eff, 0.0)
    pleural = x["pleural"]
    ptx = pleural & (rng.random(n) < 0.6)
    pneumothorax = np.where(ptx, u(0.6, 1.0), 0.0)
    distractor = ~pleural & (rng.random(n) < 0.08)
    atelectasis = np.where(pleural & ~ptx, u(0.7, 1.0), np.where(distractor, u(0.1, 0.3), 0.0))
    pacemaker = np.where(x["conduction"], 1.0, 0.0)
    return {
        "cardiomegaly": card,
        "consolidation_left": cons_l,
        "consolidation_right": cons_r,
        "effusion_left": eff_l,
        "effusion_right": eff_r,
        "edema": edema,
        "atelectasis": atelectasis,
        "pneumothorax": pneumothorax,
        "pacemaker": pacemaker,
    }


def plan_studies(rng: np.random.Generator, pop: Population, alpha: float, first_stay_index: int) -> Images:
    """Which stays are imaged when and in which views (see module docstring)."""
    n = pop.n_stays
    los_h = (pop.outtime - pop.intime) / HOUR
    stays: list[np.ndarray] = []
    times: list[np.ndarray] = []
    views: list[np.ndarray] = []
    slots: list[np.ndarray] = []  # study slot within the stay (0..MAX_STUDIES_PER_STAY-1)

    def add(mask: np.ndarray, t_hours: np.ndarray, view: np.ndarray | str, slot: int) -> None:
        s = np.flatnonzero(mask)
        stays.append(s)
        times.append(pop.intime[s] * 1000 + np.round(t_hours[s] * HOUR * 1000).astype(np.int64))
        views.append(np.broadcast_to(np.asarray(view, dtype=object), (n,))[s])
        slots.append(np.full(len(s), slot))

    linked = rng.random(n) < _sigmoid(alpha + CXR_ACUITY_SLOPE * pop.acuity)
    end = np.minimum(WINDOW_HOURS, los_h) - 0.05
    t_last = rng.uniform(0.05, 1.0, n) * end
    frontal = np.where(rng.random(n) < 0.85, "AP", "PA").astype(object)
    add(linked, t_last, frontal, 0)
    add(linked & (frontal == "PA"), t_last, "LATERAL", 0)
    earlier = linked & (rng.random(n) < 0.15)
    add(earlier, t_last * rng.uniform(0.0, 0.9, n), "AP", 1)
    # LATERAL-only study inside the window for a few unlinked stays (the view rule must skip it)
    add(~linked & (rng.random(n) < 0.03), rng.uniform(0.05, 1.0, n) * end, "LATERAL", 2)
    # before ICU admission (ED / ward film), frontal, with a lateral when PA
    pre = rng.random(n) < 0.08
    pre_view = np.where(rng.random(n) < 0.5, "AP", "PA").astype(object)
    t_pre = -rng.uniform(0.5, 24.0, n)
    add(pre, t_pre, pre_view, 3)
    add(pre & (pre_view == "PA"), t_pre, "LATERAL", 3)
    # after the window, still in the ICU (so never inside another stay's window): some exactly at
    # intime + 48 h, which the half-open window [intime, intime + 48 h) excludes
    post = (rng.random(n) < 0.1) & (los_h > WINDOW_HOURS + 0.1)
    room = np.clip(los_h - WINDOW_HOURS - 0.05, 0.0, 72.0)
    t_post = np.where(
        rng.random(n) < 0.25, float(WINDOW_HOURS), WINDOW_HOURS + rng.uniform(0.0, 1.0, n) * room
    )
    add(post, t_post, "AP", 4)

    stay = np.concatenate(stays)
    slot = np.concatenate(slots)
    study = (first_stay_index + stay) * MAX_STUDIES_PER_STAY + slot
    time_ms = np.concatenate(times)
    order = np.lexsort((np.concatenate(views).astype(str), time_ms, stay))
    return Images(
        stay=stay[order],
        study=study[order],
        view=np.concatenate(views)[order],
        time_ms=time_ms[order],
        in_icu=(time_ms >= pop.intime[stay] * 1000)[order],
    )


def dicom_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """MIMIC-CXR-style DICOM ids: five dash-separated groups of 8 hex digits."""
    parts = rng.integers(0, 2**32, size=(n, 5), dtype=np.uint64)
    return np.array(["-".join(f"{int(v):08x}" for v in row) for row in parts], dtype=object)


def study_date_time(time_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DICOM StudyDate (YYYYMMDD integer) and StudyTime (HHMMSS.fff as a number, leading zeros lost)."""
    secs = time_ms // 1000
    day = secs.astype("datetime64[s]").astype("datetime64[D]")
    y = year_of(secs)
    m = day.astype("datetime64[M]").astype(np.int64) % 12 + 1
    d = (day - day.astype("datetime64[M]")).astype(np.int64) + 1
    sod = secs - day.astype("datetime64[s]").astype(np.int64)
    hhmmss = (sod // 3600) * 10000 + (sod // 60 % 60) * 100 + sod % 60
    return y * 10000 + m * 100 + d, np.round(hhmmss + (time_ms % 1000) / 1000.0, 3)


def body_size(weight_kg: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + (weight_kg - 78.0) / 60.0, 0.05, 0.95)


def render_chunk(
    images: Images,
    pop: Population,
    findings: dict[str, np.ndarray],
    paths: list[Path],
    seed: int,
    chunk: int,
    size: int,
    rng: np.random.Generator,
) -> None:
    """Render and write every image of the chunk (JPEG). Each image draws from its own generator seeded by
    (seed, chunk, image number), so the pixels do not depend on how rendering is scheduled."""
    from carebench.data.synthetic.radiograph import render_radiograph

    jitter = rng.uniform(0.85, 1.15, (len(images.stay), len(SEVERITY_KEYS)))
    exposure = rng.uniform(0.3, 0.7, len(images.stay))
    sizes = body_size(pop.weight_kg[pop.stay_subject])
    for i, s in enumerate(images.stay):
        adm = pop.stay_adm[s]
        f: dict[str, float] = {}
        for k, key in enumerate(SEVERITY_KEYS):
            v = float(findings[key][adm])
            if v > 0:
                f[key] = 1.0 if key == "pacemaker" else min(1.0, v * jitter[i, k])
        if images.in_icu[i]:
            if pop.ett[s]:
                f["ett"] = 1.0
            if pop.central_line[s]:
                f["central_line"] = 1.0
        f["body_size"] = float(sizes[s])
        f["exposure"] = float(exposure[i])
        img = render_radiograph(np.random.default_rng([seed, chunk, i, 0x58]), f, size, str(images.view[i]))
        paths[i].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(paths[i], format="JPEG", quality=JPEG_QUALITY)


def image_relpath(subject_id: int, study_id: int, dicom_id: str) -> Path:
    s = str(int(subject_id))
    return Path("files") / f"p{s[:2]}" / f"p{s}" / f"s{int(study_id)}" / f"{dicom_id}.jpg"
