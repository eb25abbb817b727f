"""`carebench prepare`: raw MIMIC-IV (+ MIMIC-CXR-JPG) -> processed dataset, one stage after another.

Stages (each a function of one DuckDB connection; see the modules named):
  tables      find, validate and expose the raw files as views           (tables.register_tables)
  cohort      stays, demographics, mortality and LOS labels               (cohort.build_cohort)
  folds       patient-disjoint folds stratified by in-ICU death           (splits.assign_folds)
  phenotypes  25 phenotype labels from the admission's ICD codes          (phenotypes.phenotype_labels)
  timeseries  float32 [N, 48, F] hourly grid                              (timeseries.extract_timeseries)
  cxr         last AP/PA image before the prediction time + image cache   (cxr.prepare_cxr, with --mimic-cxr)
  write       through the one validated writer (store.DatasetWriter): cohort.parquet, ehr.npy, manifest.json

The dataset declares what the rest of carebench reads (`MIMIC_TASKS`, `MIMIC_FAIRNESS`): the three tasks and the
cohort columns holding their labels, the fairness attributes and their columns. Every other column (hadm_id,
times, race, ...) is kept for the producer's own use.

Everything is written into the writer's temporary directory next to the output and renamed into place only when
complete, DuckDB spills into that temporary directory, and any failure removes it: a failed run leaves nothing
behind. The manifest records what went in (paths, sizes, hashes), every option, the cohort counts, per-stage
timings and the peak memory (docs/cohort.md, "Manifest").
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import platform
import re
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from carebench import __version__, atomic
from carebench.data import store
from carebench.data.definitions import load_features, load_phenotypes
from carebench.data.mimic import quality
from carebench.data.mimic.cohort import CohortError, build_cohort, step_rules
from carebench.data.mimic.cohort import exclusions as cohort_exclusions
from carebench.data.mimic.cxr import prepare_cxr
from carebench.data.mimic.options import PREPARE
from carebench.data.mimic.phenotypes import phenotype_labels
from carebench.data.mimic.splits import assign_folds
from carebench.data.mimic.tables import (
    RawDataError,
    check_itemids,
    check_required_rows,
    describe_release,
    empty_tables,
    register_tables,
)
from carebench.data.mimic.timeseries import extract_timeseries
from carebench.errors import UserError

MIN_AGE = 18
MIN_LOS_HOURS = 48.0
N_FOLDS = 5
_MEMORY_LIMIT = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_CXR_COLUMNS = ("has_cxr", "cxr_dicom_id", "cxr_time", "cxr_hours", "cxr_view", "cxr_index")
# The columns of the MIMIC cohort.parquet, in order (then the 25 phenotype columns of load_phenotypes()).
COHORT_COLUMNS = (
    "stay_id",
    "subject_id",
    "hadm_id",
    "intime",
    "outtime",
    "los_days",
    "age",
    "gender",
    "race",
    "race_group",
    "admission_type",
    "insurance",
    "fold",
    "label_mortality",
    "label_los",
    *_CXR_COLUMNS,
)
# Fairness attributes of the MIMIC dataset (docs/fairness.md): age in left-closed bands, the others as they are.
MIMIC_FAIRNESS: dict[str, dict[str, Any]] = {
    "age_band": {"column": "age", "bins": [0, 40, 60, 80], "labels": ["0-40", "40-60", "60-80", "80+"]},
    "gender": {"column": "gender"},
    "race_group": {"column": "race_group"},
    "admission_type": {"column": "admission_type"},
    "insurance": {"column": "insurance"},
}
MIMIC_INTERSECTIONS = (
    ("race_group", "gender"),
    ("age_band", "race_group"),
    ("age_band", "gender"),
    ("race_group", "insurance"),
)


def mimic_tasks() -> dict[str, dict[str, Any]]:
    """The tasks of the MIMIC dataset and the cohort columns holding their labels (in the order reports list them)."""
    phenotypes = load_phenotypes()
    return {
        "mortality": {"labels": ["label_mortality"]},
        "phenotype": {"labels": [p.column for p in phenotypes], "label_names": [p.name for p in phenotypes]},
        "los": {"labels": ["label_los"]},
    }


class OptionError(UserError, ValueError):
    """A `prepare` option has an invalid value; the message names the option and what was expected."""


def _check_options(
    mimic_iv: Path,
    out: Path,
    mimic_cxr: Path | None,
    image_size: int,
    threads: int,
    memory_limit: str,
    cxr_lookback_hours: float,
    overwrite: bool,
) -> None:
    """Fail before anything is created, with the option's name in the message."""
    if mimic_iv.exists() and not mimic_iv.is_dir():
        raise OptionError(
            f"--mimic-iv {mimic_iv}: not a directory (expected the MIMIC-IV root with hosp/ and icu/)"
        )
    if not mimic_iv.exists():
        raise OptionError(
            f"--mimic-iv {mimic_iv}: path does not exist (expected the MIMIC-IV root with hosp/ and icu/)"
        )
    if mimic_cxr is not None and not mimic_cxr.exists():
        raise OptionError(
            f"--mimic-cxr {mimic_cxr}: path does not exist (expected the MIMIC-CXR-JPG root with "
            f"the metadata csv and files/)"
        )
    if not isinstance(image_size, int) or image_size < 8:
        raise OptionError(f"--image-size {image_size}: expected a number of pixels >= 8 (e.g. 256)")
    if not isinstance(threads, int) or threads < 1:
        raise OptionError(f"--threads {threads}: expected a positive integer")
    if not _MEMORY_LIMIT.match(str(memory_limit)):
        raise OptionError(f"--memory-limit {memory_limit!r}: expected a size such as 8GB, 512MB or 2GiB")
    if not math.isfinite(cxr_lookback_hours) or cxr_lookback_hours < 0:
        raise OptionError(f"--cxr-lookback-hours {cxr_lookback_hours}: expected a number of hours >= 0")
    if out.exists():
        if not overwrite:
            raise OptionError(f"--out {out}: already exists (pass --overwrite to replace it)")
        if not out.is_dir():
            raise OptionError(f"--out {out}: exists and is not a directory (expected a dataset directory)")
        if any(out.iterdir()) and not (out / store.MANIFEST).is_file():
            raise OptionError(
                f"--out {out}: refusing to overwrite a non-empty directory that is not a carebench "
                f"dataset (no {store.MANIFEST})"
            )
    _check_out_parent(out)
    resolved_out = out.resolve()
    for name, src in (("--mimic-iv", mimic_iv), ("--mimic-cxr", mimic_cxr)):
        if src is not None and (resolved_out == src.resolve() or resolved_out in src.resolve().parents):
            raise OptionError(f"--out {out}: must not be or contain the input {name} {src}")


def _check_out_parent(out: Path) -> None:
    """--out must be creatable: its nearest existing ancestor is a directory this process may write in."""
    anc = next(p for p in out.parents if p.exists() or p == p.parent)
    if not anc.is_dir():
        raise OptionError(f"--out {out}: {anc} is a file, not a directory (expected a directory path)")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OptionError(
            f"--out {out}: cannot create it: no permission to write in {anc} (expected a writable location)"
        )


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _raw_read_error(e: duckdb.Error, option: str, root: Path) -> RawDataError:
    """One line from a DuckDB error raised while scanning raw files (it names the file; we keep that)."""
    msg = str(e)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    detail = next((ln for ln in lines if ln.startswith("Error when converting column")), None)
    if detail:
        text = f"{text}: {detail}"
    m = re.search(r"^\s*file = (.+)$", msg, re.MULTILINE)
    if m and m.group(1).strip() not in text:
        text = f"{m.group(1).strip()}: {text}"
    expected = "complete files whose values have the MIMIC-IV types"
    if "to 'TIMESTAMP'" in text:
        expected = (
            "times written YYYY-MM-DD HH:MM:SS as MIMIC-IV distributes them; a spreadsheet that re-saved the "
            "file may have re-formatted them"
        )
    return RawDataError(f"reading the raw tables under {option} {root} failed: {text} (expected {expected})")


def _empty_cxr_columns(n: int) -> pd.DataFrame:
    """The X-ray columns of a dataset prepared without --mimic-cxr: no stay has an image (and no cxr.npy)."""
    return pd.DataFrame(
        {
            "has_cxr": np.zeros(n, dtype=bool),
            "cxr_dicom_id": pd.Series([None] * n, dtype=object),
            "cxr_time": pd.Series(pd.NaT, index=range(n), dtype="datetime64[us]"),
            "cxr_hours": np.full(n, np.nan, dtype=np.float64),
            "cxr_view": pd.Series([None] * n, dtype=object),
            "cxr_index": np.full(n, -1, dtype=np.int32),
        }
    )


class _Stages:
    """Runs named stages and records their wall time. On a terminal a live Rich progress display shows the
    running stage; elsewhere (logs, batch jobs) one plain line is printed as each stage finishes."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.live,
        )
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, label: str) -> Iterator[dict[str, str]]:
        task = self.progress.add_task(label, total=1)
        note: dict[str, str] = {}
        t0 = time.perf_counter()
        yield note
        self.timings[name] = round(time.perf_counter() - t0, 3)
        detail = f": {note['detail']}" if "detail" in note else ""
        self.progress.update(task, completed=1, description=f"{label}[dim]{detail}[/]")
        if not self.live:
            self.console.print(f"{label}{detail} ({self.timings[name]:.1f} s)", highlight=False, markup=False)


def prepare(
    mimic_iv: str | Path,
    out: str | Path,
    *,
    mimic_cxr: str | Path | None = None,
    image_size: int = PREPARE.image_size,
    threads: int = PREPARE.threads,
    memory_limit: str = PREPARE.memory_limit,
    cxr_lookback_hours: float = PREPARE.cxr_lookback_hours,
    seed: int = PREPARE.seed,
    overwrite: bool = False,
    allow_empty_features: bool = False,
    console: Console | None = None,
) -> Path:
    """Build the processed dataset at `out` from the raw MIMIC-IV root (and MIMIC-CXR-JPG root, if given).

    A feature group that ends up with no value for any stay (`quality.empty_groups`: an event table with no rows
    or none of its itemids, or X-rays that link to no stay) is an error, unless `allow_empty_features`, which
    records it as a warning (printed, and in the manifest)."""
    t_start = time.perf_counter()
    mimic_iv = Path(os.path.abspath(mimic_iv))
    out = Path(os.path.abspath(out))
    mimic_cxr = Path(os.path.abspath(mimic_cxr)) if mimic_cxr is not None else None
    _check_options(mimic_iv, out, mimic_cxr, image_size, threads, memory_limit, cxr_lookback_hours, overwrite)
    features = load_features()
    phenotypes = load_phenotypes()
    console = console or Console(stderr=True)
    warnings: list[str] = []

    stage = _Stages(console)
    cleaned = atomic.clean_stale(out)
    if cleaned:
        console.print(
            f"removed {len(cleaned)} temporary folder(s) of {out} left by an interrupted earlier prepare",
            highlight=False,
        )
    with stage.progress, store.DatasetWriter(out, overwrite=overwrite) as writer:
        tmp = writer.path
        spill = tmp / ".duckdb-tmp"
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"SET threads = {int(threads)}")
            con.execute(f"SET memory_limit = '{memory_limit}'")
            con.execute(f"SET temp_directory = '{str(spill).replace(chr(39), chr(39) * 2)}'")
            con.execute("SET enable_progress_bar = false")
            con.execute("SET preserve_insertion_order = true")

            try:
                with stage("tables", "Validating raw MIMIC-IV tables") as note:
                    tables = register_tables(con, mimic_iv)
                    labels = {name: t.label for name, t in tables.items()}
                    sources = {
                        name: {"table": t.label, "format": t.format, **store.file_record(t.path)}
                        for name, t in tables.items()
                    }
                    empty = empty_tables(con, tables)
                    check_required_rows(tables, empty)
                    release = describe_release(mimic_iv, tables)
                    release["item_check"] = check_itemids(
                        mimic_iv,
                        {f.name: {k: list(v) for k, v in f.itemids.items()} for f in features.features},
                    )
                    for feat, per_source in release["item_check"]["missing"].items():
                        used = next(f for f in features.features if f.name == feat).itemids
                        if any(len(ids) < len(used[src]) for src, ids in per_source.items()):
                            continue  # some of its itemids are defined: recorded in the manifest only
                        warnings.append(
                            f"feature {feat}: none of its itemids {per_source} is in this release's item "
                            f"dictionary ({', '.join(sorted({v for v in release['item_check']['dictionaries'].values() if v}))}); "
                            "renumbered or dropped by the release?"
                        )
                    warnings.extend(f"MIMIC-IV release: {n_}" for n_ in release["notes"])
                    note["detail"] = (
                        f"{len(tables)} tables, release {release['release']}, {release['layout']}"
                    )
                with stage("cohort", "Building the cohort") as note:
                    steps = build_cohort(con, min_age=MIN_AGE, min_los_hours=MIN_LOS_HOURS, labels=labels)
                    excluded = cohort_exclusions(con)
                    cohort = con.execute("SELECT * FROM cohort ORDER BY row_idx").df()
                    n = len(cohort)
                    note["detail"] = f"{n} stays"
                with stage("folds", "Assigning patient-disjoint folds") as note:
                    if cohort["subject_id"].nunique() < N_FOLDS:
                        raise CohortError(
                            f"the cohort has {cohort['subject_id'].nunique()} patients; at least "
                            f"{N_FOLDS} are needed for {N_FOLDS} patient-disjoint folds"
                        )
                    died = cohort.groupby("subject_id")["label_mortality"].transform("max")
                    cohort["fold"] = assign_folds(cohort["subject_id"], seed, N_FOLDS, strata=died)
                    note["detail"] = f"seed {seed}"
                with stage("phenotypes", "Phenotype labels from ICD codes") as note:
                    pheno, pheno_stats = phenotype_labels(con)
                    if n and pheno_stats.get("stays_without_diagnoses") == n:
                        raise RawDataError(
                            f"{tables['diagnoses_icd'].path}: none of the {n} cohort stays' admissions has a "
                            "diagnosis row, so every phenotype label would be 0 (expected the diagnoses of the "
                            "same MIMIC-IV release as icu/icustays; is the file complete?)"
                        )
                    note["detail"] = f"{len(pheno.columns)} phenotypes"
                with stage(
                    "timeseries", f"EHR time series ({features.hours} h x {len(features.names)})"
                ) as note:
                    ts = extract_timeseries(con, features, set(tables))
                    note["detail"] = f"{int((~np.isnan(ts.values)).sum()):,} observed cells"
                empty_group_messages = quality.empty_groups(ts, features, empty, labels, n)
                if empty_group_messages and not allow_empty_features:
                    raise RawDataError(
                        f"{empty_group_messages[0]}. Expected MIMIC-IV events for the cohort's stays; pass "
                        "--allow-empty-features to build the dataset with these features all missing"
                    )
                warnings.extend(f"EMPTY FEATURE GROUP: {m}" for m in empty_group_messages)
                warnings.extend(quality.empty_features(ts, features))
            except duckdb.OutOfMemoryException as e:
                raise OptionError(
                    f"--memory-limit {memory_limit}: DuckDB ran out of memory "
                    f"({str(e).splitlines()[0]}); expected a larger limit or fewer --threads"
                ) from e
            except duckdb.Error as e:
                if "No space left on device" in str(e):
                    raise atomic.write_failure(
                        OSError(errno.ENOSPC, "No space left on device (DuckDB spill)"), out, out.exists()
                    ) from None
                raise _raw_read_error(e, "--mimic-iv", mimic_iv) from e

            cxr_stats: dict[str, Any] | None = None
            if mimic_cxr is not None:
                with stage("cxr", f"Chest X-rays: linkage and {image_size}px cache") as note:
                    res = prepare_cxr(
                        con,
                        mimic_cxr,
                        tmp / store.CXR,
                        image_size=image_size,
                        lookback_hours=cxr_lookback_hours,
                        prediction_hours=float(features.hours),
                        threads=threads,
                    )
                    cxr_cols = res.columns.reset_index(drop=True)
                    cxr_stats = res.stats
                    warnings.extend(res.warnings)
                    note["detail"] = f"{int(cxr_cols['has_cxr'].sum())} stays with an image"
                if n and not cxr_cols["has_cxr"].any():
                    message = (
                        f"--mimic-cxr {mimic_cxr}: feature group 'chest X-rays' is empty: none of the {n} cohort "
                        f"stays has a readable AP/PA image in its window ({cxr_stats['metadata_rows']} metadata "
                        f"rows, {cxr_stats['ap_pa_rows']} AP/PA, {cxr_stats['candidates_in_window']} in a stay's "
                        f"window, {cxr_stats['missing_files']} files missing, {cxr_stats['corrupt_files']} "
                        "unreadable)"
                    )
                    if not allow_empty_features:
                        raise RawDataError(
                            f"{message}. Expected MIMIC-CXR-JPG of the same patients; pass "
                            "--allow-empty-features to build the dataset without images"
                        )
                    warnings.append(f"EMPTY FEATURE GROUP: {message}")
            else:
                cxr_cols = _empty_cxr_columns(n)

            with stage("write", "Writing the dataset") as note:
                if ts.values.shape != (n, features.hours, len(features.names)):
                    raise RuntimeError(
                        f"timeseries stage returned shape {ts.values.shape}, expected "
                        f"{(n, features.hours, len(features.names))}"
                    )
                pheno_cols = [p.column for p in phenotypes]
                if list(pheno.columns) != pheno_cols or len(pheno) != n:
                    raise RuntimeError("phenotype stage returned columns/rows that do not match the cohort")
                if len(cxr_cols) != n or list(cxr_cols.columns) != list(_CXR_COLUMNS):
                    raise RuntimeError("cxr stage returned columns/rows that do not match the cohort")
                frame = pd.concat(
                    [cohort.drop(columns=["row_idx"]), pheno.reset_index(drop=True), cxr_cols], axis=1
                )
                frame = frame[list(COHORT_COLUMNS) + pheno_cols]
                images = None
                if (tmp / store.CXR).is_file():
                    images = np.load(tmp / store.CXR, mmap_mode="r")  # validated in place, not copied
                    if images.shape[0] == 0:  # no stay linked to an image: a dataset without X-rays
                        del images
                        images = None
                        (tmp / store.CXR).unlink()
                frame = writer.write(
                    cohort=frame,
                    ehr=ts.values,
                    features=features.names,
                    tasks=mimic_tasks(),
                    images=images,
                    fairness=MIMIC_FAIRNESS,
                    intersections=MIMIC_INTERSECTIONS,
                    step_hours=1.0,
                )
                del images
                note["detail"] = f"{n} stays"
        finally:
            con.close()
        shutil.rmtree(spill, ignore_errors=True)

        rules = step_rules(MIN_AGE, MIN_LOS_HOURS)
        stage.timings["total"] = round(time.perf_counter() - t_start, 3)
        options = {
            "mimic_iv": str(mimic_iv),
            "mimic_cxr": str(mimic_cxr) if mimic_cxr else None,
            "out": str(out),
            "image_size": image_size,
            "threads": threads,
            "memory_limit": memory_limit,
            "cxr_lookback_hours": cxr_lookback_hours,
            "seed": seed,
            "overwrite": overwrite,
            "allow_empty_features": allow_empty_features,
            "min_age": MIN_AGE,
            "min_los_hours": MIN_LOS_HOURS,
            "n_folds": N_FOLDS,
            "hours": features.hours,
            "features_file": features.source,
        }
        writer.finish(
            producer={"name": "mimic", "version": __version__, "options": options},
            extra_manifest={
                "software": {
                    "python": platform.python_version(),
                    "duckdb": duckdb.__version__,
                    "numpy": np.__version__,
                    "pandas": pd.__version__,
                    "pyarrow": pa.__version__,
                },
                "sources": {
                    "mimic_iv": sources,
                    "mimic_cxr": (
                        {
                            "root": str(mimic_cxr),
                            "metadata": store.file_record(Path(cxr_stats["metadata_file"])),
                        }
                        if mimic_cxr and cxr_stats
                        else None
                    ),
                    "hash_rule": store.HASH_RULE,
                },
                "release": release,
                "cohort_steps": [{"step": k, "rule": rules[k], "stays": v} for k, v in steps.items()],
                "data_issues": quality.data_issues(excluded, ts, features, labels, pheno_stats, cxr_stats),
                "admissions": int(frame["hadm_id"].nunique()),
                "deaths_per_fold": {
                    str(k): int(v) for k, v in frame.groupby("fold")["label_mortality"].sum().items()
                },
                "feature_units": {f.name: f.unit for f in features.features},
                "feature_stats": ts.stats,
                "feature_row_issues": ts.row_issues,
                "source_stats": ts.sources,
                "phenotype_stats": pheno_stats,
                "cxr": cxr_stats,
                "timings_s": stage.timings,
                "peak_rss_mib": _peak_rss_mib(),
                "warnings": warnings,
            },
        )
    for w in warnings:
        console.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    return out
