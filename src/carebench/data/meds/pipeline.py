"""`carebench prepare --meds`: MEDS data + label files (+ image table) + feature spec -> processed dataset.

Every input is read and checked before anything is written: the schemas (with the `meds` package), the time
order, the labels and their subjects, the spec against the data's codes, the image files. Only then is the dataset
written, by the one validated writer (`store.DatasetWriter`, which `carebench.data.write_dataset` wraps): the
images are decoded straight into its temporary directory, it validates and writes the rest there and renames the
directory into place. A failure at any point leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from carebench import __version__
from carebench.data import store
from carebench.data.definitions import meds_feature_spec
from carebench.data.meds import attributes as attrs_mod
from carebench.data.meds import images as images_mod
from carebench.data.meds import labels as labels_mod
from carebench.data.meds import splits as splits_mod
from carebench.data.meds import timeseries as ts_mod
from carebench.data.meds.options import MEDS
from carebench.data.meds.source import MedsInputError, check_events, open_source, register_events
from carebench.data.meds.spec import MedsSpec, load_spec

PRODUCER = "meds"
_MEMORY_LIMIT = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


def _check_options(
    root: Path,
    out: Path,
    images: Path | None,
    image_size: int,
    image_lookback_hours: float | None,
    folds: str,
    threads: int,
    memory_limit: str,
    overwrite: bool,
) -> None:
    """Fail before anything is read or created, with the option's name in the message."""
    if not root.exists():
        raise MedsInputError(f"--meds {root}: path does not exist (expected a MEDS root with data/)")
    if not isinstance(image_size, int) or image_size < 8:
        raise MedsInputError(f"--image-size {image_size}: expected a number of pixels >= 8 (e.g. 256)")
    if image_lookback_hours is not None and (
        not math.isfinite(image_lookback_hours) or image_lookback_hours <= 0
    ):
        raise MedsInputError(f"--image-lookback-hours {image_lookback_hours}: expected a number of hours > 0")
    if folds not in splits_mod.FOLD_MODES:
        raise MedsInputError(f"--folds {folds}: expected one of {', '.join(splits_mod.FOLD_MODES)}")
    if not isinstance(threads, int) or threads < 1:
        raise MedsInputError(f"--threads {threads}: expected a positive integer")
    if not _MEMORY_LIMIT.match(str(memory_limit)):
        raise MedsInputError(f"--memory-limit {memory_limit!r}: expected a size such as 8GB, 512MB or 2GiB")
    if out.exists() and not overwrite:
        raise MedsInputError(f"--out {out}: already exists (pass --overwrite to replace it)")
    resolved = out.resolve()
    for name, src in (("--meds", root), ("--images", images)):
        if src is not None and (resolved == src.resolve() or src.resolve() in resolved.parents):
            raise MedsInputError(f"--out {out}: must not be or lie inside the input {name} {src}")


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)


def _strata(labels: pd.DataFrame, tasks: list[labels_mod.LabelTask]) -> pd.Series:
    binary = next((t for t in tasks if t.kind == "binary"), None)
    if binary is None:
        return pd.Series(np.zeros(len(labels), dtype=np.int64), index=labels.index)
    return labels[binary.columns[0]].fillna(0).astype(np.int64)


def build(
    root: Path,
    *,
    labels: list[str],
    feature_spec: Path,
    images: Path | None,
    image_lookback_hours: float | None,
    folds: str,
    seed: int,
    threads: int,
    memory_limit: str,
    timer: _Timer,
    warnings: list[str],
) -> dict[str, Any]:
    """Read and check every input; return the pieces of the dataset (no image decoded, nothing written)."""
    with timer("spec"):
        spec: MedsSpec = load_spec(feature_spec)
        label_opts = labels_mod.parse_label_options(labels)
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET threads = {int(threads)}")
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute("SET enable_progress_bar = false")
        con.execute("SET preserve_insertion_order = true")
        with timer("source"):
            source = open_source(root)
            register_events(con, source)
            data_counts = check_events(con, source)
        with timer("labels"):
            frame, tasks = labels_mod.read_labels(con, label_opts)
            known = {int(s) for (s,) in con.execute("SELECT DISTINCT subject_id FROM events").fetchall()}
            labels_mod.check_subjects(frame, label_opts, known)
            n = len(frame)
            rows = pd.DataFrame(
                {
                    "row_idx": np.arange(n, dtype=np.int64),
                    "subject_id": frame["subject_id"],
                    "prediction_time": frame["prediction_time"],
                }
            )
            con.register("_rows_df", rows)
            con.execute("CREATE OR REPLACE TEMP TABLE rows AS SELECT * FROM _rows_df")
            con.unregister("_rows_df")
        with timer("folds"):
            split_frame = splits_mod.read_splits(con, source.splits_path) if source.splits_path else None
            fold, split, fold_mode = splits_mod.assign(
                frame["subject_id"],
                _strata(frame, tasks),
                mode=folds,
                splits=split_frame,
                splits_path=source.splits_path,
                seed=seed,
            )
        with timer("code_map"):
            code_map = ts_mod.map_codes(ts_mod.code_counts(con), spec)
            warnings.extend(code_map.warnings)
        with timer("timeseries"):
            grid = ts_mod.extract_grid(con, spec, code_map, n)
        with timer("attributes"):
            demo, demo_stats = attrs_mod.demographics(con, spec, n)
        lookback = float(image_lookback_hours if image_lookback_hours is not None else spec.hours)
        image_stats = None
        if images is not None:
            with timer("image_links"):
                table_stats = images_mod.register_images(con, images)
                links = images_mod.link_images(con, n, spec.hours, lookback)
                image_stats = {**table_stats, **links.stats}
        else:
            links = None
    finally:
        con.close()

    cohort = pd.DataFrame(
        {
            "stay_id": np.arange(n, dtype=np.int64),
            "subject_id": frame["subject_id"].to_numpy(np.int64),
            "prediction_time": frame["prediction_time"].to_numpy(),
            "fold": fold.to_numpy(np.int8),
        }
    )
    if split is not None:
        cohort["split"] = split.to_numpy(object)
    for col in demo.columns:
        cohort[col] = demo[col].to_numpy()
    for t in tasks:
        for c in t.columns:
            cohort[c] = frame[c].to_numpy()
    if links is not None:
        img_cols = links.columns
    else:
        img_cols = pd.DataFrame(
            {
                "has_cxr": np.zeros(n, dtype=bool),
                "cxr_index": np.full(n, -1, dtype=np.int32),
                "cxr_time": pd.Series(pd.NaT, index=range(n), dtype="datetime64[us]"),
                "cxr_hours": np.full(n, np.nan),
                "cxr_path": pd.Series([None] * n, dtype=object),
            }
        )
    for col in img_cols.columns:
        cohort[col] = img_cols[col].to_numpy()
    if demo_stats.get("age", {}).get("missing"):
        warnings.append(f"age: {demo_stats['age']['missing']} of {n} rows have no {spec.birth_code} event")
    return {
        "spec": spec,
        "source": source,
        "label_options": label_opts,
        "tasks": tasks,
        "cohort": cohort,
        "ehr": grid.values,
        "feature_stats": grid.stats,
        "code_map": code_map,
        "links": links,
        "image_stats": image_stats,
        "demographics": demo_stats,
        "data_counts": data_counts,
        "fold_mode": fold_mode,
        "lookback": lookback,
    }


def prepare_meds(
    root: str | Path,
    out: str | Path,
    *,
    labels: list[str],
    feature_spec: str | Path,
    images: str | Path | None = None,
    image_size: int = MEDS.image_size,
    image_lookback_hours: float | None = MEDS.image_lookback_hours,
    folds: str = MEDS.folds,
    seed: int = MEDS.seed,
    threads: int = MEDS.threads,
    memory_limit: str = MEDS.memory_limit,
    overwrite: bool = False,
) -> Path:
    """Build the processed dataset at `out` from a MEDS root, its label files and a feature spec."""
    t_start = time.perf_counter()
    root = Path(os.path.abspath(root))
    out = Path(os.path.abspath(out))
    images_path = Path(os.path.abspath(images)) if images is not None else None
    spec_path = Path(os.path.abspath(meds_feature_spec(feature_spec)))
    _check_options(
        root, out, images_path, image_size, image_lookback_hours, folds, threads, memory_limit, overwrite
    )
    timer = _Timer()
    warnings: list[str] = []
    parts = build(
        root,
        labels=list(labels),
        feature_spec=spec_path,
        images=images_path,
        image_lookback_hours=image_lookback_hours,
        folds=folds,
        seed=seed,
        threads=threads,
        memory_limit=memory_limit,
        timer=timer,
        warnings=warnings,
    )
    spec: MedsSpec = parts["spec"]
    cohort: pd.DataFrame = parts["cohort"]
    tasks: list[labels_mod.LabelTask] = parts["tasks"]
    source = parts["source"]
    links = parts["links"]

    with store.DatasetWriter(out, overwrite=overwrite) as writer:
        cache = None
        if links is not None and links.paths:
            with timer("images"):  # decoded straight into the writer's directory, validated there in place
                images_mod.build_cache(links, writer.path / store.CXR, image_size, threads, images_path)
                cache = np.load(writer.path / store.CXR, mmap_mode="r")
        with timer("write"):
            written = writer.write(
                cohort=cohort,
                ehr=parts["ehr"],
                features=spec.names,
                tasks={t.name: t.declaration() for t in tasks},
                images=cache,
                fairness={name: {"column": name} for name in spec.fairness},
                step_hours=float(spec.step_hours),
            )
        del cache
        timer.timings["total"] = round(time.perf_counter() - t_start, 3)
        options = {
            "meds": str(root),
            "out": str(out),
            "labels": [o.option.removeprefix("--labels ") for o in parts["label_options"]],
            "feature_spec": str(spec_path),
            "images": str(images_path) if images_path else None,
            "image_size": image_size,
            "image_lookback_hours": parts["lookback"],
            "folds": folds,
            "fold_mode": parts["fold_mode"],
            "seed": seed,
            "threads": threads,
            "memory_limit": memory_limit,
            "overwrite": overwrite,
            "hours": spec.hours,
            "step_hours": spec.step_hours,
            "window": "(prediction_time - hours, prediction_time]",
        }
        sources: dict[str, Any] = {
            "meds_root": str(root),
            "data": [store.file_record(p) for p in source.shards],
            "metadata": {
                name: store.file_record(p)
                for name, p in (
                    ("dataset.json", source.dataset_metadata_path),
                    ("subject_splits.parquet", source.splits_path),
                    ("codes.parquet", source.codes_path),
                )
                if p is not None
            },
            "labels": {
                col: [store.file_record(Path(f)) for f in stats["files"]]
                for t in tasks
                for col, stats in t.files.items()
            },
            "images": store.file_record(images_path) if images_path is not None else None,
            "feature_spec": store.file_record(spec_path),
            "hash_rule": store.HASH_RULE,
        }
        counts = {
            "data": parts["data_counts"],
            "rows": len(written),
            "subjects": int(written["subject_id"].nunique()),
            "labels": {
                c: {
                    "labelled": int(written[c].notna().sum()),
                    **(
                        {"positive": int(np.nansum(written[c]))} if t.kind in ("binary", "multilabel") else {}
                    ),
                }
                for t in tasks
                for c in t.columns
            },
            "rows_with_image": int(written["has_cxr"].sum()),
        }
        writer.finish(
            producer={"name": PRODUCER, "version": __version__, "options": options},
            extra_manifest={
                "cohort_steps": [
                    {
                        "step": "labelled",
                        "rule": "distinct (subject_id, prediction_time) of the --labels files",
                        "stays": len(written),
                    }
                ],
                "sources": sources,
                "meds_dataset": source.dataset_metadata,
                "counts": counts,
                "feature_units": {f.name: f.unit for f in spec.features},
                "feature_stats": parts["feature_stats"],
                "feature_codes": parts["code_map"].matched,
                "demographics": parts["demographics"],
                "image_links": parts["image_stats"],
                "label_files": {c: s for t in tasks for c, s in t.files.items()},
                "timings_s": timer.timings,
                "peak_rss_mib": _peak_rss_mib(),
                "warnings": warnings,
                "software": {"duckdb": duckdb.__version__, "meds": _meds_version()},
            },
        )
    return out


def _meds_version() -> str:
    import meds

    return str(meds.__version__)
