"""The processed dataset: one validated writer, one reader, the fingerprint (docs/dataset.md has the contract).

A processed dataset is one directory, the same for every producer (MIMIC, MEDS, the Python API):
  manifest.json   format version, producer and its options, and the declarations that make the rest generic:
                  the feature list, the time grid, the tasks and the cohort columns holding their labels, the
                  fairness attributes and the columns holding them, the image cache; plus whatever the producer
                  records (cohort steps, sources, timings, warnings)
  cohort.parquet  one row per stay, in the row order of the arrays; required columns `REQUIRED_COLUMNS`, the
                  declared label and attribute columns, and any column a producer keeps for its own use
  ehr.npy         float32 [N, steps, F], raw values on the time grid, NaN where unobserved
  cxr.npy         uint8 [M, S, S] grayscale image cache (row = cohort.cxr_index), memory-mappable

Why one writer (`write_dataset`, `DatasetWriter`): everything after `prepare` reads only what the manifest
declares, so every producer must declare the same things the same way, and a dataset that breaks a rule (a stay
in two folds, a subject split across folds, a label outside its task's range, an image index out of range) must
be refused when it is written, with one clear error, not at the 300th run. Directories are written atomically:
everything is built under a temporary sibling directory and renamed into place only when complete.

Why the fingerprint covers the declarations: a run depends on the data files and on which columns its task and
the fairness attributes read; the same data with the same declarations keeps the same fingerprint whenever and
wherever it is built (`dataset_fingerprint`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from carebench import __version__, atomic
from carebench.data.folds import N_FOLDS, assign_folds
from carebench.errors import UserError
from carebench.evaluation.options import RESERVED_ATTRIBUTE_NAMES
from carebench.tasks import (
    TASKS,
    TaskError,
    TaskSpec,
    check_task_name,
    declare_tasks,
    n_label_columns,
    spec_from_record,
    task_from_mapping,
)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
COHORT = "cohort.parquet"
EHR = "ehr.npy"
CXR = "cxr.npy"
DATA_FILES = (COHORT, EHR, CXR)
# The columns every cohort.parquet has (the label and attribute columns come from the manifest's declarations).
REQUIRED_COLUMNS = ("stay_id", "subject_id", "fold", "has_cxr", "cxr_index", "cxr_hours")
# A fairness attribute every dataset has without declaring it: whether the stay has an X-ray.
IMPLICIT_ATTRIBUTES = ("has_cxr",)
# Manifest keys the writer owns; `extra_manifest` may not set them.
OWN_KEYS = (
    "format_version",
    "carebench_version",
    "created_utc",
    "producer",
    "features",
    "time_grid",
    "tasks",
    "fairness",
    "images",
    "cohort",
    "content_sha256",
    "declarations_sha256",
)
_ATTRIBUTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class DatasetError(UserError, ValueError):
    """A processed dataset (or the input of `write_dataset`) is malformed; the message names the file, column
    or argument and what was expected."""


# ------------------------------------------------------------------------------------------------ declarations
@dataclass(frozen=True)
class TaskDeclaration:
    """A task as a dataset declares it: its spec (built-in or new) and the cohort columns holding its labels."""

    spec: TaskSpec
    labels: tuple[str, ...]
    label_names: tuple[str, ...] = ()  # display names of a multilabel task's labels (default: the columns)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def output_names(self) -> list[str]:
        """Names of the task's outputs (prediction columns `p_<name>`): the task's name (binary), each label
        column (multilabel), or `<task>_0` ... `<task>_<K-1>` (multiclass)."""
        if self.spec.kind == "binary":
            return [self.name]
        if self.spec.kind == "multilabel":
            return list(self.labels)
        return [f"{self.name}_{k}" for k in range(self.spec.num_outputs)]

    @property
    def display_names(self) -> list[str]:
        """Human-readable names of the outputs: the description (binary), the label names (multilabel), the
        class names (multiclass)."""
        if self.spec.kind == "binary":
            return [self.spec.description or self.name]
        if self.spec.kind == "multilabel":
            return list(self.label_names or self.spec.class_names or self.labels)
        return list(self.spec.class_names) or [str(k) for k in range(self.spec.num_outputs)]

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "labels": list(self.labels)}
        if self.label_names:
            out["label_names"] = list(self.label_names)
        if self.name not in TASKS:
            out["spec"] = self.spec.to_dict()
        return out


@dataclass(frozen=True)
class FairnessAttribute:
    """A group attribute: the cohort column holding it, as categories, or numeric cut into left-closed bins
    [e0, e1), ..., [e_last, inf) (e.g. age_band from age with edges 0, 40, 60, 80: "0-40", ..., "80+")."""

    name: str
    column: str
    bins: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()

    def groups(self, cohort: pd.DataFrame) -> pd.Series:
        """The attribute's group of every stay (missing stays missing; the fairness analysis calls them Unknown)."""
        col = cohort[self.column]
        if not self.bins:
            return col.rename(self.name).reset_index(drop=True)
        values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        cut = pd.cut(values, bins=[*self.bins, math.inf], right=False, labels=list(self.labels))
        return pd.Series(cut, name=self.name)

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "column": self.column}
        if self.bins:
            out["bins"] = list(self.bins)
            out["labels"] = list(self.labels)
        return out


def bin_labels(edges: Sequence[float]) -> tuple[str, ...]:
    """Default labels of left-closed bins: "0-40", "40-60", "60-80", "80+" for edges 0, 40, 60, 80."""

    def num(x: float) -> str:
        return f"{x:g}"

    return tuple([f"{num(a)}-{num(b)}" for a, b in itertools.pairwise(edges)] + [f"{num(edges[-1])}+"])


@dataclass(frozen=True)
class Declarations:
    """What a manifest declares: features, time grid, tasks (in declaration order), fairness attributes."""

    features: tuple[str, ...]
    steps: int
    step_hours: float
    tasks: dict[str, TaskDeclaration]
    attributes: dict[str, FairnessAttribute]
    intersections: tuple[tuple[str, ...], ...] = ()

    @property
    def hours(self) -> float:
        return self.steps * self.step_hours

    def to_manifest(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "time_grid": {"steps": self.steps, "step_hours": self.step_hours, "hours": self.hours},
            "tasks": [t.to_manifest() for t in self.tasks.values()],
            "fairness": {
                "attributes": [a.to_manifest() for a in self.attributes.values()],
                "intersections": [list(i) for i in self.intersections],
            },
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_manifest(), sort_keys=True).encode()).hexdigest()


def _str_list(value: Any, what: str, *, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise DatasetError(f"{what}: expected a list of names, got {value!r}")
    out = list(value)
    if (not out and not allow_empty) or not all(isinstance(v, str) and v for v in out):
        raise DatasetError(f"{what}: expected a non-empty list of non-empty strings, got {value!r}")
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise DatasetError(f"{what}: names repeat: {dup}")
    return out


def task_declaration(name: str, raw: Mapping[str, Any], where: str) -> TaskDeclaration:
    """One task of a declaration ({"labels": [columns], optional "spec" (a new task), "label_names"})."""
    try:
        check_task_name(name)
    except TaskError as e:
        raise DatasetError(f"{where}: {e}") from None
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{where}: task {name!r}: expected a mapping with 'labels', got {raw!r}")
    unknown = [k for k in raw if k not in ("labels", "spec", "label_names", "name")]
    if unknown:
        raise DatasetError(
            f"{where}: task {name!r}: unknown key {unknown[0]!r}; expected labels, spec, label_names"
        )
    if "labels" not in raw:
        raise DatasetError(
            f"{where}: task {name!r}: 'labels' (the cohort column(s) holding its labels) missing"
        )
    labels = _str_list(raw["labels"], f"{where}: task {name!r}: labels")
    spec_raw = raw.get("spec")
    try:
        if spec_raw is None:
            if name not in TASKS:
                raise DatasetError(
                    f"{where}: task {name!r} is not a built-in task ({', '.join(TASKS)}); declare it with a "
                    "'spec' (at least its kind, e.g. {'kind': 'binary'})"
                )
            spec = TASKS[name]
        elif name in TASKS:
            raise DatasetError(
                f"{where}: task {name!r} is a built-in task; leave out 'spec' or choose another name for a new task"
            )
        elif isinstance(spec_raw, Mapping) and "name" in spec_raw:
            if spec_raw["name"] != name:
                raise DatasetError(f"{where}: task {name!r}: its spec is named {spec_raw['name']!r}")
            spec = spec_from_record(spec_raw)
        else:
            spec = task_from_mapping(name, spec_raw, n_labels=len(labels))
    except TaskError as e:
        raise DatasetError(f"{where}: {e}") from None
    want = n_label_columns(spec)
    if len(labels) != want:
        raise DatasetError(
            f"{where}: task {name!r} ({spec.kind}, {spec.num_outputs} outputs) needs {want} label column(s), "
            f"got {len(labels)}: {labels}"
        )
    names = raw.get("label_names")
    label_names: list[str] = []
    if names is not None:
        if spec.kind != "multilabel":
            raise DatasetError(f"{where}: task {name!r}: 'label_names' is for multilabel tasks (class names go in "
                               "the spec)")  # fmt: skip
        label_names = _str_list(names, f"{where}: task {name!r}: label_names")
        if len(label_names) != len(labels):
            raise DatasetError(
                f"{where}: task {name!r}: {len(label_names)} label_names for {len(labels)} label columns"
            )
    return TaskDeclaration(spec, tuple(labels), tuple(label_names))


def attribute_declaration(name: str, raw: Mapping[str, Any] | None, where: str) -> FairnessAttribute:
    """One fairness attribute ({"column": c} categorical, or {"column": c, "bins": [edges], "labels": [...]})."""
    if not isinstance(name, str) or not _ATTRIBUTE_NAME.match(name):
        raise DatasetError(f"{where}: attribute name {name!r}: expected letters, digits and '_'")
    if name in IMPLICIT_ATTRIBUTES or name in RESERVED_ATTRIBUTE_NAMES:
        raise DatasetError(
            f"{where}: attribute name {name!r} is reserved ({', '.join(IMPLICIT_ATTRIBUTES)} is always available; "
            f"the fairness tables use {', '.join(sorted(RESERVED_ATTRIBUTE_NAMES))} as column names)"
        )
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{where}: attribute {name!r}: expected a mapping with 'column', got {raw!r}")
    unknown = [k for k in raw if k not in ("column", "bins", "labels", "name")]
    if unknown:
        raise DatasetError(
            f"{where}: attribute {name!r}: unknown key {unknown[0]!r}; expected column, bins, labels"
        )
    column = raw.get("column", name)
    if not isinstance(column, str) or not column:
        raise DatasetError(f"{where}: attribute {name!r}: 'column' must be a column name, got {column!r}")
    bins = raw.get("bins")
    if bins is None:
        if raw.get("labels") is not None:
            raise DatasetError(f"{where}: attribute {name!r}: 'labels' needs 'bins'")
        return FairnessAttribute(name, column)
    if (
        isinstance(bins, str)
        or not isinstance(bins, Sequence)
        or not bins
        or not all(isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) for b in bins)
        or any(b >= c for b, c in itertools.pairwise(bins))
    ):
        raise DatasetError(
            f"{where}: attribute {name!r}: 'bins' must be increasing finite bin edges (e.g. [0, 40, 60, 80]), "
            f"got {bins!r}"
        )
    edges = tuple(float(b) for b in bins)
    labels = raw.get("labels")
    labels = (
        bin_labels(edges)
        if labels is None
        else tuple(_str_list(labels, f"{where}: attribute {name!r}: labels"))
    )
    if len(labels) != len(edges):
        raise DatasetError(
            f"{where}: attribute {name!r}: {len(labels)} labels for {len(edges)} bins (one per edge: the last bin "
            "is open-ended)"
        )
    return FairnessAttribute(name, column, edges, labels)


def parse_declarations(manifest: Mapping[str, Any], where: str) -> Declarations:
    """The declarations of a manifest (format version `FORMAT_VERSION`), validated."""
    features = _str_list(manifest.get("features"), f"{where}: features")
    grid = manifest.get("time_grid")
    if not isinstance(grid, Mapping) or not isinstance(grid.get("steps"), int):
        raise DatasetError(f"{where}: time_grid: expected {{steps, step_hours, hours}}, got {grid!r}")
    tasks_raw = manifest.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise DatasetError(f"{where}: tasks: expected a non-empty list of task declarations")
    tasks: dict[str, TaskDeclaration] = {}
    for t in tasks_raw:
        name = t.get("name") if isinstance(t, Mapping) else None
        if name in tasks:
            raise DatasetError(f"{where}: task {name!r} declared twice")
        tasks[name] = task_declaration(name, t, where)
    fair = manifest.get("fairness") or {}
    attributes = {}
    for a in fair.get("attributes", []):
        name = a.get("name") if isinstance(a, Mapping) else None
        attributes[name] = attribute_declaration(name, a, where)
    inter = tuple(tuple(i) for i in fair.get("intersections", []))
    return Declarations(
        tuple(features), int(grid["steps"]), float(grid.get("step_hours", 1.0)), tasks, attributes, inter
    )


# ------------------------------------------------------------------------------------------------ the dataset
@dataclass
class ProcessedDataset:
    root: Path
    manifest: dict[str, Any]
    cohort: pd.DataFrame
    ehr: np.ndarray  # [N, steps, F] float32 (memory-mapped when opened with mmap=True)
    cxr: np.ndarray | None  # [M, S, S] uint8, None when the dataset has no images
    declarations: Declarations = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.declarations = parse_declarations(self.manifest, f"{Path(self.root) / MANIFEST}")
        declare_tasks(t.spec for t in self.declarations.tasks.values())

    @property
    def features(self) -> list[str]:
        return list(self.declarations.features)

    @property
    def tasks(self) -> list[str]:
        """The declared tasks, in declaration order."""
        return list(self.declarations.tasks)

    def task(self, name: str) -> TaskDeclaration:
        """The dataset's declaration of task `name` (an error naming the declared tasks otherwise)."""
        try:
            return self.declarations.tasks[name]
        except KeyError:
            raise DatasetError(
                f"{self.root}: the dataset declares no task {name!r}; it declares {', '.join(self.tasks)}"
            ) from None

    def label_columns(self, task: str) -> list[str]:
        return list(self.task(task).labels)

    def output_names(self, task: str) -> list[str]:
        return self.task(task).output_names

    @property
    def attributes(self) -> list[str]:
        """The fairness attributes: the declared ones, then `has_cxr`."""
        return [*self.declarations.attributes, *IMPLICIT_ATTRIBUTES]

    @property
    def intersections(self) -> list[tuple[str, ...]]:
        return list(self.declarations.intersections)

    def groups(self) -> pd.DataFrame:
        """One row per stay: `stay_id`, every fairness attribute's group (declared ones binned), `has_cxr`."""
        c = self.cohort
        out = pd.DataFrame({"stay_id": c["stay_id"].to_numpy()})
        for a in self.declarations.attributes.values():
            out[a.name] = a.groups(c).to_numpy()
        out["has_cxr"] = c["has_cxr"].astype(bool).to_numpy()
        return out


def _version_error(path: Path, found: Any) -> DatasetError:
    return DatasetError(
        f"{path}: format_version {found!r}, this carebench reads {FORMAT_VERSION}; the dataset was written by "
        "another carebench version: re-run `carebench prepare` (or write it again with write_dataset)"
    )


def read_manifest(root: str | Path) -> dict[str, Any]:
    """A dataset's manifest.json (format version checked), without opening the data files."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"{path}: missing (expected a dataset written by `carebench prepare` or write_dataset)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"{path}: unreadable ({_reason(e)}); expected the JSON manifest of a dataset written by "
            "`carebench prepare` (re-run prepare)"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise _version_error(path, manifest.get("format_version") if isinstance(manifest, dict) else None)
    return manifest


def dataset_declarations(root: str | Path) -> Declarations:
    """The declarations of the dataset at `root` (its new tasks registered for this process), read from the
    manifest only: what a configuration needs before the data files are opened."""
    decl = parse_declarations(read_manifest(root), str(Path(root) / MANIFEST))
    declare_tasks(t.spec for t in decl.tasks.values())
    return decl


def open_dataset(root: str | Path, mmap: bool = True) -> ProcessedDataset:
    """Open a processed dataset, checking that its files agree with each other and with its declarations."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (expected a dataset written by `carebench prepare`)")
    for name in (MANIFEST, COHORT, EHR):
        if not (root / name).is_file():
            raise DatasetError(f"{root / name}: missing (expected a dataset written by `carebench prepare`)")
    manifest = read_manifest(root)
    decl = parse_declarations(manifest, str(root / MANIFEST))
    try:
        cohort = pd.read_parquet(root / COHORT)
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"{root / COHORT}: unreadable ({_reason(e)}); expected a Parquet file (re-run prepare)"
        ) from None
    need = [*REQUIRED_COLUMNS]
    need += [c for t in decl.tasks.values() for c in t.labels]
    need += [a.column for a in decl.attributes.values()]
    missing = [c for c in dict.fromkeys(need) if c not in cohort.columns]
    if missing:
        raise DatasetError(f"{root / COHORT}: missing columns {missing} (required or declared in {MANIFEST})")
    ehr = _load_npy(root / EHR, mmap)
    want = (len(cohort), decl.steps, len(decl.features))
    if ehr.ndim != 3 or tuple(ehr.shape) != want:
        raise DatasetError(
            f"{root / EHR}: shape {ehr.shape} does not match {len(cohort)} stays x {decl.steps} steps x "
            f"{len(decl.features)} features"
        )
    cxr = None
    images = manifest.get("images")
    if images:
        if not (root / CXR).is_file():
            raise DatasetError(f"{root / CXR}: missing ({MANIFEST} declares an image cache)")
        cxr = _load_npy(root / CXR, mmap)
        if cxr.ndim != 3 or cxr.shape[0] != images.get("count"):
            raise DatasetError(f"{root / CXR}: shape {cxr.shape} does not match {images.get('count')} images")
        top = int(cohort["cxr_index"].max()) if len(cohort) else -1
        if top >= cxr.shape[0]:
            raise DatasetError(f"{root / COHORT}: cxr_index {top} is beyond the {cxr.shape[0]} cached images")
    return ProcessedDataset(root=root, manifest=manifest, cohort=cohort, ehr=ehr, cxr=cxr)


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    """A .npy array (never pickled objects); an unreadable or truncated file is a DatasetError naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(
            f"{path}: unreadable ({_reason(e)}); expected a NumPy .npy array (re-run prepare)"
        ) from None


def dataset_fingerprint(root: str | Path) -> str:
    """Identifies a processed dataset independently of its path and of when it was built.

    The digest of the manifest's `content_sha256` (digests of cohort.parquet, ehr.npy and cxr.npy) and
    `declarations_sha256` (features, time grid, tasks with their label columns, fairness attributes), so
    re-building the same data with the same declarations keeps every run valid. Every run records it (`runs`),
    and a run is only evaluated on a dataset with the same fingerprint.
    """
    m = read_manifest(root)
    content = m.get("content_sha256")
    if not isinstance(content, dict) or not content:
        raise DatasetError(
            f"{Path(root) / MANIFEST}: no content_sha256 (expected a dataset written by write_dataset)"
        )
    key = {**content, "declarations": m.get("declarations_sha256")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ writing
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary directory next to `out`; on success rename it to `out`, on failure delete it
    (`carebench.atomic.output_dir`: also removes what a killed earlier run of ours left next to `out`)."""
    return atomic.output_dir(out, overwrite=overwrite)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write with a schema fixed by the data, not by pandas' in-memory dtypes: text columns are `string` even
    when all values are missing, and the pandas metadata is dropped, so identical content gives identical
    bytes whichever stage (or pandas version) produced the frame."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = [
        pa.field(
            f.name, pa.string() if (pa.types.is_null(f.type) or pa.types.is_large_string(f.type)) else f.type
        )
        for f in table.schema
    ]
    table = table.cast(pa.schema(fields)).replace_schema_metadata(None)
    pq.write_table(table, path, compression="zstd", write_statistics=True)


# Source files up to this size get a sha256 in a producer's manifest; larger ones: size + mtime (hashing a
# multi-GB event table would dominate the run time).
HASH_MAX_BYTES = 64 * 1024 * 1024
HASH_RULE = f"sha256 for files <= {HASH_MAX_BYTES} bytes, otherwise size + mtime"


def file_record(path: Path) -> dict[str, Any]:
    """What a manifest records of a source file: its path and size, plus its sha256 (files up to
    `HASH_MAX_BYTES`) or its modification time (larger files)."""
    st = path.stat()
    rec: dict[str, Any] = {"path": str(path.absolute()), "bytes": st.st_size}
    if st.st_size <= HASH_MAX_BYTES:
        rec["sha256"] = sha256_file(path)
    else:
        rec["mtime"] = _dt.datetime.fromtimestamp(st.st_mtime, _dt.UTC).isoformat()
    return rec


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise DatasetError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
        if not out.is_dir():
            raise DatasetError(f"{out}: exists and is not a directory (expected a dataset directory)")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise DatasetError(
                f"{out}: refusing to overwrite a non-empty directory that is not a carebench dataset (no {MANIFEST})"
            )


def _integers(col: pd.Series, name: str) -> np.ndarray:
    """A column of whole numbers without missing values, as int64."""
    if col.isna().any():
        raise DatasetError(f"cohort: column {name!r} has {int(col.isna().sum())} missing value(s)")
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
        raise DatasetError(f"cohort: column {name!r} must hold integers, got dtype {col.dtype}")
    v = col.to_numpy()
    if not np.issubdtype(v.dtype, np.integer):
        if not np.all(np.isfinite(v)) or not np.all(v == np.round(v)):
            raise DatasetError(f"cohort: column {name!r} must hold integers, found {v[v != np.round(v)][:3]}")
    return v.astype(np.int64)


def _booleans(col: pd.Series, name: str) -> np.ndarray:
    if col.isna().any():
        raise DatasetError(f"cohort: column {name!r} has missing values (expected True/False)")
    v = col.to_numpy()
    if v.dtype == bool:
        return v
    if pd.api.types.is_numeric_dtype(col) and np.isin(v, (0, 1)).all():
        return v.astype(bool)
    raise DatasetError(f"cohort: column {name!r} must be boolean (or 0/1), got dtype {col.dtype}")


def _check_labels(cohort: pd.DataFrame, decl: TaskDeclaration) -> None:
    """Labels in their task's range; missing labels allowed (the stay is left out of that task)."""
    spec = decl.spec
    for col in decl.labels:
        s = cohort[col]
        ok = s.notna()
        if not ok.any():
            raise DatasetError(f"cohort: column {col!r} (labels of task {spec.name!r}) holds no label at all")
        if pd.api.types.is_bool_dtype(s):
            if spec.kind == "multiclass":
                raise DatasetError(
                    f"cohort: column {col!r} (task {spec.name!r}, multiclass) must hold class indices "
                    f"0..{spec.num_outputs - 1}, got booleans"
                )
            continue
        if not pd.api.types.is_numeric_dtype(s):
            raise DatasetError(
                f"cohort: column {col!r} (labels of task {spec.name!r}) must be numeric, got dtype {s.dtype}"
            )
        v = s[ok].to_numpy(dtype=np.float64)
        allowed = np.arange(spec.num_outputs) if spec.kind == "multiclass" else np.array([0.0, 1.0])
        bad = v[~np.isin(v, allowed)]
        if len(bad):
            want = f"classes 0..{spec.num_outputs - 1}" if spec.kind == "multiclass" else "0 or 1"
            raise DatasetError(
                f"cohort: column {col!r} (task {spec.name!r}, {spec.kind}) must hold {want} (or missing); "
                f"found {sorted(set(bad.tolist()))[:5]}"
            )


def _check_attribute(cohort: pd.DataFrame, a: FairnessAttribute) -> None:
    col = cohort[a.column]
    if a.bins:
        if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            raise DatasetError(
                f"cohort: column {a.column!r} (fairness attribute {a.name!r} with bins) must be numeric, "
                f"got dtype {col.dtype}"
            )
        v = col.to_numpy(dtype=np.float64)
        low = v[~np.isnan(v) & (v < a.bins[0])]
        if len(low):
            raise DatasetError(
                f"cohort: column {a.column!r} (fairness attribute {a.name!r}): value {low.min():g} below the first "
                f"bin edge {a.bins[0]:g}"
            )


def _declare(
    cohort: pd.DataFrame,
    features: Sequence[str],
    steps: int,
    step_hours: float,
    tasks: Mapping[str, Mapping[str, Any]],
    fairness: Mapping[str, Mapping[str, Any] | None] | None,
    intersections: Sequence[Sequence[str]],
) -> Declarations:
    features = _str_list(features, "features")
    if not isinstance(step_hours, int | float) or isinstance(step_hours, bool) or not step_hours > 0:
        raise DatasetError(f"step_hours: expected a positive number of hours, got {step_hours!r}")
    if not isinstance(tasks, Mapping) or not tasks:
        raise DatasetError("tasks: expected a non-empty mapping {task name: {'labels': [columns], ...}}")
    where = "write_dataset"
    decl_tasks = {name: task_declaration(name, raw, where) for name, raw in tasks.items()}
    if fairness is not None and not isinstance(fairness, Mapping):
        raise DatasetError(
            f"fairness: expected a mapping {{attribute: {{'column': ..., 'bins': ...}}}}, got {fairness!r}"
        )
    attributes = {name: attribute_declaration(name, raw, where) for name, raw in (fairness or {}).items()}
    known = [*attributes, *IMPLICIT_ATTRIBUTES]
    inter = []
    for i in intersections or ():
        if isinstance(i, str) or len(i) < 2 or len(set(i)) != len(i) or any(a not in known for a in i):
            raise DatasetError(
                f"intersections: each must name two or more different attributes of {known}, got {i!r}"
            )
        inter.append(tuple(i))
    used = {c for t in decl_tasks.values() for c in t.labels} | {a.column for a in attributes.values()}
    clash = sorted(used & set(REQUIRED_COLUMNS))
    if clash:
        raise DatasetError(f"tasks/fairness: {clash} are required columns, not label or attribute columns")
    missing = sorted(c for c in used if c not in cohort.columns)
    if missing:
        raise DatasetError(f"cohort: missing columns {missing} (declared as label or attribute columns)")
    for t in decl_tasks.values():
        _check_labels(cohort, t)
    for a in attributes.values():
        _check_attribute(cohort, a)
    return Declarations(tuple(features), steps, float(step_hours), decl_tasks, attributes, tuple(inter))


def _check_folds(cohort: pd.DataFrame) -> None:
    fold = cohort["fold"].to_numpy()
    bad = sorted(set(fold[(fold < 1) | (fold > N_FOLDS)].tolist()))
    if bad:
        raise DatasetError(f"cohort: column 'fold' must be 1..{N_FOLDS}, found {bad[:5]}")
    per_subject = cohort.groupby("subject_id")["fold"].nunique()
    split = per_subject[per_subject > 1]
    if len(split):
        s = split.index[0]
        raise DatasetError(
            f"cohort: subject {s} has stays in folds "
            f"{sorted(cohort.loc[cohort['subject_id'] == s, 'fold'].unique().tolist())} "
            f"({len(split)} subject(s) split across folds; folds must be subject-disjoint)"
        )
    empty = [k for k in range(1, N_FOLDS + 1) if not (fold == k).any()]
    if empty:
        raise DatasetError(
            f"cohort: fold(s) {empty} hold no stay; {N_FOLDS} subject-disjoint folds need stays of at least "
            f"{N_FOLDS} subjects in each"
        )


def _generic_columns(
    cohort: pd.DataFrame, n_images: int | None, seed: int, stratify: str | None
) -> pd.DataFrame:
    """The required columns validated (and filled where the input may leave them out), in a copy of the cohort."""
    if not isinstance(cohort, pd.DataFrame):
        raise DatasetError(f"cohort: expected a pandas DataFrame, got {type(cohort).__name__}")
    c = cohort.reset_index(drop=True).copy()
    for name in ("stay_id", "subject_id"):
        if name not in c.columns:
            raise DatasetError(f"cohort: required column {name!r} missing")
        c[name] = _integers(c[name], name)
    dup = c["stay_id"][c["stay_id"].duplicated()]
    if len(dup):
        raise DatasetError(
            f"cohort: stay_id {int(dup.iloc[0])} appears {int((c['stay_id'] == dup.iloc[0]).sum())} times "
            "(one row per stay: a stay cannot be in two rows or two folds)"
        )
    if "fold" not in c.columns:
        if c["subject_id"].nunique() < N_FOLDS:
            raise DatasetError(
                f"cohort: {c['subject_id'].nunique()} subjects; at least {N_FOLDS} are needed for "
                f"{N_FOLDS} subject-disjoint folds"
            )
        strata = None
        if stratify is not None:
            if stratify not in c.columns:
                raise DatasetError(f"stratify: column {stratify!r} not in the cohort")
            strata = c[stratify].fillna(-1).astype(np.int64)
        c["fold"] = assign_folds(c["subject_id"], seed, N_FOLDS, strata=strata).to_numpy()
    else:
        c["fold"] = _integers(c["fold"], "fold").astype(np.int8)
    _check_folds(c)
    if n_images is None:
        if "has_cxr" in c.columns and _booleans(c["has_cxr"], "has_cxr").any():
            raise DatasetError("cohort: has_cxr is True for some stays but no images were given")
        if "cxr_index" in c.columns and (_integers(c["cxr_index"], "cxr_index") != -1).any():
            raise DatasetError("cohort: cxr_index must be -1 for every stay when no images are given")
        c["has_cxr"] = np.zeros(len(c), dtype=bool)
        c["cxr_index"] = np.full(len(c), -1, dtype=np.int32) if "cxr_index" not in c else c["cxr_index"]
        if "cxr_hours" not in c.columns:
            c["cxr_hours"] = np.full(len(c), np.nan)
    else:
        for name in ("cxr_index", "cxr_hours"):
            if name not in c.columns:
                raise DatasetError(f"cohort: required column {name!r} missing (images were given)")
        index = _integers(c["cxr_index"], "cxr_index")
        bad = index[(index < -1) | (index >= n_images)]
        if len(bad):
            raise DatasetError(
                f"cohort: cxr_index {int(bad[0])} out of range: expected -1 (no image) or a row 0..{n_images - 1} "
                f"of the {n_images} images"
            )
        has = index >= 0
        if "has_cxr" in c.columns:
            given = _booleans(c["has_cxr"], "has_cxr")
            if not np.array_equal(given, has):
                i = int(np.flatnonzero(given != has)[0])
                raise DatasetError(
                    f"cohort: stay {int(c['stay_id'].iloc[i])}: has_cxr {bool(given[i])} but cxr_index "
                    f"{int(index[i])} (has_cxr must be cxr_index >= 0)"
                )
        c["has_cxr"] = has
        unused = np.setdiff1d(np.arange(n_images), index[has])
        if len(unused):
            raise DatasetError(
                f"images: {len(unused)} of the {n_images} images are referenced by no stay (first: row "
                f"{int(unused[0])}); every row of the image cache must be some stay's cxr_index"
            )
    if not pd.api.types.is_numeric_dtype(c["cxr_hours"]) or pd.api.types.is_bool_dtype(c["cxr_hours"]):
        raise DatasetError(
            f"cohort: column 'cxr_hours' must be numeric hours, got dtype {c['cxr_hours'].dtype}"
        )
    hours = c["cxr_hours"].to_numpy(dtype=np.float64)
    no_time = c["has_cxr"].to_numpy() & ~np.isfinite(hours)
    if no_time.any():
        raise DatasetError(
            f"cohort: stay {int(c['stay_id'][no_time].iloc[0])} has an X-ray but no finite cxr_hours "
            "(hours from the start of the window to the image)"
        )
    return c


def _check_ehr(ehr: Any, n: int, n_features: int) -> np.ndarray:
    if not isinstance(ehr, np.ndarray):
        raise DatasetError(f"ehr: expected a numpy array [stays, steps, features], got {type(ehr).__name__}")
    if ehr.ndim != 3 or ehr.shape[0] != n or ehr.shape[2] != n_features or ehr.shape[1] < 1:
        raise DatasetError(
            f"ehr: shape {ehr.shape}, expected [{n} stays, steps >= 1, {n_features} features] (one row per cohort "
            "row, one column per feature)"
        )
    if not np.issubdtype(ehr.dtype, np.floating):
        raise DatasetError(f"ehr: dtype {ehr.dtype}, expected float32 with NaN where unobserved")
    out = np.ascontiguousarray(ehr, dtype=np.float32)
    inf = np.isinf(out)
    if inf.any():
        i, t, f = (int(x[0]) for x in np.nonzero(inf))
        raise DatasetError(
            f"ehr: infinite value at stay row {i}, step {t}, feature {f} (or too large for float32); use NaN for "
            "unobserved values"
        )
    return out


def _check_images(images: Any) -> np.ndarray | None:
    if images is None:
        return None
    if not isinstance(images, np.ndarray) or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise DatasetError(
            f"images: expected a uint8 array [images, S, S] (square grayscale), got "
            f"{getattr(images, 'shape', type(images).__name__)}"
        )
    if images.dtype != np.uint8:
        raise DatasetError(f"images: dtype {images.dtype}, expected uint8 grayscale")
    if images.shape[0] == 0:
        raise DatasetError("images: an empty image cache; pass images=None for a dataset without X-rays")
    return images


def _cohort_summary(c: pd.DataFrame) -> dict[str, Any]:
    folds = c.groupby("fold").agg(stays=("stay_id", "size"), subjects=("subject_id", "nunique"))
    return {
        "stays": len(c),
        "subjects": int(c["subject_id"].nunique()),
        "with_image": int(c["has_cxr"].sum()),
        "folds": {str(k): {n: int(v) for n, v in row.items()} for k, row in folds.iterrows()},
    }


class DatasetWriter:
    """Builds one processed dataset in a temporary directory beside `out`; `write` validates and writes the
    data files, `finish` the manifest, and leaving the `with` block renames the directory into place (any error
    deletes it: nothing half-written is left behind).

    `path` is the temporary directory: a producer may build large intermediate files inside it (a DuckDB spill
    directory, the image cache passed to `write` as a memory-mapped `np.load(path / CXR, mmap_mode="r")`, which
    is then validated in place instead of copied).
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False) -> None:
        self.out = Path(os.path.abspath(out))
        _check_out(self.out, overwrite)
        self.overwrite = overwrite
        self._stack = contextlib.ExitStack()
        self.path: Path | None = None
        self._written: dict[str, Any] | None = None
        self._finished = False

    def __enter__(self) -> DatasetWriter:
        self.path = self._stack.enter_context(atomic_output_dir(self.out, overwrite=self.overwrite))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it private; a dataset gets normal permissions
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self._finished:
            exc = DatasetError(f"{self.out}: the dataset was not finished (call finish() after write())")
            self._stack.__exit__(type(exc), exc, None)
            raise exc
        return bool(self._stack.__exit__(exc_type, exc, tb))

    def write(
        self,
        *,
        cohort: pd.DataFrame,
        ehr: np.ndarray,
        features: Sequence[str],
        tasks: Mapping[str, Mapping[str, Any]],
        images: np.ndarray | None = None,
        fairness: Mapping[str, Mapping[str, Any] | None] | None = None,
        intersections: Sequence[Sequence[str]] = (),
        step_hours: float = 1.0,
        seed: int = 0,
        stratify: str | None = None,
    ) -> pd.DataFrame:
        """Validate everything and write cohort.parquet, ehr.npy and cxr.npy; returns the cohort as written."""
        if self.path is None:
            raise RuntimeError("DatasetWriter.write() outside its `with` block")
        if self._written is not None:
            raise RuntimeError("DatasetWriter.write() called twice")
        features = _str_list(features, "features")
        images = _check_images(images)
        c = _generic_columns(cohort, None if images is None else images.shape[0], seed, stratify)
        values = _check_ehr(ehr, len(c), len(features))
        decl = _declare(c, features, values.shape[1], step_hours, tasks, fairness, intersections)
        write_parquet(c, self.path / COHORT)
        np.save(self.path / EHR, values)
        if images is not None:
            target = self.path / CXR
            in_place = (
                isinstance(images, np.memmap) and Path(str(images.filename)).resolve() == target.resolve()
            )
            if not in_place:
                tmp = self.path / ".cxr.tmp.npy"
                np.save(tmp, np.ascontiguousarray(images))
                os.replace(tmp, target)
        elif (self.path / CXR).exists():
            (self.path / CXR).unlink()
        self._written = {
            "declarations": decl,
            "cohort": _cohort_summary(c),
            "images": None
            if images is None
            else {"file": CXR, "count": int(images.shape[0]), "size": int(images.shape[1])},
        }
        return c

    def finish(
        self, *, producer: Mapping[str, Any] | None = None, extra_manifest: Mapping[str, Any] | None = None
    ) -> None:
        """Write manifest.json: the declarations, the cohort summary, the content digests, the producer (name,
        version, options) and the producer's own records (`extra_manifest`: cohort steps, sources, warnings,
        timings ...; it may not set the keys the writer owns, `OWN_KEYS`)."""
        if self._written is None or self.path is None:
            raise RuntimeError("DatasetWriter.finish() before write()")
        extra = dict(extra_manifest or {})
        clash = sorted(set(extra) & set(OWN_KEYS))
        if clash:
            raise DatasetError(f"extra_manifest: keys {clash} are written by the writer itself")
        if producer is not None and not isinstance(producer, Mapping):
            raise DatasetError(f"producer: expected a mapping (name, version, options), got {producer!r}")
        producer = {"name": "python-api", "version": __version__, "options": {}, **dict(producer or {})}
        decl: Declarations = self._written["declarations"]
        manifest = {
            **extra,
            "format_version": FORMAT_VERSION,
            "carebench_version": __version__,
            "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "producer": producer,
            **decl.to_manifest(),
            "images": self._written["images"],
            "cohort": self._written["cohort"],
            # what the data is, independent of when, where and how fast it was built
            "content_sha256": {
                n: sha256_file(self.path / n) for n in DATA_FILES if (self.path / n).is_file()
            },
            "declarations_sha256": decl.digest(),
        }
        write_json_atomic(self.path / MANIFEST, manifest)
        self._finished = True


def write_dataset(
    out: str | Path,
    *,
    cohort: pd.DataFrame,
    ehr: np.ndarray,
    features: Sequence[str],
    tasks: Mapping[str, Mapping[str, Any]],
    images: np.ndarray | None = None,
    fairness: Mapping[str, Mapping[str, Any] | None] | None = None,
    intersections: Sequence[Sequence[str]] = (),
    step_hours: float = 1.0,
    producer: Mapping[str, Any] | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
    seed: int = 0,
    stratify: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a processed dataset at `out` from your own arrays and tables; return its path.

    Everything is validated first (one `DatasetError` naming the argument, column or stay), written into a
    temporary directory beside `out` and renamed into place when complete.

    - `cohort`: one row per stay, in the row order of `ehr`. Required: `stay_id` (unique integers),
      `subject_id` (integers); `fold` (1-5, every subject in one fold, every fold non-empty) or, when absent,
      folds assigned subject-disjoint from `seed` (optionally stratified by the 0/1 column `stratify`); with
      `images`: `cxr_index` (row of `images`, -1 = none; every image used) and `cxr_hours` (hours from the start
      of the window to the image, finite where there is one), `has_cxr` optional (must equal cxr_index >= 0);
      without images these three may be left out. Plus the label and attribute columns declared below; any other
      column is kept as it is.
    - `ehr`: float [N, steps, F] (stored as float32), raw values on the time grid, NaN where unobserved (no
      infinities); `features`: the F feature names; `step_hours`: hours per step (the grid spans
      steps x step_hours hours).
    - `tasks`: {name: {"labels": [columns], "spec": {...}, "label_names": [...]}}, in the order reports list
      them. A built-in task (`carebench.tasks.TASKS`: mortality, phenotype, los) needs only its label columns; a
      new task adds a `spec` (`carebench.tasks.task_from_mapping`: at least its `kind`; a multiclass task its
      `class_names`). Binary and multilabel labels are 0/1, multiclass labels class indices 0..K-1; a missing
      label leaves the stay out of that task.
    - `images`: uint8 [M, S, S] grayscale X-rays, or None.
    - `fairness`: {attribute: {"column": c}} (categories) or {"column": c, "bins": [edges], "labels": [...]}
      (numeric, left-closed bins, the last open-ended); `has_cxr` is always available. `intersections`: pairs
      (or more) of attributes analysed jointly.
    - `producer`: {"name", "version", "options"} recorded in the manifest; `extra_manifest`: anything else the
      producer records (cohort_steps [{step, rule, stays}], sources, warnings, timings_s, ...).

    Example (docs/dataset.md runs it)::

        write_dataset(
            "data/mine",
            cohort=cohort,                     # stay_id, subject_id, readmitted, sex, age, ...
            ehr=values,                        # float32 [N, 24, 5], NaN = not measured
            features=["hr", "sbp", "spo2", "temp", "rr"],
            tasks={"readmission_30d": {"labels": ["readmitted"], "spec": {"kind": "binary"}}},
            fairness={"sex": {"column": "sex"}, "age_band": {"column": "age", "bins": [18, 65]}},
        )
    """
    with DatasetWriter(out, overwrite=overwrite) as w:
        w.write(
            cohort=cohort,
            ehr=ehr,
            features=features,
            tasks=tasks,
            images=images,
            fairness=fairness,
            intersections=intersections,
            step_hours=step_hours,
            seed=seed,
            stratify=stratify,
        )
        w.finish(producer=producer, extra_manifest=extra_manifest)
    return w.out
