"""Interrupted work: a SIGKILLed `prepare` or `benchmark` is re-run to the result of an uninterrupted one, the
debris of the dead process is cleaned, and nothing that carebench did not write (or that a live process is
writing) is touched. Also the pieces: owner markers, the interrupted swap, a failed write.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from carebench import atomic
from carebench.data import store

CAREBENCH = str(Path(sys.executable).with_name("carebench"))
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def _ours(parent: Path, name: str, pid: int) -> list[Path]:
    out = []
    for p in parent.glob(f".{name}.tmp-*"):
        try:
            if json.loads((p / atomic.MARKER).read_text())["pid"] == pid:
                out.append(p)
        except (OSError, ValueError):
            pass
    return out


def test_prepare_killed_then_rerun_cleans_only_its_debris_and_gives_the_same_dataset(
    demo_root, prepared_demo, tmp_path
):
    out = tmp_path / "data"
    # next to --out: a folder we did not write, one a live process of ours is writing, one of another host
    foreign = tmp_path / ".data.tmp-foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not carebench's")
    live = tmp_path / ".data.tmp-live"
    live.mkdir()
    (live / atomic.MARKER).write_text(json.dumps(atomic.owner()))  # this test process: alive
    remote = tmp_path / ".data.tmp-remote"
    remote.mkdir()
    (remote / atomic.MARKER).write_text(
        json.dumps({"host": "another-node", "pid": _dead_pid(), "started": 0})
    )

    cmd = [CAREBENCH, "prepare", "--mimic-iv", str(demo_root), "--out", str(out), "--threads", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    _wait_for(lambda: _ours(tmp_path, "data", proc.pid), proc, "its temporary folder appeared")
    time.sleep(0.3)  # mid-way through the stages
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    debris = _ours(tmp_path, "data", proc.pid)
    assert len(debris) == 1 and not out.exists()

    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "removed 1 temporary folder(s)" in again.stderr
    assert not debris[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["data", ".data.tmp-foreign", ".data.tmp-live", ".data.tmp-remote"]
    )
    assert (foreign / "notes.txt").read_text() == "not carebench's"
    assert (live / atomic.MARKER).is_file() and (remote / atomic.MARKER).is_file()
    digests = json.loads((out / store.MANIFEST).read_text())["content_sha256"]
    assert digests == json.loads((prepared_demo / store.MANIFEST).read_text())["content_sha256"]
    assert not (out / atomic.MARKER).exists()


def test_a_swap_cut_between_its_two_renames_is_restored_or_finished(tmp_path):
    out = tmp_path / "d"
    host = socket.gethostname()
    # killed after the old folder was moved aside and before the new one took its place: the old one comes back
    old = tmp_path / f".d.old-{_dead_pid()}@{host}"
    old.mkdir()
    (old / "f").write_text("previous")
    assert atomic.clean_stale(out) == [old]
    assert (out / "f").read_text() == "previous" and not old.exists()
    # killed after the new one took its place: only the old copy is left to delete
    old.mkdir()
    (old / "f").write_text("older")
    assert atomic.clean_stale(out) == [old] and (out / "f").read_text() == "previous"
    # a live process's swap, another host's, and a name we do not make are left alone
    mine = tmp_path / f".d.old-{os.getpid()}@{host}"
    theirs = tmp_path / f".d.old-{_dead_pid()}@another-node"
    odd = tmp_path / ".d.old-backup"
    for p in (mine, theirs, odd):
        p.mkdir()
    assert atomic.clean_stale(out) == []
    assert mine.is_dir() and theirs.is_dir() and odd.is_dir()


def test_a_reused_pid_counts_as_gone(tmp_path):
    info = atomic.owner()
    assert not atomic.owner_gone(info)
    assert atomic.owner_gone({**info, "started": info["started"] - 1000})  # same pid, another process
    assert atomic.owner_gone({**info, "pid": _dead_pid()})
    assert not atomic.owner_gone({**info, "host": "another-node", "pid": _dead_pid()})


def test_a_failed_write_keeps_the_previous_content_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "runs.csv"
    target.write_text("previous\n")

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(
        atomic.OutputError, match=r"runs.csv: writing failed: No space left on device.*previous runs"
    ):
        atomic.write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]

    # a directory: the parents created for it go too, and a previous one stays
    out = tmp_path / "a" / "b" / "report"
    with pytest.raises(atomic.OutputError, match="nothing was written"), atomic.output_dir(out) as tmp:
        (tmp / "x").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / "a").exists()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "index.html").write_text("old report")
    with pytest.raises(atomic.OutputError, match="the previous r is unchanged"):
        with atomic.output_dir(tmp_path / "r", overwrite=True) as tmp:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert (tmp_path / "r" / "index.html").read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "runs.csv"]


def test_a_stale_temporary_file_of_a_dead_process_is_removed(tmp_path):
    host = socket.gethostname()
    stale = tmp_path / f".runs.csv.tmp-{_dead_pid()}@{host}"
    alive = tmp_path / f".runs.csv.tmp-{os.getppid()}@{host}"  # another live process
    stale.write_text("half")
    alive.write_text("being written")
    atomic.write_text(tmp_path / "runs.csv", "ok\n")
    assert not stale.exists() and alive.exists() and (tmp_path / "runs.csv").read_text() == "ok\n"


# ------------------------------------------------------------------------------------------------ benchmark
STABLE = ("test", "val_best", "best_epoch", "epochs_trained", "splits", "normalisation", "n_parameters")


@pytest.mark.slow
def test_benchmark_killed_twice_resumes_to_the_uninterrupted_results(tmp_path):
    """Killed before any run finished, then again right after a run was recorded: the third invocation ends
    with the same run ids, metrics and predictions as an uninterrupted benchmark, and no debris."""
    from carebench.experiments import load_plan, read_index, run_benchmark
    from fake_dataset import make_fake_dataset

    data = make_fake_dataset(tmp_path, n=90, with_cxr=False, n_features=3, seed=5)
    plan_file = tmp_path / "p.yaml"
    plan_file.write_text(
        yaml.safe_dump(
            {
                "name": "kill",
                "preset": "test",
                "models": ["lstm"],
                "tasks": ["mortality"],
                "folds": [1],
                "seeds": [0, 1, 2],
                "overrides": {"max_epochs": 2},
            }
        )
    )
    reference = tmp_path / "ref"
    summary = run_benchmark(load_plan(plan_file), data, reference, jobs=1, threads=1)
    assert summary.ok and summary.done == 3
    run_ids = sorted(p.name for p in reference.iterdir() if (p / "DONE").is_file())

    runs = tmp_path / "killed"
    cmd = [CAREBENCH, "benchmark", "--plan", str(plan_file), "--data", str(data), "--out", str(runs),
           "--jobs", "1", "--threads", "1"]  # fmt: skip

    def done() -> int:
        return len(list(runs.glob("*/DONE")))

    def kill(proc: subprocess.Popen) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    _wait_for(lambda: list(runs.glob(".*.partial")), proc, "the first run started")
    kill(proc)
    assert done() == 0 and list(runs.glob(".*.partial"))

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    _wait_for(lambda: done() >= 1, proc, "a run finished")
    kill(proc)
    assert 1 <= done() < 3

    final = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert sorted(p.name for p in runs.iterdir() if (p / "DONE").is_file()) == run_ids
    leftovers = [p.name for p in runs.iterdir() if p.name.startswith(".") and p.name != ".locks"]
    assert leftovers == [] and not (runs / "failed").exists()
    assert list(read_index(runs).status) == ["done"] * 3
    for rid in run_ids:
        got, want = (json.loads((d / rid / "metrics.json").read_text()) for d in (runs, reference))
        assert {k: got[k] for k in STABLE} == {k: want[k] for k in STABLE}
        pd.testing.assert_frame_equal(
            pd.read_parquet(runs / rid / "predictions.parquet"),
            pd.read_parquet(reference / rid / "predictions.parquet"),
        )
