"""Link each ICU stay to its chest X-ray (MIMIC-CXR-JPG) and build the uint8 image cache.

Rule (docs/cxr.md): for each cohort stay, take the subject's AP or PA images whose study time lies in
[intime − lookback, intime + prediction_hours) and keep the LAST one, ordered by (study time, dicom_id). Nothing
taken at or after the prediction time is used, so the image cannot carry information from after the moment the
prediction is made. An image whose file is missing or unreadable is reported and skipped, and the stay falls back
to its next-latest eligible image (or to no image).

The metadata is read with DuckDB; study time = StudyDate (YYYYMMDD) + StudyTime (HHMMSS[.ffffff] as a number, so
leading zeros are lost: 93000 is 09:30:00). Images are decoded in a thread pool (Pillow releases the GIL) and
streamed into a memory-mapped .npy in cohort row order, so the cache never has to fit in memory.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from carebench.data.images import load_square_gray
from carebench.data.mimic.tables import RawDataError, _sql_str, read_header

METADATA_NAMES = (
    "mimic-cxr-2.0.0-metadata.csv.gz",
    "mimic-cxr-2.0.0-metadata.csv",
    "mimic-cxr-2.0.0-metadata.parquet",
)
# Metadata columns we use -> DuckDB type they are read as. StudyDate/StudyTime are read as text and converted
# with TRY_CAST so one malformed value drops one row (counted) instead of failing the whole file.
METADATA_COLUMNS = {
    "dicom_id": "VARCHAR",
    "subject_id": "BIGINT",
    "study_id": "BIGINT",
    "ViewPosition": "VARCHAR",
    "StudyDate": "VARCHAR",
    "StudyTime": "VARCHAR",
}
VIEWS = ("AP", "PA")
COHORT_COLUMNS = ("row_idx", "stay_id", "subject_id", "intime")
MAX_IDS_IN_WARNING = 10


@dataclass
class CxrResult:
    columns: pd.DataFrame  # N rows in cohort row_idx order (see prepare_cxr)
    stats: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Candidate:
    dicom_id: str
    path: Path
    time: pd.Timestamp
    view: str


def find_metadata(cxr_root: str | Path) -> Path:
    """The metadata file under the MIMIC-CXR-JPG root, with the columns we need (header read only)."""
    root = Path(cxr_root)
    if not root.is_dir():
        what = "path does not exist" if not root.exists() else "not a directory"
        raise RawDataError(
            f"--mimic-cxr {root}: {what} (expected the MIMIC-CXR-JPG root holding "
            f"{METADATA_NAMES[0]} and files/)"
        )
    found = [root / n for n in METADATA_NAMES if (root / n).is_file()]
    if not found:
        raise RawDataError(
            f"MIMIC-CXR-JPG metadata not found under {root} (expected one of: {', '.join(METADATA_NAMES)})"
        )
    path = found[0]
    header = read_header(path)
    present = {h.lower() for h in header}
    for col in METADATA_COLUMNS:
        if col.lower() not in present:
            raise RawDataError(f"{path}: missing column '{col}' (found columns: {', '.join(header)})")
    return path


def study_datetime_sql(date_col: str, time_col: str) -> str:
    """SQL expression: TIMESTAMP from DICOM StudyDate (YYYYMMDD) and StudyTime (HHMMSS.ffffff), NULL if invalid.

    StudyTime arrives as a number, so 09:30:00 is written 93000 and 00:05:07.25 is 507.25. Working in integer
    microseconds of the HHMMSS number (rounded, so 134512.5 is exact) avoids float drift in the seconds.
    Out-of-range parts (hour >= 24, minute or second >= 60, negative) give NULL.
    """
    us = f"CAST(round(TRY_CAST(trim({time_col}) AS DOUBLE) * 1000000) AS BIGINT)"
    day = f"try_strptime(lpad(CAST(TRY_CAST(trim({date_col}) AS BIGINT) AS VARCHAR), 8, '0'), '%Y%m%d')"
    hh, mm, ss = f"({us} // 10000000000)", f"(({us} // 100000000) % 100)", f"({us} % 100000000)"
    return (
        f"CASE WHEN {us} >= 0 AND {hh} < 24 AND {mm} < 60 AND {ss} < 60000000 THEN "
        f"{day} + to_microseconds({hh} * 3600000000 + {mm} * 60000000 + {ss}) END"
    )


def register_cxr_metadata(con: duckdb.DuckDBPyConnection, cxr_root: str | Path) -> Path:
    """Create table `cxr_metadata(dicom_id, subject_id, study_id, view_position, study_time)` on `con`.

    view_position is upper-cased and trimmed ('' → NULL); study_time is NULL where StudyDate/StudyTime do not
    parse. Returns the metadata path (for the manifest).
    """
    path = find_metadata(cxr_root)
    header = read_header(path)
    src = {h.lower(): h for h in header}
    col = {c: src[c.lower()] for c in METADATA_COLUMNS}
    if path.name.endswith(".parquet"):
        reader = f"read_parquet({_sql_str(path)})"
    else:
        types = ", ".join(f"{_sql_str(col[c])}: {_sql_str(t)}" for c, t in METADATA_COLUMNS.items())
        reader = f"read_csv({_sql_str(path)}, header=true, auto_detect=true, types={{{types}}})"
    q = {c: f'"{col[c]}"' for c in METADATA_COLUMNS}
    sql = f"""
        CREATE OR REPLACE TABLE cxr_metadata AS
        SELECT CAST({q["dicom_id"]} AS VARCHAR) AS dicom_id,
               CAST({q["subject_id"]} AS BIGINT) AS subject_id,
               CAST({q["study_id"]} AS BIGINT) AS study_id,
               NULLIF(upper(trim(CAST({q["ViewPosition"]} AS VARCHAR))), '') AS view_position,
               {study_datetime_sql(f"CAST({q['StudyDate']} AS VARCHAR)", f"CAST({q['StudyTime']} AS VARCHAR)")}
                   AS study_time
        FROM {reader}"""
    try:
        con.execute(sql)
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RawDataError(f"{path}: cannot be read as MIMIC-CXR-JPG metadata ({first})") from e
    return path


def image_path(cxr_root: Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    """MIMIC-CXR-JPG layout: files/p{first 2 digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg."""
    s = str(int(subject_id))
    return cxr_root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{int(study_id)}" / f"{dicom_id}.jpg"


def _check_options(image_size: int, lookback_hours: float, prediction_hours: float, threads: int) -> None:
    if not isinstance(image_size, int | np.integer) or image_size < 8:
        raise RawDataError(f"image_size={image_size!r}: expected an integer number of pixels >= 8")
    if not math.isfinite(lookback_hours) or lookback_hours < 0:
        raise RawDataError(f"lookback_hours={lookback_hours!r}: expected a number of hours >= 0")
    if not math.isfinite(prediction_hours) or prediction_hours <= 0:
        raise RawDataError(f"prediction_hours={prediction_hours!r}: expected a number of hours > 0")
    if not isinstance(threads, int | np.integer) or threads < 1:
        raise RawDataError(f"threads={threads!r}: expected an integer >= 1")


def _check_cohort(con: duckdb.DuckDBPyConnection) -> None:
    try:
        cols = {r[0] for r in con.execute("DESCRIBE cohort").fetchall()}
    except duckdb.Error as e:
        raise ValueError("prepare_cxr needs table `cohort` on the connection (run build_cohort first)") from e
    missing = [c for c in COHORT_COLUMNS if c not in cols]
    if missing:
        raise ValueError(f"table `cohort` lacks columns {missing} needed for CXR linkage")


def link_candidates(
    con: duckdb.DuckDBPyConnection, *, lookback_hours: float, prediction_hours: float
) -> pd.DataFrame:
    """Every (stay, AP/PA image) pair in the window, latest first within a stay.

    Ordered by row_idx, then study_time DESC, then dicom_id DESC: the first row of a stay is its linked image,
    and the following rows are the fallbacks in order.
    """
    lo = round(lookback_hours * 3600e6)
    hi = round(prediction_hours * 3600e6)
    views = ", ".join(_sql_str(v) for v in VIEWS)
    return con.execute(
        f"""
        SELECT c.row_idx, m.dicom_id, m.subject_id, m.study_id, m.study_time, m.view_position
        FROM cohort c JOIN cxr_metadata m ON m.subject_id = c.subject_id
        WHERE m.view_position IN ({views}) AND m.study_time IS NOT NULL
          AND m.study_time >= c.intime - to_microseconds(CAST(? AS BIGINT))
          AND m.study_time <  c.intime + to_microseconds(CAST(? AS BIGINT))
        ORDER BY c.row_idx, m.study_time DESC, m.dicom_id DESC""",
        [lo, hi],
    ).df()


def _decode_first_readable(cands: list[Candidate], size: int) -> tuple[int, np.ndarray | None, list, list]:
    """Try the stay's candidates latest first; return (position used or -1, pixels, missing, corrupt)."""
    missing: list[str] = []
    corrupt: list[tuple[str, str]] = []
    for k, c in enumerate(cands):
        try:
            return k, load_square_gray(c.path, size), missing, corrupt
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            missing.append(c.dicom_id)
        except Exception as e:  # any decoder failure means "unreadable file", never a crash of the run
            corrupt.append((c.dicom_id, type(e).__name__))
    return -1, None, missing, corrupt


def _list_ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:MAX_IDS_IN_WARNING])
    more = len(ids) - MAX_IDS_IN_WARNING
    return shown + (f", … and {more} more" if more > 0 else "")


def _new_memmap(path: Path, shape: tuple[int, int, int]) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)


def _temp_npy(out_npy: Path) -> Path:
    """A fresh hidden name beside the output (same filesystem, so os.replace is atomic)."""
    return out_npy.with_name(f".{out_npy.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}.npy")


def prepare_cxr(
    con: duckdb.DuckDBPyConnection,
    cxr_root: str | Path,
    out_npy: Path,
    *,
    image_size: int = 256,
    lookback_hours: float = 0.0,
    prediction_hours: float = 48.0,
    threads: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
) -> CxrResult:
    """Link cohort stays to their last pre-prediction AP/PA image and write the uint8 [M, S, S] cache.

    `columns` (N rows, cohort row_idx order): has_cxr bool, cxr_dicom_id str|None, cxr_time timestamp|NaT,
    cxr_hours float (hours from intime, NaN if none), cxr_view 'AP'|'PA'|None, cxr_index int32 (row in the
    cache, 0..M-1 in row order; -1 if none). `on_progress(done, total)` is called as stays are decoded.
    """
    _check_options(image_size, lookback_hours, prediction_hours, threads)
    _check_cohort(con)
    root = Path(cxr_root)
    out_npy = Path(out_npy)
    meta_path = register_cxr_metadata(con, root)
    n_meta, n_bad_time, n_appa = con.execute(f"""
        SELECT count(*), count(*) FILTER (WHERE study_time IS NULL),
               count(*) FILTER (WHERE study_time IS NOT NULL AND view_position IN
                                ({", ".join(_sql_str(v) for v in VIEWS)}))
        FROM cxr_metadata""").fetchone()
    cohort = con.execute("SELECT row_idx, intime FROM cohort ORDER BY row_idx").df()
    n = len(cohort)
    if not np.array_equal(cohort["row_idx"].to_numpy(), np.arange(n)):
        raise ValueError("table `cohort`: row_idx must be 0..N-1")
    cand = link_candidates(con, lookback_hours=lookback_hours, prediction_hours=prediction_hours)

    per_stay: list[tuple[int, list[Candidate]]] = []
    for row_idx, g in cand.groupby("row_idx", sort=True):
        per_stay.append(
            (
                int(row_idx),
                [
                    Candidate(d, image_path(root, s, st, d), pd.Timestamp(t), v)
                    for d, s, st, t, v in zip(
                        g["dicom_id"],
                        g["subject_id"],
                        g["study_id"],
                        g["study_time"],
                        g["view_position"],
                        strict=True,
                    )
                ],
            )
        )

    chosen: dict[int, Candidate] = {}
    index = np.full(n, -1, dtype=np.int32)
    missing: list[str] = []
    corrupt: list[tuple[str, str]] = []
    fallback_stays = 0
    out_npy.parent.mkdir(parents=True, exist_ok=True)
    k_slots = len(per_stay)
    tmp = _temp_npy(out_npy)
    tmp2: Path | None = None
    t0 = time.perf_counter()
    try:
        cache = _new_memmap(tmp, (k_slots, image_size, image_size))
        m = 0
        window = max(4, 8 * threads)  # bounded look-ahead: decoded images wait in memory only this many deep
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cxr-decode") as pool:
            pending: deque[tuple[int, list[Candidate], Future]] = deque()
            todo = iter(per_stay)
            try:
                for done in range(k_slots):
                    while len(pending) < window and (nxt := next(todo, None)) is not None:
                        pending.append((*nxt, pool.submit(_decode_first_readable, nxt[1], image_size)))
                    row_idx, cands, fut = pending.popleft()
                    pos, pixels, miss, bad = fut.result()
                    missing += miss
                    corrupt += bad
                    if pixels is not None:
                        cache[m] = pixels
                        index[row_idx] = m
                        chosen[row_idx] = cands[pos]
                        fallback_stays += pos > 0
                        m += 1
                    if on_progress is not None:
                        on_progress(done + 1, k_slots)
            finally:
                for *_, fut in pending:
                    fut.cancel()
        cache.flush()
        del cache
        if (
            m < k_slots
        ):  # some stays lost every candidate to bad files: copy the first m rows to an exact-size file
            tmp2 = _temp_npy(out_npy)
            src = np.load(tmp, mmap_mode="r")
            dst = _new_memmap(tmp2, (m, image_size, image_size))
            for a in range(0, m, 1024):
                b = min(a + 1024, m)
                dst[a:b] = src[a:b]
            dst.flush()
            del dst, src
            os.replace(tmp2, tmp)
            tmp2 = None
        os.replace(tmp, out_npy)
    except BaseException:
        for p in (tmp, tmp2):
            if p is not None:
                p.unlink(missing_ok=True)
        raise
    decode_seconds = time.perf_counter() - t0

    has = index >= 0
    times = pd.Series([chosen[i].time if i in chosen else pd.NaT for i in range(n)], dtype="datetime64[us]")
    intime = cohort["intime"].astype("datetime64[us]")
    columns = pd.DataFrame(
        {
            "has_cxr": has,
            "cxr_dicom_id": pd.Series(
                [chosen[i].dicom_id if i in chosen else None for i in range(n)], dtype=object
            ),
            "cxr_time": times,
            "cxr_hours": ((times - intime) / pd.Timedelta(hours=1)).astype("float64"),
            "cxr_view": pd.Series([chosen[i].view if i in chosen else None for i in range(n)], dtype=object),
            "cxr_index": index,
        }
    )

    warnings: list[str] = []
    if n_bad_time:
        warnings.append(
            f"{meta_path}: {n_bad_time} of {n_meta} rows have no valid StudyDate/StudyTime and were ignored"
        )
    if missing:
        warnings.append(
            f"MIMIC-CXR-JPG: {len(missing)} linked image file(s) missing under {root / 'files'} "
            f"(dicom_id {_list_ids(missing)}); skipped, the stay fell back to its next-latest "
            f"eligible image or to none"
        )
    if corrupt:
        kinds = sorted({k for _, k in corrupt})
        warnings.append(
            f"MIMIC-CXR-JPG: {len(corrupt)} linked image file(s) unreadable ({', '.join(kinds)}) "
            f"(dicom_id {_list_ids([d for d, _ in corrupt])}); skipped, the stay fell back to its "
            f"next-latest eligible image or to none"
        )
    stats = {
        "metadata_file": str(meta_path),
        "metadata_rows": int(n_meta),
        "metadata_rows_invalid_time": int(n_bad_time),
        "ap_pa_rows": int(n_appa),
        "candidates_in_window": len(cand),
        "stays": n,
        "stays_with_candidate": k_slots,
        "stays_with_image": int(has.sum()),
        "stays_fallback": int(fallback_stays),
        "missing_files": len(missing),
        "corrupt_files": len(corrupt),
        "image_size": int(image_size),
        "lookback_hours": float(lookback_hours),
        "prediction_hours": float(prediction_hours),
        "threads": int(threads),
        "decode_seconds": round(decode_seconds, 3),
    }
    return CxrResult(columns=columns, stats=stats, warnings=warnings)
