"""Bad input and faults, verb by verb: one table of cases, one contract.

Every case builds a bad input (or injects a fault: a full disk, a lock held by another benchmark) inside its own
tmp folder, runs the command line in-process and checks the contract of docs/troubleshooting.md:

- the exact exit status (2: bad input; 1: the environment failed, e.g. the disk is full; 0 for the cases where
  the command goes on without the broken part and says so);
- exactly one line starting `error:` on stderr, the last one, naming the file/column/option (`expect`), and no
  traceback; for the exit-0 cases, a `note:` line naming the problem and no `error:` line;
- nothing new on disk and nothing changed: every file under the case's tmp folder and the shared read-only
  fixtures (the prepared demo, the finished runs) is byte-identical afterwards, and no file appeared, except
  what the case allows (`new_ok`, for the exit-0 cases).

To add a case: write a `setup(env) -> argv` that breaks one thing (helpers on `Env`) and add a `Case` to the
table of its verb. The `tune` verb's cases go in TUNE_CASES (see there).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from carebench.cli import app

TABLES = {
    "hosp": ["patients", "admissions", "labevents", "diagnoses_icd"],
    "icu": ["icustays", "chartevents", "outputevents"],
}
FAST_ANALYSIS = ["--n-bootstrap", "20", "--n-permutations", "20", "--no-progress"]
FAST_ANALYSIS_SKIP = [*FAST_ANALYSIS, "--skip-fairness", "--skip-missingness", "--skip-ablation"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def finished_runs(prepared_demo, tmp_path_factory) -> Path:
    """Two trained runs (lstm, transformer; mortality, fold 1, `test` preset, one epoch) on the prepared demo, with
    their analysis and report. Read-only: cases that break it work on a copy (`Env.copy_runs`)."""
    from benchmark_fixture import train_runs
    from carebench.analysis.analyze import analyze
    from carebench.report import build_report

    runs = tmp_path_factory.mktemp("faults") / "runs"
    train_runs(prepared_demo, runs, ["lstm", "transformer"], task="mortality", threads=1)
    analyze(runs, n_bootstrap=20, n_permutations=20, fairness=False, missingness=False, ablation=False)
    build_report(runs)
    return runs


@dataclass
class Env:
    """What a case's setup may use: its own tmp folder, the demo, the shared prepared dataset and finished runs
    (never to be modified: copy them first), and monkeypatch for in-process fault injection."""

    tmp: Path
    demo: Path
    dataset: Path
    runs: Path
    mp: pytest.MonkeyPatch
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    # ---- raw MIMIC-IV
    def raw(self, name: str = "mimic-iv") -> Path:
        """A MIMIC-IV root in tmp whose tables are symlinks to the demo's (replace one to break it)."""
        root = self.tmp / name
        for module, names in TABLES.items():
            (root / module).mkdir(parents=True)
            for t in names:
                os.symlink(self.demo / module / f"{t}.csv.gz", root / module / f"{t}.csv.gz")
        return root

    def read(self, module: str, table: str) -> pd.DataFrame:
        return pd.read_csv(self.demo / module / f"{table}.csv.gz", dtype=str, keep_default_na=False)

    def replace(self, root: Path, module: str, table: str, df: pd.DataFrame, ext: str = ".csv.gz") -> Path:
        (root / module / f"{table}.csv.gz").unlink()
        path = root / module / f"{table}{ext}"
        df.to_csv(path, index=False)
        return path

    def header_only(self, root: Path, module: str, table: str) -> Path:
        return self.replace(root, module, table, self.read(module, table).iloc[:0])

    # ---- datasets and runs
    def copy_dataset(self, name: str = "data") -> Path:
        return Path(shutil.copytree(self.dataset, self.tmp / name))

    def copy_runs(self) -> Path:
        return Path(shutil.copytree(self.runs, self.tmp / "runs"))

    def run_ids(self, runs: Path | None = None) -> list[str]:
        root = runs or self.runs
        return sorted(p.name for p in root.iterdir() if (p / "DONE").is_file())

    def plan(self, text: str, name: str = "plan.yaml") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    # ---- faults
    def disk_full(self, target: object, attr: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
        """`target.attr` raises ENOSPC (no filename, as a failed write(2) does) when `when(*args)` is true."""
        original = getattr(target, attr)

        def full(*args, **kwargs):
            if when(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(*args, **kwargs)

        self.mp.setattr(target, attr, full)


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Env], list[str]]  # builds the bad input in env.tmp; returns the command line
    code: int
    expect: tuple[str, ...]  # substrings of the one error (or note) line
    new_ok: tuple[str, ...] = ()  # paths under tmp allowed to appear or change (exit-0 cases only)
    line: str = "error:"  # the prefix of the line that names the problem


def _pwned(env: Env) -> Path:
    """Where a code-carrying payload would write if it were executed (the 'nothing new' check catches it)."""
    return env.tmp / "pwned"


class _Payload:
    """A pickle that opens (creates) a file when unpickled: what a malicious checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------- prepare
def _prepare(env: Env, raw: Path, *extra: str, out: Path | None = None) -> list[str]:
    return ["prepare", "--mimic-iv", str(raw), "--out", str(out or env.tmp / "out" / "data"), *extra]


def p_empty(module: str, table: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        raw = env.raw()
        env.header_only(raw, module, table)
        return _prepare(env, raw)

    return setup


def p_itemids_renumbered(env: Env) -> list[str]:
    raw = env.raw()
    df = env.read("icu", "chartevents")
    df["itemid"] = (df["itemid"].astype(int) + 1_000_000).astype(str)
    env.replace(raw, "icu", "chartevents", df)
    return _prepare(env, raw)


def p_no_values(env: Env) -> list[str]:
    raw = env.raw()
    df = env.read("icu", "outputevents")
    df["value"] = ""
    env.replace(raw, "icu", "outputevents", df)
    return _prepare(env, raw)


def p_out_of_range(env: Env) -> list[str]:
    raw = env.raw()
    df = env.read("icu", "outputevents")
    df["value"] = "-5"  # urine output in another unit/sign: every value outside [0, ...]
    env.replace(raw, "icu", "outputevents", df)
    return _prepare(env, raw)


def p_diagnoses_of_other_admissions(env: Env) -> list[str]:
    raw = env.raw()
    df = env.read("hosp", "diagnoses_icd")
    df["hadm_id"] = (df["hadm_id"].astype(int) + 7).astype(str)
    env.replace(raw, "hosp", "diagnoses_icd", df)
    return _prepare(env, raw)


def p_utf16(env: Env) -> list[str]:
    raw = env.raw()
    (raw / "hosp" / "patients.csv.gz").unlink()
    (raw / "hosp" / "patients.csv").write_text(
        env.read("hosp", "patients").to_csv(index=False), encoding="utf-16"
    )
    return _prepare(env, raw)


def p_no_race(env: Env) -> list[str]:
    raw = env.raw()
    env.replace(raw, "hosp", "admissions", env.read("hosp", "admissions").drop(columns="race"))
    return _prepare(env, raw)


def p_two_layouts(env: Env) -> list[str]:
    raw = env.raw()
    (raw / "core").mkdir()
    os.symlink(env.demo / "hosp" / "patients.csv.gz", raw / "core" / "patients.csv.gz")
    return _prepare(env, raw)


def p_root_one_level_up(env: Env) -> list[str]:
    env.raw("mimiciv/2.2")
    return _prepare(env, env.tmp / "mimiciv")


def p_root_is_file(env: Env) -> list[str]:
    (env.tmp / "mimic.zip").write_bytes(b"PK\x03\x04")
    return _prepare(env, env.tmp / "mimic.zip")


def p_out_parent_is_file(env: Env) -> list[str]:
    raw = env.raw()
    (env.tmp / "file").write_text("not a folder")
    return _prepare(env, raw, out=env.tmp / "file" / "data")


def p_out_parent_not_writable(env: Env) -> list[str]:
    raw = env.raw()
    locked = env.tmp / "locked"
    locked.mkdir()
    real = os.access
    env.mp.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked else real(p, mode, **k))
    return _prepare(env, raw, out=locked / "sub" / "data")


def p_cxr_without_metadata(env: Env) -> list[str]:
    raw = env.raw()
    (env.tmp / "cxr" / "files").mkdir(parents=True)
    return _prepare(env, raw, "--mimic-cxr", str(env.tmp / "cxr"))


def p_timestamps_reformatted(env: Env) -> list[str]:
    raw = env.raw()
    df = env.read("icu", "icustays")
    for c in ("intime", "outtime"):
        df[c] = pd.to_datetime(df[c]).dt.strftime("%m/%d/%Y %H:%M")  # what a spreadsheet re-save does
    env.replace(raw, "icu", "icustays", df, ext=".csv")
    return _prepare(env, raw)


def p_cxr_links_nothing(env: Env) -> list[str]:
    raw = env.raw()
    cxr = env.tmp / "cxr"
    (cxr / "files").mkdir(parents=True)
    (cxr / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition,StudyDate,StudyTime\n"
    )
    return _prepare(env, raw, "--mimic-cxr", str(cxr))


def p_disk_full_new(env: Env) -> list[str]:
    raw = env.raw()
    env.disk_full(np, "save")
    return _prepare(env, raw)


def p_disk_full_overwrite(env: Env) -> list[str]:
    raw = env.raw()
    old = env.copy_dataset()
    env.disk_full(np, "save")
    return _prepare(env, raw, "--overwrite", out=old)


def p_usage(*extra: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return ["prepare", *extra]

    return setup


PREPARE_CASES = [
    Case("prepare/empty-patients", p_empty("hosp", "patients"), 2,
         ("hosp/patients.csv.gz", "has a header but no rows", "one row per patient")),
    Case("prepare/empty-admissions", p_empty("hosp", "admissions"), 2,
         ("hosp/admissions.csv.gz", "has a header but no rows")),
    Case("prepare/empty-icustays", p_empty("icu", "icustays"), 2, ("icu/icustays.csv.gz", "no rows", "ICU stay")),
    Case("prepare/empty-diagnoses", p_empty("hosp", "diagnoses_icd"), 2,
         ("hosp/diagnoses_icd.csv.gz", "no rows", "phenotype label")),
    Case("prepare/empty-chartevents", p_empty("icu", "chartevents"), 2,
         ("icu/chartevents", "feature group", "is empty", "header but no rows", "--allow-empty-features")),
    Case("prepare/empty-labevents", p_empty("hosp", "labevents"), 2,
         ("hosp/labevents", "'laboratory values' is empty", "--allow-empty-features")),
    Case("prepare/empty-outputevents", p_empty("icu", "outputevents"), 2,
         ("icu/outputevents", "'urine output' is empty", "header but no rows")),
    Case("prepare/itemids-renumbered", p_itemids_renumbered, 2,
         ("icu/chartevents", "is empty", "220045", "renumbered", "--allow-empty-features")),
    Case("prepare/values-missing", p_no_values, 2, ("icu/outputevents", "have no numeric value")),
    Case("prepare/values-out-of-range", p_out_of_range, 2, ("icu/outputevents", "outside the features' valid ranges")),
    Case("prepare/diagnoses-of-other-admissions", p_diagnoses_of_other_admissions, 2,
         ("diagnoses_icd.csv.gz", "none of the 74 cohort stays", "phenotype label would be 0")),
    Case("prepare/utf16", p_utf16, 2, ("hosp/patients.csv", "UTF-16", "expected UTF-8")),
    Case("prepare/no-race-column", p_no_race, 2, ("admissions.csv.gz", "missing column 'race'", "'ethnicity'")),
    Case("prepare/two-layouts", p_two_layouts, 2, ("table patients found twice", "core/patients", "hosp/patients")),
    Case("prepare/root-one-level-up", p_root_one_level_up, 2, ("required table", "pass --mimic-iv", "mimiciv/2.2")),
    Case("prepare/root-is-a-file", p_root_is_file, 2, ("--mimic-iv", "mimic.zip", "not a directory")),
    Case("prepare/out-parent-is-a-file", p_out_parent_is_file, 2, ("--out", "is a file, not a directory")),
    Case("prepare/out-parent-not-writable", p_out_parent_not_writable, 2, ("--out", "no permission to write in")),
    Case("prepare/xray-metadata-missing", p_cxr_without_metadata, 2,
         ("MIMIC-CXR-JPG metadata not found", "mimic-cxr-2.0.0-metadata.csv.gz")),
    Case("prepare/timestamps-reformatted", p_timestamps_reformatted, 2,
         ("icu/icustays.csv", 'column "intime"', "YYYY-MM-DD HH:MM:SS")),
    Case("prepare/xrays-link-no-stay", p_cxr_links_nothing, 2,
         ("--mimic-cxr", "'chest X-rays' is empty", "--allow-empty-features")),
    Case("prepare/disk-full", p_disk_full_new, 1, ("out/data", "No space left on device", "nothing was written")),
    Case("prepare/disk-full-overwrite", p_disk_full_overwrite, 1,
         ("data: writing failed", "No space left on device", "the previous data is unchanged")),
    Case("prepare/threads-not-a-number", p_usage("--mimic-iv", "x", "--out", "y", "--threads", "two"), 2,
         ("carebench prepare", "'--threads'", "valid integer")),
    Case("prepare/missing-option", p_usage("--out", "y"), 2, ("prepare", "exactly one of --mimic-iv ROOT or --meds ROOT")),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- describe
def d_missing(env: Env) -> list[str]:
    return ["describe", str(env.tmp / "nowhere")]


def d_corrupt(name: str, data: bytes | None = None) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        root = env.copy_dataset()
        path = root / name
        path.write_bytes(data if data is not None else path.read_bytes()[: path.stat().st_size // 3])
        return ["describe", str(root)]

    return setup


def d_wrong_shape(env: Env) -> list[str]:
    root = env.copy_dataset()
    np.save(root / "ehr.npy", np.zeros((3, 48, 2), dtype=np.float32))
    return ["describe", str(root)]


DESCRIBE_CASES = [
    Case("describe/not-a-dataset", d_missing, 2, ("nowhere", "not a directory")),
    Case("describe/manifest-truncated", d_corrupt("manifest.json"), 2, ("manifest.json", "unreadable")),
    Case("describe/cohort-truncated", d_corrupt("cohort.parquet"), 2, ("cohort.parquet", "unreadable")),
    Case("describe/ehr-truncated", d_corrupt("ehr.npy"), 2, ("ehr.npy", "unreadable")),
    Case("describe/ehr-wrong-shape", d_wrong_shape, 2, ("ehr.npy", "does not match 74 stays")),
]


# ----------------------------------------------------------------------------------------------- train
def _train(env: Env, *extra: str, data: Path | None = None) -> list[str]:
    base = ["train", "--data", str(data or env.dataset), "--model", "lstm", "--task", "mortality"]
    return [*base, "--preset", "test", "--out", str(env.tmp / "runs"), "--no-progress", *extra]


def t_extra(*extra: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return _train(env, *extra)

    return setup


def t_replace(flag: str, value: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        args = _train(env)
        args[args.index(flag) + 1] = value
        return args

    return setup


def t_data_missing(env: Env) -> list[str]:
    return _train(env, data=env.tmp / "nowhere")


def t_data_not_dataset(env: Env) -> list[str]:
    (env.tmp / "empty").mkdir()
    return _train(env, data=env.tmp / "empty")


def t_out_is_file(env: Env) -> list[str]:
    (env.tmp / "runs").write_text("a file")
    return _train(env)


def t_disk_full(env: Env) -> list[str]:
    env.disk_full(pd.DataFrame, "to_parquet")
    return _train(env, "max_epochs=1")


TRAIN_CASES = [
    Case("train/data-missing", t_data_missing, 2, ("--data", "nowhere", "does not exist")),
    Case("train/data-not-a-dataset", t_data_not_dataset, 2, ("--data", "not a dataset", "manifest.json")),
    Case("train/unknown-model", t_replace("--model", "lsmt"), 2, ("--model lsmt", "unknown model", "lstm")),
    Case("train/unknown-task", t_replace("--task", "death"), 2, ("--task 'death'", "declares no such task", "mortality")),
    Case("train/fold-out-of-range", t_extra("--fold", "6"), 2, ("--fold", "1..5", "6")),
    Case("train/bad-cohort", t_extra("--cohort", "all"), 2, ("--cohort", "'all'")),
    Case("train/bad-preset", t_replace("--preset", "fast"), 2, ("--preset", "'fast'")),
    Case("train/bad-precision", t_extra("--precision", "8"), 2, ("--precision", "'8'")),
    Case("train/dropout-above-one", t_extra("--cxr-dropout-train", "1.5"), 2, ("--cxr-dropout-train", "[0, 1]")),
    Case("train/override-without-value", t_extra("lr"), 2, ("override 'lr'", "expected key=value")),
    Case("train/override-unknown", t_extra("learning_rate=0.1"), 2, ("unknown option 'learning_rate'",)),
    Case("train/override-wrong-type", t_extra("max_epochs=many"), 2, ("'max_epochs'", "must be an integer")),
    Case("train/fold-not-a-number", t_extra("--fold", "one"), 2, ("carebench train", "'--fold'")),
    Case("train/out-is-a-file", t_out_is_file, 2, ("--out", "not a directory")),
    Case("train/matched-cohort-without-xrays", t_extra("--cohort", "matched", "max_epochs=1"), 2,
         ("the matched cohort needs the X-ray cache cxr.npy",)),
    Case("train/disk-full", t_disk_full, 1, ("runs/lstm_mortality_f1_s0_", "No space left on device",
                                             "nothing was written")),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- evaluate
def e_missing(env: Env) -> list[str]:
    return ["evaluate", str(env.tmp / "no-run")]


def e_checkpoint(content: Callable[[Env], bytes]) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        runs = env.copy_runs()
        run = runs / env.run_ids(runs)[0]
        (run / "checkpoint").write_bytes(content(env))
        return ["evaluate", str(run)]

    return setup


def _malicious_checkpoint(env: Env) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": {}, "epoch": _Payload(_pwned(env))}, buf)
    return buf.getvalue()


def e_out_folder_missing(env: Env) -> list[str]:
    return ["evaluate", str(env.runs / env.run_ids()[0]), "--out", str(env.tmp / "no" / "m.json")]


EVALUATE_CASES = [
    Case("evaluate/not-a-run", e_missing, 2, ("no-run/DONE", "missing", "finished run")),
    Case("evaluate/checkpoint-garbage", e_checkpoint(lambda env: b"\x00garbage" * 100), 2,
         ("/checkpoint", "not a loadable checkpoint")),
    Case("evaluate/checkpoint-runs-code", e_checkpoint(_malicious_checkpoint), 2,
         ("/checkpoint", "not a loadable checkpoint", "weights_only")),
    Case("evaluate/out-folder-missing", e_out_folder_missing, 2, ("--out", "does not exist")),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- benchmark
def _bench(
    env: Env, plan: str | Path, *extra: str, out: Path | None = None, data: Path | None = None
) -> list[str]:
    return ["benchmark", "--plan", str(plan), "--data", str(data or env.dataset), "--out",
            str(out or env.tmp / "bench"), *extra]  # fmt: skip


PLAN_OK = "name: tiny\npreset: test\nmodels: [lstm]\ntasks: [mortality]\nfolds: [1]\nseeds: [0]\n"


def b_plan(text: str, *extra: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return _bench(env, env.plan(text.replace("{pwned}", str(_pwned(env)))), *extra)

    return setup


def b_builtin(*extra: str, plan: str = "quick") -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return _bench(env, plan, *extra)

    return setup


def b_data_missing(env: Env) -> list[str]:
    return _bench(env, env.plan(PLAN_OK), data=env.tmp / "nowhere")


def b_busy(env: Env) -> list[str]:
    from carebench.runs import run_lock

    out = env.tmp / "bench"
    out.mkdir()
    lock = run_lock(out, "benchmark")
    assert lock.__enter__()  # another benchmark holds the runs folder
    env.cleanup.append(lambda: lock.__exit__(None, None, None))
    return _bench(env, env.plan(PLAN_OK), out=out)


def b_out_is_file(env: Env) -> list[str]:
    (env.tmp / "bench").write_text("a file")
    return _bench(env, env.plan(PLAN_OK))


def b_disk_full(env: Env) -> list[str]:
    """A runs folder of an earlier benchmark whose plan.yaml cannot be rewritten: the old one stays."""
    from carebench.runs import run_lock

    runs = env.copy_runs()
    (runs / "plan.yaml").write_text("name: before\n")
    with run_lock(runs, "benchmark"):  # the earlier benchmark's lock file
        pass
    env.disk_full(Path, "write_text", lambda self, *a, **k: self.name.startswith(".plan.yaml.tmp"))
    plan = env.plan(PLAN_OK.replace("seeds: [0]\n", "seeds: [0]\noverrides: {max_epochs: 1}\n"))
    return _bench(env, plan, out=runs)


BENCHMARK_CASES = [
    Case("benchmark/plan-missing", lambda env: _bench(env, env.tmp / "nope.yaml"), 2,
         ("--plan", "nope.yaml", "neither a built-in profile")),
    Case("benchmark/plan-not-yaml", b_plan("name: [unclosed\n"), 2, ("plan.yaml", "not valid YAML")),
    Case("benchmark/plan-python-tag", b_plan("name: !!python/object/apply:builtins.open ['{pwned}', 'w']\n"), 2,
         ("plan.yaml", "not valid YAML")),
    Case("benchmark/plan-unknown-key", b_plan(PLAN_OK + "modles: [lstm]\n"), 2, ("unknown key 'modles'",)),
    Case("benchmark/plan-unknown-model", b_plan(PLAN_OK.replace("[lstm]", "[lstn]")), 2,
         ("key 'models'", "unknown value 'lstn'")),
    Case("benchmark/plan-fold-out-of-range", b_plan(PLAN_OK.replace("folds: [1]", "folds: [0]")), 2,
         ("key 'folds'", "1..5")),
    Case("benchmark/plan-empty-grids", b_plan(PLAN_OK + "grids: []\n"), 2, ("key 'grids'", "non-empty list")),
    Case("benchmark/override-wrong-type", b_plan(PLAN_OK, "max_epochs=many"), 2, ("'max_epochs'", "integer")),
    Case("benchmark/override-grid-owned", b_plan(PLAN_OK, "fold=2"), 2, ("overrides.fold", "set by the grid")),
    Case("benchmark/data-missing", b_data_missing, 2, ("--data", "nowhere", "does not exist")),
    Case("benchmark/bad-executor", b_builtin("--executor", "slurm"), 2, ("--executor", "'slurm'")),
    Case("benchmark/zero-jobs", b_builtin("--jobs", "0"), 2, ("--jobs", ">= 1")),
    Case("benchmark/runs-folder-busy", b_busy, 2, ("--out", "another `carebench benchmark` is running")),
    Case("benchmark/out-is-a-file", b_out_is_file, 2, ("--out", "not a directory")),
    Case("benchmark/disk-full", b_disk_full, 1, ("plan.yaml: writing failed", "No space left on device",
                                                 "the previous plan.yaml is unchanged")),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- analyze
def _analyze(runs: Path, *extra: str) -> list[str]:
    return ["analyze", str(runs), *FAST_ANALYSIS_SKIP, *extra]


def a_runs(break_it: Callable[[Env, Path], None], *extra: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        runs = env.copy_runs()
        break_it(env, runs)
        return _analyze(runs, *extra)

    return setup


def _truncate(name: str) -> Callable[[Env, Path], None]:
    def go(env: Env, runs: Path) -> None:
        path = runs / env.run_ids(runs)[0] / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return go


def _nothing(env: Env, runs: Path) -> None:
    pass


def _all_predictions(env: Env, runs: Path) -> None:
    for rid in env.run_ids(runs):
        (runs / rid / "predictions.parquet").write_bytes(b"PAR1 not really")


def _probabilities_above_one(env: Env, runs: Path) -> None:
    path = runs / env.run_ids(runs)[1] / "predictions.parquet"
    frame = pd.read_parquet(path)
    frame["p_mortality"] = frame["p_mortality"] * 3
    frame.to_parquet(path, index=False)


def _config_python_tag(env: Env, runs: Path) -> None:
    path = runs / env.run_ids(runs)[0] / "config.yaml"
    path.write_text(f"x: !!python/object/apply:builtins.open ['{_pwned(env)}', 'w']\n" + path.read_text())


def _plan_garbage(env: Env, runs: Path) -> None:
    (runs / "plan.yaml").write_text("name: [unclosed\n")


def _other_dataset(env: Env, runs: Path) -> None:
    other = env.copy_dataset("other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["content_sha256"]["ehr.npy"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))


def a_other_dataset(env: Env) -> list[str]:
    runs = env.copy_runs()
    _other_dataset(env, runs)
    return _analyze(runs, "--data", str(env.tmp / "other"))


def _disk_full(env: Env, runs: Path) -> None:
    env.disk_full(pd.DataFrame, "to_parquet")


def a_label_groups(text: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        path = env.tmp / "groups.yaml"
        path.write_text(text.replace("{pwned}", str(_pwned(env))))
        return _analyze(env.runs, "--label-groups", str(path))

    return setup


ANALYZE_CASES = [
    Case("analyze/not-a-folder", lambda env: _analyze(env.tmp / "nowhere"), 2, ("nowhere", "not a directory")),
    Case("analyze/no-finished-runs", lambda env: (env.tmp / "r").mkdir() or _analyze(env.tmp / "r"), 2,
         ("no finished runs",)),
    Case("analyze/predictions-truncated", a_runs(_truncate("predictions.parquet")), 0,
         ("left out of the analysis", "predictions.parquet: unreadable"), new_ok=("runs/analysis",), line="note:"),
    Case("analyze/metrics-truncated", a_runs(_truncate("metrics.json")), 0,
         ("left out of the analysis", "metrics.json: unreadable"), new_ok=("runs/analysis",), line="note:"),
    Case("analyze/probabilities-not-probabilities", a_runs(_probabilities_above_one), 0,
         ("transformer_mortality", "column p_mortality", "not probabilities in [0, 1]"),
         new_ok=("runs/analysis",), line="note:"),
    Case("analyze/config-python-tag", a_runs(_config_python_tag), 0,
         ("left out of the analysis", "config.yaml: not valid YAML"), new_ok=("runs/analysis",), line="note:"),
    Case("analyze/every-run-corrupted", a_runs(_all_predictions), 2, ("no usable finished run", "predictions.parquet")),
    Case("analyze/confidence-above-one", lambda env: _analyze(env.runs, "--confidence", "1.5"), 2,
         ("--confidence", "(0, 1)", "1.5")),
    Case("analyze/zero-bootstrap", lambda env: ["analyze", str(env.runs), "--n-bootstrap", "0"], 2,
         ("--n-bootstrap", ">= 1")),
    Case("analyze/label-groups-missing", lambda env: _analyze(env.runs, "--label-groups", str(env.tmp / "g.json")),
         2, ("--label-groups", "g.json")),
    Case("analyze/label-groups-python-tag", a_label_groups("g: !!python/object/apply:builtins.open ['{pwned}', 'w']"),
         2, ("--label-groups", "groups.yaml")),
    Case("analyze/plan-record-corrupted", a_runs(_plan_garbage), 2, ("plan.yaml", "not valid YAML")),
    Case("analyze/data-of-another-dataset", a_other_dataset, 2,
         ("other", "not the dataset the runs were trained on")),
    Case("analyze/data-missing", lambda env: _analyze(env.runs, "--data", str(env.tmp / "nowhere")), 2,
         ("nowhere", "--data")),
    Case("analyze/disk-full", a_runs(_disk_full), 1,
         ("runs/analysis: writing failed", "No space left on device", "the previous analysis is unchanged")),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- report
def r_runs(break_it: Callable[[Env, Path], None], *extra: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        runs = env.copy_runs()
        break_it(env, runs)
        return ["report", str(runs), *[e.replace("TMP", str(env.tmp)) for e in extra]]

    return setup


def _no_analysis(env: Env, runs: Path) -> None:
    shutil.rmtree(runs / "analysis")


def _analysis_file(name: str, data: bytes | None) -> Callable[[Env, Path], None]:
    def go(env: Env, runs: Path) -> None:
        path = runs / "analysis" / name
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)

    return go


def _planted(text: str) -> Callable[[Env, Path], None]:
    def go(env: Env, runs: Path) -> None:
        (env.tmp / "planted.json").write_text(text)

    return go


def _report_disk_full(env: Env, runs: Path) -> None:
    env.disk_full(Path, "write_text", lambda self, *a, **k: self.name == "index.html")


REPORT_CASES = [
    Case("report/no-analysis", r_runs(_no_analysis), 2, ("runs/analysis", "no analysis found", "carebench analyze")),
    Case("report/table-missing", r_runs(_analysis_file("leaderboard.parquet", None)), 2,
         ("leaderboard.parquet", "missing", "re-run `carebench analyze")),
    Case("report/table-corrupted", r_runs(_analysis_file("runs.parquet", b"PAR1garbagePAR1")), 2,
         ("runs.parquet", "unreadable")),
    Case("report/summary-corrupted", r_runs(_analysis_file("summary.json", b"{not json")), 2,
         ("summary.json", "unreadable")),
    Case("report/planted-missing", r_runs(_nothing, "--planted", "TMP/none.json"), 2, ("--planted", "none.json")),
    Case("report/planted-malformed", r_runs(_planted('{"phenotypes": {"pheno_shock": "lungs"}}'), "--planted",
                                            "TMP/planted.json"), 2, ("--planted", "ehr, cxr, both or none")),
    Case("report/out-is-a-file", r_runs(_planted("x"), "--out", "TMP/planted.json"), 2,
         ("planted.json", "not a directory")),
    Case("report/disk-full", r_runs(_report_disk_full), 1,
         ("runs/report: writing failed", "No space left on device", "the previous report is unchanged")),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- synth
SYNTH_CASES = [
    Case("synth/zero-stays", lambda env: ["synth", "--out", str(env.tmp / "s"), "--stays", "0", "--seed", "0"], 2,
         ("--stays 0", "1..1000000")),
    Case("synth/cxr-rate-above-one", lambda env: ["synth", "--out", str(env.tmp / "s"), "--stays", "9", "--seed",
                                                  "0", "--cxr-rate", "2"], 2, ("--cxr-rate", "0.01..0.95")),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- tune
# ----------------------------------------------------------------------------------------------- tune
# Two `carebench tune` processes on one study are not a fault: they share it by design (docs/tuning.md), so there is
# no "busy" case here; tests/test_tuning.py runs parallel workers on one study.
def _tune(env: Env, *extra: str, out: Path | None = None) -> list[str]:
    base = ["tune", "--data", str(env.dataset), "--model", "lstm", "--task", "mortality", "--trials", "2"]
    return [*base, "--preset", "test", "--out", str(out or env.tmp / "study"), "--threads", "1", *extra]


def u_replace(flag: str, value: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        args = _tune(env)
        args[args.index(flag) + 1] = value
        return args

    return setup


def u_extra(*extra: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return _tune(env, *extra)

    return setup


def u_space(text: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        path = env.tmp / "space.yaml"
        path.write_text(text.replace("PWNED", str(_pwned(env))))
        return _tune(env, "--space", str(path))

    return setup


def u_data_missing(env: Env) -> list[str]:
    args = _tune(env)
    args[args.index("--data") + 1] = str(env.tmp / "nowhere")
    return args


def u_out_is_file(env: Env) -> list[str]:
    (env.tmp / "study").write_text("a file")
    return _tune(env)


def u_disk_full(env: Env) -> list[str]:
    """A study with one complete trial; continuing it finds the disk full when the next trial writes its record."""
    from carebench.tuning import tune

    tune(data=env.dataset, model="lstm", task="mortality", out=env.tmp / "study", trials=1, preset="test",
         threads=1, overrides={"max_epochs": 1})  # fmt: skip
    env.disk_full(pd.DataFrame, "to_parquet")

    # after the command: trial 0 is untouched, trial 1 failed and was re-queued with its parameters
    def intact() -> None:
        t = optuna_trials(env.tmp / "study")
        assert [x.state.name for x in t] == ["COMPLETE", "FAIL", "WAITING"], t
        assert t[0].datetime_complete == first.datetime_complete and t[0].value == first.value
        assert t[2].params == t[1].params and t[1].user_attrs["failure"].startswith(
            "its run record could not"
        )

    first = optuna_trials(env.tmp / "study")[0]
    env.cleanup.append(intact)
    return _tune(env, "max_epochs=1")


def optuna_trials(out: Path) -> list:
    import optuna

    return optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}").trials


TUNE_CASES = [
    Case("tune/unknown-model", u_replace("--model", "lsmt"), 2, ("--model", "unknown model 'lsmt'")),
    Case("tune/unknown-task", u_replace("--task", "death"), 2, ("--task", "'death'")),
    Case("tune/zero-trials", u_replace("--trials", "0"), 2, ("--trials must be >= 1", "got 0")),
    Case("tune/fold-out-of-range", u_extra("--fold", "9"), 2, ("--fold must be",)),
    Case("tune/data-missing", u_data_missing, 2, ("--data", "nowhere", "does not exist")),
    Case("tune/out-is-a-file", u_out_is_file, 2, ("--out", "study")),
    Case("tune/space-not-yaml", u_space("hidden: ["), 2, ("--space", "not valid YAML")),
    Case("tune/space-python-tag", u_space("x: !!python/object/apply:builtins.open ['PWNED', 'w']"), 2,
         ("--space", "space.yaml")),
    Case("tune/space-empty", u_space(""), 2, ("--space", "empty search space")),
    Case("tune/space-unknown-hparam", u_space("hiddden: {type: int, low: 1, high: 2}"), 2,
         ("--space", "unknown hyper-parameter 'hiddden'")),
    Case("tune/space-empty-range", u_space("dropout: {type: float, low: 0.5, high: 0.1}"), 2,
         ("--space", "['dropout']", "needs low < high")),
    Case("tune/space-bad-type", u_space("dropout: {type: gaussian}"), 2, ("--space", "'type' must be one of")),
    Case("tune/storage-cannot-open", u_extra("--storage", "notadatabase://x"), 2,
         ("--storage notadatabase://x", "cannot open it")),
    Case("tune/storage-dir-missing", u_extra("--storage", "sqlite:////nonexistent-dir/deeper/study.db"), 2,
         ("--storage sqlite:////nonexistent-dir",)),
    Case("tune/disk-full", u_disk_full, 1, ("No space left on device",), new_ok=("study/study.db", "study/trials/.locks")),
]  # fmt: skip


CASES = (
    PREPARE_CASES + DESCRIBE_CASES + TRAIN_CASES + EVALUATE_CASES + BENCHMARK_CASES + ANALYZE_CASES
    + REPORT_CASES + SYNTH_CASES + TUNE_CASES
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- the contract
def _tree(root: Path) -> dict[str, str]:
    """Every entry under `root` -> its content digest (files), link target (symlinks) or 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_the_table_is_large_and_ids_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split("/")[0] for c in CASES} >= {"prepare", "train", "benchmark", "analyze", "report"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, tmp_path, demo_root, prepared_demo, finished_runs, monkeypatch):
    env = Env(tmp_path / "case", demo_root, prepared_demo, finished_runs, monkeypatch)
    env.tmp.mkdir()
    shared_before = {"dataset": _tree(prepared_demo), "runs": _tree(finished_runs)}
    try:
        args = case.setup(env)
        before = _tree(env.tmp)
        res = CliRunner().invoke(app, args)
    finally:
        monkeypatch.undo()
        for fn in env.cleanup:
            fn()
    err = res.stderr
    assert res.exit_code == case.code, (res.exit_code, err[-3000:], res.exception)
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    if case.line == "error:":
        assert len(errors) == 1, err[-3000:]
        assert err.strip().splitlines()[-1] == errors[0]  # the error is the last line
        found = errors[0]
    else:
        assert errors == [], err[-3000:]
        found = next((ln for ln in err.splitlines() if ln.startswith(case.line) and case.expect[0] in ln), "")
    for text in case.expect:
        assert text in found, (text, found, err[-2000:])

    after = _tree(env.tmp)
    allowed = lambda rel: any(rel == a or rel.startswith(a + "/") for a in case.new_ok)  # noqa: E731
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and not allowed(k))
    assert changed == [], f"left behind or changed: {changed}"
    assert not _pwned(env).exists()
    assert {"dataset": _tree(prepared_demo), "runs": _tree(finished_runs)} == shared_before
    if case.new_ok:
        assert all(any(k == a or k.startswith(a + "/") for k in after) for a in case.new_ok)


def test_the_payloads_are_live():
    """The code-carrying pickle and YAML of the table would run if loaded unsafely: the cases can fail."""
    import io
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "pwned"
        buf = io.BytesIO()
        torch.save({"epoch": _Payload(target)}, buf)
        buf.seek(0)
        torch.load(buf, weights_only=False)
        assert target.exists()
        target.unlink()
        yaml.load(f"x: !!python/object/apply:builtins.open ['{target}', 'w']", Loader=yaml.UnsafeLoader)
        assert target.exists()
        target.unlink()
        pickle.loads(pickle.dumps(_Payload(target)))
        assert target.exists()


def test_no_unsafe_loading_in_the_source():
    """Configuration with safe YAML only, checkpoints with weights_only, arrays without pickles, no pickle.load."""
    src = Path(__file__).resolve().parents[1] / "src" / "carebench"
    hits = []
    for path in src.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            bad = (
                ("yaml.load(" in code or "yaml.unsafe_load" in code or "yaml.full_load" in code)
                or ("torch.load(" in code and "weights_only=True" not in code)
                or "allow_pickle=True" in code
                or "pickle.load" in code
            )
            if bad:
                hits.append(f"{path.relative_to(src)}:{n}: {line.strip()}")
    assert hits == []
    assert sum("torch.load(" in p.read_text() for p in src.rglob("*.py")) >= 3  # the check sees the loads
