"""Benchmark runner: skip finished runs, survive SIGKILL, same results in parallel and on Ray, failures recorded.

One small plan (2 models x mortality x fold 1 x seeds 0/1 = 4 runs at the `test` preset) is run uninterrupted
once (the reference); every other way of running it must give identical metrics and predictions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from carebench.analysis.pooling import load_runs, recorded_predictions
from carebench.cli import app
from carebench.experiments import executors, load_plan, read_index, run_benchmark
from carebench.experiments.executors import WORKER
from carebench.experiments.plan import expand_plan
from carebench.experiments.runner import BenchmarkBusyError, EtaEstimator
from carebench.runs import clean_partials, find_runs, finished_run_ids, run_lock
from carebench.training import TrainConfig
from fake_dataset import make_fake_dataset

CAREBENCH = str(Path(sys.executable).with_name("carebench"))
PLAN = {
    "name": "small",
    "preset": "test",
    "models": ["lstm", "latefusion"],
    "tasks": ["mortality"],
    "folds": [1],
    "seeds": [0, 1],
    "overrides": {"max_epochs": 3},
}
STABLE = ("test", "val_best", "best_epoch", "epochs_trained", "splits", "normalisation", "n_parameters")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    data = make_fake_dataset(root, n=150, image_size=16, n_features=4, seed=3)
    plan_file = root / "small.yaml"
    plan_file.write_text(yaml.safe_dump(PLAN))
    plan = load_plan(plan_file)
    run_ids = [c.run_id for c in expand_plan(plan, data)]
    return root, data, plan_file, plan, run_ids


@pytest.fixture(scope="module")
def reference(setup):
    """The plan run uninterrupted, one job, one thread."""
    root, data, _, plan, _ = setup
    summary = run_benchmark(plan, data, root / "ref", jobs=1, threads=1)
    assert (summary.planned, summary.skipped, summary.done, summary.failed) == (4, 0, 4, [])
    return root / "ref"


def _record(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: metrics[k] for k in STABLE}, pd.read_parquet(run_dir / "predictions.parquet")


def assert_complete_and_equal(runs: Path, run_ids: list[str], data: Path, reference: Path) -> None:
    """Exactly the plan's runs, each complete, nothing half-written, identical to the reference."""
    entries = {p.name for p in runs.iterdir()}
    assert {p for p in entries if (runs / p).is_dir() and not p.startswith(".")} == set(run_ids)
    assert not [p for p in entries if p.endswith(".partial")] and "failed" not in entries
    assert not (runs / ".logs").exists()
    cohort = pd.read_parquet(data / "cohort.parquet")
    test_stays = set(cohort.loc[(cohort.fold == 1) & cohort.label_mortality.notna(), "stay_id"])
    for rid in run_ids:
        d = runs / rid
        for name in ("DONE", "config.yaml", "metrics.json", "predictions.parquet", "checkpoint"):
            assert (d / name).is_file(), f"{rid}: {name} missing"
        recorded = TrainConfig.from_yaml(d / "config.yaml")
        assert recorded.run_id == rid and recorded.threads == 1  # the job's threads, recorded, not hashed
        metrics, preds = _record(d)
        assert len(preds) == len(test_stays) and set(preds.stay_id) == test_stays
        ref_metrics, ref_preds = _record(reference / rid)
        assert metrics == ref_metrics
        pd.testing.assert_frame_equal(preds, ref_preds)
    index = read_index(runs)
    assert list(index.run_id) == run_ids and set(index.status) == {"done"}
    recorded = yaml.safe_load((runs / "plan.yaml").read_text())
    assert recorded["n_runs"] == len(run_ids) and recorded["name"] == "small"


def test_reference_run_and_second_invocation_launches_nothing(setup, reference, monkeypatch):
    _, data, _, plan, run_ids = setup
    assert_complete_and_equal(reference, run_ids, data, reference)
    index = read_index(reference)
    assert list(index.columns[:6]) == ["run_id", "model", "task", "cohort", "fold", "seed"]
    assert list(zip(index.model, index.seed, strict=True)) == [
        ("lstm", 0),
        ("latefusion", 0),
        ("lstm", 1),
        ("latefusion", 1),
    ]

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started although every run is finished")

    monkeypatch.setattr(executors.LocalExecutor, "_spawn", no_workers)
    before = {rid: (reference / rid / "DONE").stat().st_mtime_ns for rid in run_ids}
    again = run_benchmark(plan, data, reference, jobs=2)
    assert (again.planned, again.skipped, again.done, again.failed, again.not_run) == (4, 4, 0, [], 0)
    assert {rid: (reference / rid / "DONE").stat().st_mtime_ns for rid in run_ids} == before


def _workers_of(runs: Path) -> list[int]:
    """Live local workers writing to `runs` (from /proc)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if WORKER.encode() in cmd and str(runs).encode() in cmd:
                pids.append(int(p.name))
    return pids


def test_sigkill_mid_run_then_restart_finishes_with_identical_results(setup, reference):
    root, data, plan_file, _, run_ids = setup
    runs = root / "killed"
    cmd = [
        CAREBENCH,
        "benchmark",
        "--plan",
        str(plan_file),
        "--data",
        str(data),
        "--out",
        str(runs),
        "--jobs",
        "1",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:  # kill while a later run is half-written: one DONE record and one .partial directory
        done = [r for r in run_ids if (runs / r / "DONE").is_file()]
        partial = list(runs.glob(".*.partial")) if runs.is_dir() else []
        if done and partial and len(done) < len(run_ids):
            break
        if proc.poll() is not None:
            pytest.fail(
                f"the benchmark ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            )
        assert time.monotonic() < deadline, "no run finished within 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert list(runs.glob(".*.partial")), "the kill should leave a half-written run behind"
    if sys.platform.startswith("linux"):  # the worker dies with the benchmark (PR_SET_PDEATHSIG)
        for _ in range(100):
            if not _workers_of(runs):
                break
            time.sleep(0.05)
        assert _workers_of(runs) == []

    restarted = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "removed 1 unfinished run directory" in restarted.stderr
    assert_complete_and_equal(runs, run_ids, data, reference)


def test_a_half_written_run_is_neither_pooled_nor_skipped(setup, reference):
    """A run folder without DONE (a run killed before it finished, as an older layout could leave) is not a run:
    the readers do not pool it and resume trains it again, with the same result as the uninterrupted run."""
    root, data, _, plan, run_ids = setup
    half = root / "half"
    shutil.copytree(reference, half)
    (half / run_ids[1] / "DONE").unlink()
    assert [r.run_id for r in find_runs(half)] == sorted(run_ids[:1] + run_ids[2:])
    assert finished_run_ids(half) == sorted(run_ids[:1] + run_ids[2:])
    pooled = recorded_predictions(load_runs(half))
    assert set(pooled.run_id) == set(run_ids) - {run_ids[1]}
    summary = run_benchmark(plan, data, half, jobs=1, threads=1)
    assert (summary.planned, summary.skipped, summary.done, summary.failed) == (4, 3, 1, [])
    assert_complete_and_equal(half, run_ids, data, reference)


def test_parallel_jobs_give_the_same_results(setup, reference):
    root, data, _, plan, run_ids = setup
    summary = run_benchmark(plan, data, root / "parallel", jobs=2, threads=1)
    assert (summary.done, summary.jobs, summary.threads, summary.failed) == (4, 2, 1, [])
    assert_complete_and_equal(root / "parallel", run_ids, data, reference)


def test_failed_runs_are_recorded_and_do_not_stop_the_others(tmp_path):
    data = make_fake_dataset(tmp_path, n=60, with_cxr=False, n_features=3, seed=4)  # no X-ray cache at all
    plan_file = tmp_path / "p.yaml"
    plan_file.write_text(
        yaml.safe_dump(
            {
                "name": "mixed",
                "preset": "test",
                "models": ["lstm"],
                "tasks": ["mortality"],
                "cohorts": ["matched", "base"],
            }
        )
    )
    runs = tmp_path / "runs"
    res = CliRunner().invoke(
        app, ["benchmark", "--plan", str(plan_file), "--data", str(data), "--out", str(runs)]
    )
    assert res.exit_code == 1, res.output
    matched, base = (c.run_id for c in expand_plan(load_plan(plan_file), data))
    assert (runs / base / "DONE").is_file() and not (runs / matched).exists()
    log = (runs / "failed" / f"{matched}.log").read_text()
    assert "Traceback" in log and "the matched cohort needs the X-ray cache cxr.npy" in log
    index = read_index(runs).set_index("run_id")
    assert index.loc[base, "status"] == "done" and index.loc[matched, "status"] == "failed"
    assert "cxr.npy" in index.loc[matched, "error"]
    # a second invocation retries only the failed run
    again = run_benchmark(load_plan(plan_file), data, runs, jobs=1)
    assert (again.skipped, again.done, [o.run_id for o in again.failed]) == (1, 0, [matched])


def test_one_benchmark_per_runs_directory(setup, tmp_path):
    _, data, _, plan, _ = setup
    with run_lock(tmp_path, "benchmark") as held:
        assert held
        with pytest.raises(BenchmarkBusyError, match="another `carebench benchmark` is running"):
            run_benchmark(plan, data, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]  # nothing written by the refused benchmark


def test_stale_partials_are_removed_unless_a_live_process_holds_the_run(tmp_path):
    (tmp_path / ".abc_1.partial" / "log").mkdir(parents=True)
    (tmp_path / ".abc_2.partial").mkdir()
    with run_lock(tmp_path, "abc_2"):
        assert clean_partials(tmp_path) == ["abc_1"]
    assert not (tmp_path / ".abc_1.partial").exists() and (tmp_path / ".abc_2.partial").is_dir()
    assert clean_partials(tmp_path) == ["abc_2"]


def test_eta_from_finished_run_durations():
    eta = EtaEstimator({"a": "lstm", "b": "lstm", "c": "medfuse", "d": "medfuse"}, jobs=2)
    assert eta.seconds() is None  # nothing finished yet
    eta.started("a")
    eta.finished("a", 10.0)
    assert eta.seconds() == pytest.approx((10 + 10 + 10) / 2)  # medfuse unknown: the overall mean
    eta.started("c")
    eta.finished("c", 40.0)
    assert eta.seconds() == pytest.approx((10 + 40) / 2)  # b like lstm, d like medfuse
    eta.started("b")
    assert eta.seconds() == pytest.approx((10 + 40) / 2, abs=0.5)  # b just started: ~10 s still to go
    eta.finished("b", 12.0)
    assert eta.seconds() == pytest.approx(40.0)  # one run left: one slot


def test_bad_executor_options(setup, tmp_path):
    _, data, plan_file, _, _ = setup
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "benchmark",
            "--plan",
            str(plan_file),
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--executor",
            "slurm",
        ],
    )
    assert res.exit_code == 2 and "--executor must be one of local, ray" in res.output
    res = runner.invoke(
        app,
        ["benchmark", "--plan", str(plan_file), "--data", str(data), "--out", str(tmp_path), "--jobs", "0"],
    )
    assert res.exit_code == 2 and "--jobs must be >= 1" in res.output
    assert not list(tmp_path.iterdir())  # nothing written before the options are checked


@pytest.mark.slow  # starting Ray (GCS, raylet, workers) costs 15-90 s on a busy 2-core machine
def test_ray_executor_on_a_local_ray_instance(setup, reference):
    import ray  # the `ray` extra is part of the test environment (make test): this test must run, not skip

    root, data, _, plan, run_ids = setup
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_benchmark(plan, data, root / "ray", executor="ray", jobs=2, threads=1)
    finally:
        ray.shutdown()
    assert (summary.executor, summary.done, summary.failed, summary.jobs, summary.threads) == (
        "ray",
        4,
        [],
        2,
        1,
    )
    assert_complete_and_equal(root / "ray", run_ids, data, reference)


def test_ray_executor_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(executors.ExecutorError, match=r"pip install 'carebench\[ray\]'"):
        executors.make_executor("ray", jobs=2)
