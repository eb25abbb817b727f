"""Find and validate a MEDS dataset on disk and expose its events to DuckDB.

Layout (the MEDS standard, checked with the `meds` package's own schemas):

    ROOT/data/**/*.parquet              events: subject_id int64, time timestamp[us] (null = static), code string,
                                        numeric_value float32 (optional column), extra columns allowed
    ROOT/metadata/dataset.json          optional: dataset name/version, ETL, MEDS version (recorded)
    ROOT/metadata/subject_splits.parquet optional: subject_id int64, split string (train / tuning / held_out)
    ROOT/metadata/codes.parquet         optional: code descriptions (schema checked, recorded)

The standard also requires that all events of a subject are in one file, contiguous, and sorted by time;
`check_events` verifies both (static events, without a time, may stand anywhere in the subject's run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import meds
import pyarrow as pa
import pyarrow.parquet as pq

from carebench.errors import UserError

MAX_LISTED = 5


class MedsInputError(UserError, ValueError):
    """MEDS input is missing or malformed; the message names the file, the column and what was expected."""


@dataclass(frozen=True)
class MedsSource:
    root: Path
    shards: tuple[Path, ...]
    has_numeric_value: bool  # False when no shard has the (optional) numeric_value column
    dataset_metadata: dict[str, Any] | None
    dataset_metadata_path: Path | None
    splits_path: Path | None
    codes_path: Path | None


def sql_str(s: str | Path) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def sql_list(paths: tuple[Path, ...] | list[Path]) -> str:
    return "[" + ", ".join(sql_str(p) for p in paths) + "]"


def read_parquet_schema(path: Path, what: str) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
        raise MedsInputError(
            f"{path}: cannot be read as Parquet ({type(e).__name__}: {e}); expected {what}"
        ) from e


def schema_problem(path: Path, schema: pa.Schema, meds_schema: Any, what: str) -> None:
    """Raise one MedsInputError naming the file and every missing, extra or mistyped column, using the `meds`
    schema class (DataSchema, LabelSchema, ...) as the reference."""
    try:
        meds_schema.validate(schema)
    except Exception as e:
        missing = list(getattr(e, "missing_req_cols", None) or [])
        extra = list(getattr(e, "disallowed_extra_cols", None) or [])
        mistyped = list(getattr(e, "mistyped_cols", None) or [])
        parts = []
        if missing:
            parts.append("missing required column " + ", ".join(f"'{c}'" for c in missing))
        if mistyped:
            parts.append(
                ", ".join(f"column '{c}' has type {got}, expected {want}" for c, want, got in mistyped)
            )
        if extra:
            parts.append("unexpected column " + ", ".join(f"'{c}'" for c in extra))
        detail = "; ".join(parts) or str(e)
        raise MedsInputError(
            f"{path}: {detail} (expected {what}: columns {', '.join(_describe(meds_schema))})"
        ) from e


def _describe(meds_schema: Any) -> list[str]:
    req = set(meds_schema.required_columns())
    return [
        f"{c} {meds_schema.schema().field(c).type}{'' if c in req else ' (optional)'}"
        for c in meds_schema.columns()
    ]


def open_source(root: str | Path) -> MedsSource:
    """Locate and schema-check every file of a MEDS root (no event is read yet)."""
    root = Path(root)
    if not root.is_dir():
        what = "path does not exist" if not root.exists() else "not a directory"
        raise MedsInputError(f"--meds {root}: {what} (expected a MEDS root holding data/ and metadata/)")
    data_dir = root / meds.data_subdirectory
    if not data_dir.is_dir():
        raise MedsInputError(
            f"--meds {root}: no {meds.data_subdirectory}/ directory (expected data/**/*.parquet)"
        )
    shards = tuple(sorted(p for p in data_dir.rglob("*.parquet") if p.is_file()))
    if not shards:
        raise MedsInputError(
            f"{data_dir}: no .parquet files (expected the MEDS event shards data/**/*.parquet)"
        )
    numeric = False
    for shard in shards:
        schema = read_parquet_schema(shard, "a MEDS data shard")
        schema_problem(shard, schema, meds.DataSchema, "a MEDS data shard")
        numeric = numeric or "numeric_value" in schema.names

    meta_path = root / meds.dataset_metadata_filepath
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise MedsInputError(
                f"{meta_path}: not valid JSON ({e}); expected the MEDS dataset metadata"
            ) from e
        if not isinstance(meta, dict):
            raise MedsInputError(f"{meta_path}: expected a JSON object (the MEDS dataset metadata)")
        try:
            meds.DatasetMetadataSchema.validate(meta)
        except Exception as e:
            raise MedsInputError(f"{meta_path}: does not follow the MEDS DatasetMetadataSchema ({e})") from e

    splits_path = root / meds.subject_splits_filepath
    if splits_path.is_file():
        schema = read_parquet_schema(splits_path, "the MEDS subject splits")
        schema_problem(splits_path, schema, meds.SubjectSplitSchema, "the MEDS subject splits")
    else:
        splits_path = None
    codes_path = root / meds.code_metadata_filepath
    if codes_path.is_file():
        schema = read_parquet_schema(codes_path, "the MEDS code metadata")
        schema_problem(codes_path, schema, meds.CodeMetadataSchema, "the MEDS code metadata")
    else:
        codes_path = None
    return MedsSource(
        root=root,
        shards=shards,
        has_numeric_value=numeric,
        dataset_metadata=meta,
        dataset_metadata_path=meta_path if meta is not None else None,
        splits_path=splits_path,
        codes_path=codes_path,
    )


def register_events(con: duckdb.DuckDBPyConnection, source: MedsSource) -> None:
    """View `events(subject_id, time, code, numeric_value, filename, row_in_file)` over every shard (only these
    columns are read; a shard without numeric_value gives NULLs)."""
    value = "CAST(numeric_value AS FLOAT)" if source.has_numeric_value else "CAST(NULL AS FLOAT)"
    con.execute(f"""
        CREATE OR REPLACE VIEW events AS
        SELECT subject_id, time, code, {value} AS numeric_value, filename, file_row_number AS row_in_file
        FROM read_parquet({sql_list(source.shards)}, union_by_name = true, filename = true,
                          file_row_number = true)""")


def _rel(source: MedsSource, filename: str) -> str:
    try:
        return str(Path(filename).relative_to(source.root))
    except ValueError:
        return filename


def check_events(con: duckdb.DuckDBPyConnection, source: MedsSource) -> dict[str, int]:
    """Nulls where MEDS forbids them, time order within each subject, one file per subject. Returns counts."""
    rows, subjects, null_subject, null_code, static, numeric = con.execute("""
        SELECT count(*), count(DISTINCT subject_id), count(*) - count(subject_id), count(*) - count(code),
               count(*) - count(time), count(numeric_value)
        FROM events""").fetchone()
    for col, n in (("subject_id", null_subject), ("code", null_code)):
        if n:
            fn = con.execute(f"SELECT filename FROM events WHERE {col} IS NULL LIMIT 1").fetchone()[0]
            raise MedsInputError(
                f"{fn}: column '{col}' has {n} null value(s) in the data shards (MEDS requires every event "
                f"to have a {col})"
            )
    if rows == 0:
        raise MedsInputError(f"{source.root / meds.data_subdirectory}: the data shards hold no events")
    split = con.execute("""
        SELECT subject_id, list(DISTINCT filename ORDER BY filename) FROM events
        GROUP BY subject_id HAVING count(DISTINCT filename) > 1 ORDER BY subject_id LIMIT 1""").fetchone()
    if split:
        files = ", ".join(_rel(source, f) for f in split[1][:3])
        raise MedsInputError(
            f"{source.root / meds.data_subdirectory}: column 'subject_id': subject {split[0]} has events in "
            f"several files ({files}); MEDS requires all events of a subject in one file"
        )
    runs = con.execute("""
        WITH r AS (
          SELECT filename, row_in_file, subject_id,
                 lag(subject_id) OVER (PARTITION BY filename ORDER BY row_in_file) AS prev
          FROM events)
        SELECT filename, subject_id, count(*) FROM r WHERE prev IS DISTINCT FROM subject_id
        GROUP BY filename, subject_id HAVING count(*) > 1 ORDER BY filename, subject_id LIMIT 1""").fetchone()
    if runs:
        raise MedsInputError(
            f"{runs[0]}: column 'subject_id': the events of subject {runs[1]} are not contiguous "
            f"({runs[2]} separate runs); MEDS requires each subject's events together, sorted by time"
        )
    bad = con.execute("""
        WITH r AS (
          SELECT filename, row_in_file, subject_id, time,
                 lag(subject_id) OVER w AS prev_subject, lag(time) OVER w AS prev_time
          FROM events WHERE time IS NOT NULL
          WINDOW w AS (PARTITION BY filename ORDER BY row_in_file))
        SELECT filename, row_in_file, subject_id, prev_time, time FROM r
        WHERE prev_subject = subject_id AND prev_time > time
        ORDER BY filename, row_in_file LIMIT 1""").fetchone()
    if bad:
        raise MedsInputError(
            f"{bad[0]}: column 'time' is not sorted within subject {bad[2]}: row {bad[1]} has {bad[4]} after "
            f"{bad[3]} (MEDS requires each subject's events sorted by time)"
        )
    return {
        "events": int(rows),
        "subjects": int(subjects),
        "static_events": int(static),
        "numeric_events": int(numeric),
        "shards": len(source.shards),
    }
