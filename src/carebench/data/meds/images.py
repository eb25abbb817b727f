"""The X-ray of each row: the image table (`--images`) and the uint8 cache.

The table (.parquet or .csv) has one row per image: `subject_id` (integer), `time` (timestamp; in a CSV,
ISO text such as 2180-07-23 14:00:00) and `path` (the image file; a relative path is taken from the table's own
directory). Every listed file must exist (checked before any decoding; the error names the table, the column
and the first missing files).

Rule: a row's image is the subject's LAST image with time in (prediction_time - lookback, prediction_time]
(ties: the larger path), so nothing taken after the prediction time is used; the default look-back is the EHR
window (`hours`). The chosen files are decoded with the same geometry as the MIMIC-CXR cache (data/images.py:
grayscale, shorter side to --image-size, centre crop) into a cache with one image per row that has one, in row
order. `cxr_hours` is the image time in hours from the window start (prediction_time - hours), as the MIMIC
producer counts it from the start of its window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from carebench.data.images import ImageDecodeError, write_image_cache
from carebench.data.meds.source import MAX_LISTED, MedsInputError, read_parquet_schema, sql_str

REQUIRED = {"subject_id": "integer", "time": "timestamp", "path": "string"}
_US_PER_HOUR = 3_600_000_000


@dataclass
class ImageLinks:
    columns: pd.DataFrame  # n rows: has_cxr, cxr_index, cxr_time, cxr_hours, cxr_path
    paths: list[Path]  # the files to decode, in cache order
    stats: dict


def _reader(path: Path) -> str:
    if path.name.endswith(".parquet"):
        return f"read_parquet({sql_str(path)})"
    if path.name.endswith((".csv", ".csv.gz")):
        return (
            f"read_csv({sql_str(path)}, header = true, auto_detect = true, "
            f"types = {{'subject_id': 'BIGINT', 'time': 'TIMESTAMP', 'path': 'VARCHAR'}})"
        )
    raise MedsInputError(f"--images {path}: expected a .parquet, .csv or .csv.gz image table")


def _check_types(path: Path) -> None:
    if not path.name.endswith(".parquet"):
        return
    schema = read_parquet_schema(path, "an image table (subject_id, time, path)")
    checks = {"subject_id": pa.types.is_integer, "time": pa.types.is_timestamp, "path": pa.types.is_string}
    for col, ok in checks.items():
        if col not in schema.names:
            raise MedsInputError(
                f"{path}: missing column '{col}' (expected an image table with subject_id, time, path)"
            )
        t = schema.field(col).type
        if not (ok(t) or (col == "path" and pa.types.is_large_string(t))):
            raise MedsInputError(f"{path}: column '{col}' has type {t}, expected a {REQUIRED[col]}")


def register_images(con: duckdb.DuckDBPyConnection, table: Path) -> dict:
    """Table `images(subject_id, time, path)` with absolute paths; checks columns, nulls and that files exist."""
    table = Path(table)
    if not table.is_file():
        raise MedsInputError(
            f"--images {table}: file not found (expected an image table subject_id, time, path)"
        )
    _check_types(table)
    try:
        cols = [d[0] for d in con.execute(f"SELECT * FROM {_reader(table)} LIMIT 0").description]
    except duckdb.Error as e:
        raise MedsInputError(f"{table}: cannot be read as an image table ({str(e).splitlines()[0]})") from e
    for col in REQUIRED:
        if col not in cols:
            raise MedsInputError(
                f"{table}: missing column '{col}' (expected an image table with subject_id, time, path)"
            )
    try:
        df = con.execute(f"SELECT subject_id, time, path FROM {_reader(table)}").df()
    except duckdb.Error as e:
        raise MedsInputError(
            f"{table}: cannot be read as an image table ({str(e).splitlines()[0]}); expected integer "
            f"subject_id, timestamp time, text path"
        ) from e
    for col in REQUIRED:
        n = int(df[col].isna().sum())
        if n:
            raise MedsInputError(f"{table}: column '{col}' has {n} empty value(s) (every image needs one)")
    base = table.absolute().parent
    paths = [p if p.is_absolute() else base / p for p in map(Path, df["path"].astype(str))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        raise MedsInputError(
            f"{table}: column 'path' names {len(missing)} file(s) that do not exist ({shown}); expected "
            f"image files (relative paths are taken from the table's directory)"
        )
    frame = pd.DataFrame(
        {
            "subject_id": df["subject_id"].astype(np.int64),
            "time": pd.to_datetime(df["time"]).astype("datetime64[us]"),
            "path": pd.Series([str(p) for p in paths], dtype=object),
        }
    )
    con.register("_images_df", frame)
    con.execute("CREATE OR REPLACE TEMP TABLE images AS SELECT * FROM _images_df")
    con.unregister("_images_df")
    return {"rows": len(frame), "subjects": int(frame["subject_id"].nunique())}


def link_images(con: duckdb.DuckDBPyConnection, n: int, hours: int, lookback_hours: float) -> ImageLinks:
    """The last image in (prediction_time - lookback, prediction_time] per row of table `rows`."""
    lb = round(lookback_hours * _US_PER_HOUR)
    cand = con.execute(
        f"""
        SELECT r.row_idx, count(*) AS candidates,
               arg_max(i.path, struct_pack(t := i.time, p := i.path)) AS path,
               max(i.time) AS time,
               (epoch_us(max(i.time)) - (epoch_us(r.prediction_time) - {hours * _US_PER_HOUR}))
                   / {float(_US_PER_HOUR)} AS hours
        FROM rows r JOIN images i ON i.subject_id = r.subject_id
        WHERE epoch_us(i.time) > epoch_us(r.prediction_time) - {lb}
          AND i.time <= r.prediction_time
        GROUP BY r.row_idx, r.prediction_time
        ORDER BY r.row_idx"""
    ).df()
    index = np.full(n, -1, dtype=np.int32)
    index[cand["row_idx"].to_numpy()] = np.arange(len(cand), dtype=np.int32)
    time = pd.Series(pd.NaT, index=range(n), dtype="datetime64[us]")
    hrs = np.full(n, np.nan)
    path = pd.Series([None] * n, dtype=object)
    if len(cand):
        rows = cand["row_idx"].to_numpy()
        time.iloc[rows] = pd.to_datetime(cand["time"]).astype("datetime64[us]").to_numpy()
        hrs[rows] = cand["hours"].to_numpy(dtype=np.float64)
        path.iloc[rows] = cand["path"].to_numpy()
    columns = pd.DataFrame(
        {"has_cxr": index >= 0, "cxr_index": index, "cxr_time": time, "cxr_hours": hrs, "cxr_path": path}
    )
    stats = {
        "lookback_hours": float(lookback_hours),
        "rows_with_image": int((index >= 0).sum()),
        "rows_with_several_candidates": int((cand["candidates"] > 1).sum()) if len(cand) else 0,
    }
    return ImageLinks(columns=columns, paths=[Path(p) for p in cand["path"]], stats=stats)


def build_cache(links: ImageLinks, out_npy: Path, size: int, threads: int, table: Path) -> None:
    """Decode the linked images into `out_npy`; an unreadable file is an error naming the table and the file."""
    try:
        write_image_cache(links.paths, out_npy, size, threads)
    except ImageDecodeError as e:
        out_npy.unlink(missing_ok=True)
        raise MedsInputError(f"{table}: column 'path': {e} (expected a readable image file)") from e
    except BaseException:
        out_npy.unlink(missing_ok=True)
        raise
