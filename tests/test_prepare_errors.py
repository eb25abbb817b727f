"""Bad input to `carebench prepare`: one clear line on stderr naming the file/column/option, a non-zero exit
code, and nothing left behind (no output directory, no temporary directory beside it).

Fixtures are the demo's tables symlinked into tmp_path, with the one table under test rewritten by pandas.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from carebench.cli import app

TABLES = {
    "hosp": ["patients", "admissions", "labevents", "diagnoses_icd"],
    "icu": ["icustays", "chartevents", "outputevents"],
}


@pytest.fixture
def raw(demo_root, tmp_path) -> Path:
    """A MIMIC-IV root whose tables are symlinks to the demo's (replace one to break it)."""
    root = tmp_path / "mimic-iv"
    for module, names in TABLES.items():
        (root / module).mkdir(parents=True)
        for name in names:
            os.symlink(demo_root / module / f"{name}.csv.gz", root / module / f"{name}.csv.gz")
    return root


def _replace(root: Path, module: str, name: str, df: pd.DataFrame) -> Path:
    path = root / module / f"{name}.csv.gz"
    path.unlink()
    df.to_csv(path, index=False)
    return path


def _read(demo_root: Path, module: str, name: str) -> pd.DataFrame:
    return pd.read_csv(demo_root / module / f"{name}.csv.gz", dtype=str, keep_default_na=False)


def _run_failing(tmp_path: Path, args: list[str], *must_contain: str) -> str:
    """Run prepare into a fresh parent directory; check the failure contract; return the error line."""
    parent = tmp_path / "outputs"
    parent.mkdir(exist_ok=True)
    before = sorted(os.listdir(parent))
    out = parent / "data"
    res = CliRunner().invoke(app, ["prepare", *args, "--out", str(out)])
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1] == errors[0]  # the error is the last, single line
    for text in must_contain:
        assert text in errors[0], errors[0]
    assert not out.exists()
    assert sorted(os.listdir(parent)) == before  # no .data.tmp-* left behind
    return errors[0]


def test_missing_required_table(raw, tmp_path):
    (raw / "hosp" / "admissions.csv.gz").unlink()
    _run_failing(
        tmp_path,
        ["--mimic-iv", str(raw)],
        "required table hosp/admissions not found",
        "hosp/admissions.csv.gz",
    )


def test_missing_column(raw, demo_root, tmp_path):
    path = _replace(
        raw, "hosp", "admissions", _read(demo_root, "hosp", "admissions").drop(columns="deathtime")
    )
    _run_failing(tmp_path, ["--mimic-iv", str(raw)], str(path), "missing column 'deathtime'")


def test_garbage_gzip(raw, tmp_path):
    path = raw / "icu" / "icustays.csv.gz"
    path.unlink()
    path.write_bytes(b"this is not gzip data\n" * 50)
    _run_failing(tmp_path, ["--mimic-iv", str(raw)], str(path), "gzip")


def test_truncated_gzip(raw, demo_root, tmp_path):
    """The header reads fine; the stream ends half-way through chartevents, found while extracting."""
    path = raw / "icu" / "chartevents.csv.gz"
    path.unlink()
    data = (demo_root / "icu" / "chartevents.csv.gz").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with gzip.open(path, "rt") as fh:
        assert fh.readline().startswith("subject_id")
    _run_failing(tmp_path, ["--mimic-iv", str(raw)], str(path), "GZIP")


def test_unparseable_value(raw, demo_root, tmp_path):
    df = _read(demo_root, "hosp", "patients")
    df.loc[5, "anchor_age"] = "abc"
    path = _replace(raw, "hosp", "patients", df)
    _run_failing(tmp_path, ["--mimic-iv", str(raw)], str(path), 'column "anchor_age"', '"abc"')


def test_empty_cohort(raw, demo_root, tmp_path):
    df = _read(demo_root, "icu", "icustays")
    df["outtime"] = (pd.to_datetime(df["intime"]) + pd.Timedelta(hours=47)).dt.strftime("%Y-%m-%d %H:%M:%S")
    _replace(raw, "icu", "icustays", df)
    _run_failing(
        tmp_path,
        ["--mimic-iv", str(raw)],
        "no ICU stay passes the cohort rules",
        "los_ge_48h 0",
        "icu/icustays",
    )


def test_duplicate_stay(raw, demo_root, tmp_path):
    df = _read(demo_root, "icu", "icustays")
    _replace(raw, "icu", "icustays", pd.concat([df, df.iloc[[3]]]))
    _run_failing(tmp_path, ["--mimic-iv", str(raw)], "icu/icustays: stay_id", "appears 2 times")


def test_non_existent_paths(raw, tmp_path):
    _run_failing(tmp_path, ["--mimic-iv", str(tmp_path / "nowhere")], "--mimic-iv", "path does not exist")
    _run_failing(
        tmp_path,
        ["--mimic-iv", str(raw), "--mimic-cxr", str(tmp_path / "nocxr")],
        "--mimic-cxr",
        "path does not exist",
    )


@pytest.mark.parametrize(
    "option,value,expected",
    [
        ("--threads", "0", "expected a positive integer"),
        ("--memory-limit", "lots", "expected a size such as 8GB"),
        ("--image-size", "4", "expected a number of pixels >= 8"),
        ("--cxr-lookback-hours", "-1", "expected a number of hours >= 0"),
    ],
)
def test_bad_options(raw, tmp_path, option, value, expected):
    _run_failing(tmp_path, ["--mimic-iv", str(raw), option, value], option, expected)


def test_existing_output_is_kept_without_overwrite(raw, tmp_path):
    out = tmp_path / "outputs" / "data"
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    res = CliRunner().invoke(app, ["prepare", "--mimic-iv", str(raw), "--out", str(out)])
    assert res.exit_code == 2 and "already exists (pass --overwrite" in res.stderr
    res = CliRunner().invoke(app, ["prepare", "--mimic-iv", str(raw), "--out", str(out), "--overwrite"])
    assert res.exit_code == 2 and "not a carebench dataset" in res.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(out.parent)) == ["data"]


def test_failed_overwrite_keeps_the_old_dataset(raw, demo_root, tmp_path, prepared_demo):
    """A run that fails after starting must not destroy the dataset it was asked to replace."""
    out = tmp_path / "outputs" / "data"
    out.mkdir(parents=True)
    for f in prepared_demo.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (raw / "icu" / "icustays.csv.gz").unlink()
    (raw / "icu" / "icustays.csv.gz").write_bytes(b"garbage")
    res = CliRunner().invoke(app, ["prepare", "--mimic-iv", str(raw), "--out", str(out), "--overwrite"])
    assert res.exit_code == 2 and "icustays.csv.gz" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in prepared_demo.iterdir())
    assert (out / "ehr.npy").read_bytes() == (prepared_demo / "ehr.npy").read_bytes()
    assert sorted(os.listdir(out.parent)) == ["data"]


def test_memory_limit_too_small(raw, tmp_path):
    """DuckDB's out-of-memory error points at the option, not at the data."""
    _run_failing(
        tmp_path,
        ["--mimic-iv", str(raw), "--memory-limit", "20MB", "--threads", "1"],
        "--memory-limit 20MB",
        "ran out of memory",
    )
