"""Build a MIMIC-CXR-JPG-shaped tree from the real open radiographs, linked to real MIMIC-IV demo stays.

`build_cxr_fixture(root, stays, cxr_open)` writes `<root>/mimic-cxr-2.0.0-metadata.csv.gz` and
`<root>/files/p../p<subject>/s<study>/<dicom>.jpg` and returns the expected linkage {stay_id: dicom_id | None}.

Each scenario in SCENARIOS is placed on its own stay (a subject with a single stay, so scenarios cannot
interfere), except `multi_stay`, which uses the subject whose two stays start closest together, so one image can
fall in both stays' windows. Image times are offsets in hours from the anchor stay's intime. The expected
linkage is derived from these known offsets with the rule stated in docs/cxr.md (AP/PA, readable file, time in
[intime - lookback, intime + prediction), latest by (time, dicom_id)), written here in plain Python.

The pixel sources are the real radiographs in ../shared/data/cxr-open (hannover/*.jpg copied byte for byte,
nih/*.png converted to JPEG here, one hannover image upscaled ×3 so the reduced-scale JPEG decode is exercised).
They are not the demo patients' images; the linkage is a test fixture only.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image


@dataclass(frozen=True)
class Img:
    hours: float  # study time = anchor intime + hours
    view: str  # ViewPosition as written ('' = empty)
    state: str = "ok"  # ok | corrupt (garbage bytes) | truncated (cut JPEG) | missing (not on disk)
    source: str = "hannover"  # hannover | nih | large
    study: int | None = None  # images with the same `study` share a study_id (same study time)


# Scenario name -> images. Offsets chosen on both sides of every window edge.
SCENARIOS: dict[str, list[Img]] = {
    "single_ap": [Img(10, "AP")],
    "at_intime": [Img(0, "PA")],  # lower edge is inclusive
    "two_eligible": [Img(5, "AP"), Img(30, "PA", source="nih")],  # the later one wins
    "before_intime": [Img(-6, "AP")],  # only with lookback >= 6 h
    "before_and_in": [Img(-6, "PA"), Img(20, "AP")],
    "at_prediction": [Img(48, "AP")],  # upper edge is exclusive
    "just_before_prediction": [Img(48 - 0.5 / 3600, "PA"), Img(48, "AP")],
    "after": [Img(60, "AP"), Img(100, "PA")],
    "lateral_later": [Img(10, "AP"), Img(40, "LATERAL")],
    "lateral_only": [Img(12, "LATERAL"), Img(13, "LL")],
    "other_views": [Img(5, "PA"), Img(30, "AP AXIAL"), Img(35, "")],
    "corrupt_fallback": [Img(20, "PA"), Img(30, "AP", state="corrupt")],
    "truncated_only": [Img(9, "AP", state="truncated")],
    "missing_fallback": [Img(15, "AP"), Img(25, "AP", state="missing")],
    "same_time": [Img(16, "AP", study=1), Img(16, "PA", study=1)],  # tie: larger dicom_id wins
    "fractional": [Img(3 + 25 / 60 + 12.5 / 3600, "ap")],  # 03:25:12.5 after intime; lower-case view
    "nih_png": [Img(7, "PA", source="nih")],
    "large_jpeg": [Img(11, "PA", source="large")],
}
MULTI_STAY = "multi_stay"  # offsets relative to the FIRST of two close stays of one subject
MULTI_STAY_IMAGES = [Img(0.25, "PA"), Img(5, "AP"), Img(48.5, "AP")]
UNKNOWN_SUBJECT = 19999999  # metadata rows for a subject not in the cohort: must be ignored

_VIEW_TEXT = {"AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral", "LL": "left lateral"}


def dicom_id_for(scenario: str, k: int) -> str:
    """Deterministic MIMIC-looking dicom_id (5 groups of 8 hex digits)."""
    h = hashlib.sha1(f"{scenario}/{k}".encode()).hexdigest()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


def scenario_stays(stays: pd.DataFrame) -> dict[str, int]:
    """Scenario -> anchor stay_id: single-stay subjects in stay_id order; multi_stay -> first of the closest pair."""
    s = stays.sort_values("stay_id")
    per_subject = s.groupby("subject_id")["stay_id"].transform("size")
    singles = s.loc[per_subject == 1, "stay_id"].tolist()
    if len(singles) < len(SCENARIOS):
        raise ValueError(f"need {len(SCENARIOS)} single-stay subjects, the stays table has {len(singles)}")
    out = dict(zip(SCENARIOS, singles, strict=False))
    multi = s.loc[per_subject > 1].sort_values(["subject_id", "intime"]).copy()
    multi["gap"] = multi.groupby("subject_id")["intime"].diff().shift(-1)
    multi = multi.dropna(subset=["gap"]).sort_values(["gap", "stay_id"])
    if len(multi):
        out[MULTI_STAY] = int(multi["stay_id"].iloc[0])
    return out


def _study_date_time(t: pd.Timestamp, style: int) -> tuple[int, str]:
    """DICOM StudyDate int and StudyTime text (a number: no leading zeros), in a few real-world spellings."""
    hhmmss = t.hour * 10000 + t.minute * 100 + t.second
    if t.microsecond:
        text = f"{hhmmss + t.microsecond / 1e6:.6f}".rstrip("0")
    else:
        text = (str(hhmmss), f"{hhmmss}.0", f"{hhmmss}.000")[style % 3]
    return int(t.strftime("%Y%m%d")), text


def _sources(cxr_open: Path, work: Path) -> dict[str, list[Path]]:
    hannover = sorted((cxr_open / "hannover").glob("*.jpg"))
    nih = []
    for png in sorted((cxr_open / "nih").glob("*.png")):
        jpg = work / f"{png.stem}.jpg"
        with Image.open(png) as im:
            im.convert("L").save(jpg, "JPEG", quality=95)
        nih.append(jpg)
    large = work / "large.jpg"
    with Image.open(hannover[0]) as im:
        im.resize((im.width * 3, im.height * 3), Image.Resampling.BICUBIC).save(large, "JPEG", quality=95)
    return {"hannover": hannover, "nih": nih, "large": [large]}


def _write_image(dst: Path, img: Img, src: Path, rng: random.Random) -> tuple[int, int]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if img.state == "corrupt":
        dst.write_bytes(rng.randbytes(4096))
        return 3000, 2500
    data = src.read_bytes()
    if img.state == "truncated":
        data = data[: len(data) * 2 // 5]
    dst.write_bytes(data)
    with Image.open(src) as im:
        return im.height, im.width


def build_cxr_fixture(
    root: Path,
    stays: pd.DataFrame,
    cxr_open: Path,
    *,
    lookback_hours: float = 0.0,
    prediction_hours: float = 48.0,
) -> dict[int, str | None]:
    """Write the tree under `root` and return {stay_id: expected dicom_id or None} for every row of `stays`.

    `stays` needs stay_id, subject_id, intime. The tree does not depend on the window options; they only change
    the expected linkage returned.
    """
    root = Path(root)
    work = root / "_sources"
    work.mkdir(parents=True, exist_ok=True)
    pools = _sources(Path(cxr_open), work)
    counters = dict.fromkeys(pools, 0)
    rng = random.Random(0)
    by_stay = stays.set_index("stay_id")
    anchors = scenario_stays(stays)
    placed = {name: (sid, SCENARIOS.get(name, MULTI_STAY_IMAGES)) for name, sid in anchors.items()}

    rows, images = [], []  # images: (subject_id, time, view, state, dicom_id) for the expected linkage
    for s_idx, (name, (stay_id, imgs)) in enumerate(placed.items()):
        subject = int(by_stay.loc[stay_id, "subject_id"])
        intime = pd.Timestamp(by_stay.loc[stay_id, "intime"])
        for k, img in enumerate(imgs):
            t = (intime + pd.Timedelta(hours=img.hours)).round("us")
            dicom = dicom_id_for(name, k)
            study = 50_000_000 + 100 * s_idx + (img.study if img.study is not None else 10 + k)
            pool = pools[img.source]
            src = pool[counters[img.source] % len(pool)]
            counters[img.source] += 1
            dst = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
            h, w = (2500, 3000) if img.state == "missing" else _write_image(dst, img, src, rng)
            date, tm = _study_date_time(t, k)
            view = img.view
            rows.append(_row(dicom, subject, study, view, h, w, date, tm))
            images.append((subject, t, view.strip().upper(), img.state, dicom))
    # Noise the linkage must ignore: another subject's images, and a row with an unparseable StudyTime.
    first = next(iter(placed.values()))[0]
    t0 = pd.Timestamp(by_stay.loc[first, "intime"]) + pd.Timedelta(hours=2)
    d, tm = _study_date_time(t0, 0)
    rows.append(_row(dicom_id_for("unknown_subject", 0), UNKNOWN_SUBJECT, 59_999_999, "AP", 10, 10, d, tm))
    rows.append(
        _row(
            dicom_id_for("bad_time", 0),
            int(by_stay.loc[first, "subject_id"]),
            59_999_998,
            "AP",
            10,
            10,
            d,
            "",
        )
    )
    meta = pd.DataFrame(rows)
    meta.to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False, compression="gzip")

    return expected_linkage(stays, images, lookback_hours=lookback_hours, prediction_hours=prediction_hours)


def _row(dicom: str, subject: int, study: int, view: str, h: int, w: int, date: int, tm: str) -> dict:
    v = view.strip().upper()
    proc = "CHEST (PORTABLE AP)" if v == "AP" else "CHEST (PA AND LAT)"
    return {
        "dicom_id": dicom,
        "subject_id": subject,
        "study_id": study,
        "PerformedProcedureStepDescription": proc,
        "ViewPosition": view,
        "Rows": h,
        "Columns": w,
        "StudyDate": date,
        "StudyTime": tm,
        "ProcedureCodeSequence_CodeMeaning": proc,
        "ViewCodeSequence_CodeMeaning": _VIEW_TEXT.get(v, ""),
        "PatientOrientationCodeSequence_CodeMeaning": "Erect" if v == "PA" else "Recumbent",
    }


def expected_linkage(
    stays: pd.DataFrame, images: list[tuple], *, lookback_hours: float, prediction_hours: float
) -> dict[int, str | None]:
    """The rule, by hand: per stay, readable AP/PA images of its subject in the window; latest (time, dicom_id)."""
    out: dict[int, str | None] = {}
    for stay_id, subject, intime in zip(stays["stay_id"], stays["subject_id"], stays["intime"], strict=True):
        lo = pd.Timestamp(intime) - pd.Timedelta(hours=lookback_hours)
        hi = pd.Timestamp(intime) + pd.Timedelta(hours=prediction_hours)
        ok = [
            (t, d)
            for s, t, v, state, d in images
            if s == subject and v in ("AP", "PA") and state == "ok" and lo <= t < hi
        ]
        out[int(stay_id)] = max(ok)[1] if ok else None
    return out


def read_metadata(root: Path) -> pd.DataFrame:
    """The fixture's metadata as written (for tests that check the fixture itself)."""
    return pd.read_csv(
        io.BytesIO((root / "mimic-cxr-2.0.0-metadata.csv.gz").read_bytes()),
        compression="gzip",
        dtype={"StudyTime": str},
    )
