"""carebench tune: the test split is never built (data layer), trials are runs, studies resume, workers share a
study, bad input is one error line and nothing written, plans use the best trial, the analysis tests it after.

One small fake dataset (150 stays, fold 1: test = fold 1, validation = fold 2) and a small search space over the
lstm baseline at the `test` preset, so a trial takes about a second.
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

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from carebench import runs
from carebench.cli import app
from carebench.data.folds import LoadingError, fold_roles
from carebench.data.loading import build_fold
from carebench.data.store import open_dataset
from carebench.errors import UserError
from carebench.experiments import PlanError, load_plan, parse_plan, run_benchmark
from carebench.models import create_model, get_model_class, list_models
from carebench.training import TrainConfig, train_run
from carebench.training.config import resolve_config
from carebench.tuning import study as st
from carebench.tuning.runner import tune
from fake_dataset import make_fake_dataset

CAREBENCH = str(Path(sys.executable).with_name("carebench"))
SPACE = {
    "hidden": {"type": "categorical", "choices": [8, 16]},
    "layers": {"type": "int", "low": 1, "high": 2},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("tune")
    make_fake_dataset(r, n=150, image_size=16, n_features=4, seed=3)
    (r / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return r


def _tune(root: Path, out: Path, trials: int, data: Path | None = None, **kw):
    return tune(
        data=data or root / "data",
        model="lstm",
        task="mortality",
        out=out,
        trials=trials,
        preset="test",
        space_file=root / "space.yaml",
        threads=1,
        **kw,
    )


def _study(out: Path):
    spec, label = st.read_spec(out)
    return optuna.load_study(study_name=spec.name, storage=st.open_storage(st.storage_of(out, label)))


def _frozen(t) -> tuple:
    """Everything a finished trial holds."""
    return (
        t.number,
        t.state,
        t.params,
        t.value,
        t.datetime_start,
        t.datetime_complete,
        t.intermediate_values,
        t.user_attrs,
    )


def _entries(folder: Path) -> list[str]:
    """What a trials directory holds besides its locks: run records, and any partial folder left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name != runs.LOCKS)


def _fold_stays(data: Path, folds: tuple[int, ...]) -> set[int]:
    c = pd.read_parquet(data / "cohort.parquet")
    return set(c.loc[c.fold.isin(folds), "stay_id"])


# ------------------------------------------------------------------------------------------- the data layer
def test_a_fold_built_for_a_study_holds_no_test_stay(root):
    data = open_dataset(root / "data")
    fold = build_fold(data, task="mortality", fold=1, image_size=16, splits=("train", "val"))
    assert fold.splits == ("train", "val") and fold.test is None
    with pytest.raises(LoadingError, match="built without its 'test' split"):
        fold.split("test")
    roles = fold_roles(1)
    test = _fold_stays(root / "data", roles["test"])
    held = set(fold.train.stay_ids) | set(fold.val.stay_ids)
    assert held.isdisjoint(test) and held == _fold_stays(root / "data", roles["train"] + roles["val"])
    assert set(fold.summary()) == {"train", "val"}
    full = build_fold(data, task="mortality", fold=1, image_size=16)
    assert set(full.test.stay_ids) == test  # the same builder, asked for every split, does build it
    np.testing.assert_array_equal(full.stats.median, fold.stats.median)  # statistics from train alone
    with pytest.raises(LoadingError, match="holding 'train'"):
        build_fold(data, task="mortality", fold=1, splits=("val", "test"))


def test_a_studys_loaders_hold_no_test_stay(root, tmp_path, monkeypatch):
    """Every loader made during a study, recorded as it is made: train and validation stays, no test stay."""
    import carebench.training.run as run_module

    made = []
    real = run_module.make_loader

    def recording(ds, *args, **kwargs):
        made.append(set(ds.stay_ids.tolist()))
        return real(ds, *args, **kwargs)

    monkeypatch.setattr(run_module, "make_loader", recording)
    summary = _tune(root, tmp_path / "s", trials=1)
    assert summary.complete == 1 and len(made) == 2  # train and validation, nothing else
    roles = fold_roles(1)
    assert made[0] == _fold_stays(root / "data", roles["train"])
    assert made[1] == _fold_stays(root / "data", roles["val"])
    record = runs.read_run(tmp_path / "s" / "trials" / summary.best["run_id"])
    assert not record.tested and not (record.path / runs.PREDICTIONS).exists()
    metrics = runs.read_metrics(record)
    assert metrics["test"] is None and set(metrics["splits"]) == {"train", "val"}
    assert record.config["hparams_source"] == {
        "study": summary.study,
        "storage": summary.storage,
        "trial": summary.best["number"],
    }
    with pytest.raises(runs.RunsError, match="validation-only"):
        runs.read_predictions(record, "test")


def _corrupt(src: Path, dst: Path, folds: tuple[int, ...]) -> Path:
    """A copy of the dataset whose labels of `folds` are all flipped (LOS moved by 3 classes)."""
    shutil.copytree(src, dst)
    declared = open_dataset(src)
    labels = [col for task in declared.tasks for col in declared.label_columns(task)]
    c = pd.read_parquet(dst / "cohort.parquet")
    rows = c.fold.isin(folds)
    for col in labels:
        c.loc[rows, col] = (c.loc[rows, col] + 3) % 7 if col == "label_los" else 1 - c.loc[rows, col]
    c.to_parquet(dst / "cohort.parquet", index=False)
    return dst


def test_corrupting_only_the_test_labels_changes_no_trial(root, tmp_path):
    """Flip every label of the test fold: each trial draws the same parameters and reaches the same validation
    value. The control flips the validation fold instead, and the values move (so the check can fail)."""
    roles = fold_roles(1)
    test_flipped = _corrupt(root / "data", tmp_path / "test_flipped", roles["test"])
    val_flipped = _corrupt(root / "data", tmp_path / "val_flipped", roles["val"])
    values = {}
    for name, data in (("clean", root / "data"), ("test", test_flipped), ("val", val_flipped)):
        _tune(root, tmp_path / name, trials=3, data=data)
        values[name] = [(t.params, t.value) for t in _study(tmp_path / name).trials]
    assert len(values["clean"]) == 3
    assert values["test"] == values["clean"]
    assert [v for _, v in values["val"]] != [v for _, v in values["clean"]]


# ------------------------------------------------------------------------------------------- resume
def test_trials_2_then_4_keeps_the_first_two_and_equals_one_run_of_4(root, tmp_path):
    out = tmp_path / "resumed"
    first = _tune(root, out, trials=2)
    assert (first.complete, first.new) == (2, 2)
    before = [_frozen(t) for t in _study(out).trials]
    done = {
        rid: (out / "trials" / rid / "DONE").stat().st_mtime_ns
        for rid in runs.finished_run_ids(out / "trials")
    }
    assert len(done) == 2
    second = _tune(root, out, trials=4)
    assert (second.complete, second.new, second.pruned, second.failed) == (4, 2, 0, 0)
    after = _study(out).trials
    assert [t.state for t in after] == [TrialState.COMPLETE] * 4
    assert [_frozen(t) for t in after[:2]] == before  # the first two untouched
    assert {p: (out / "trials" / p / "DONE").stat().st_mtime_ns for p in done} == done
    assert len(runs.finished_run_ids(out / "trials")) == 4 and (out / "study.db").is_file()
    again = _tune(root, out, trials=3)  # the budget is already met: nothing runs
    assert (again.complete, again.new) == (4, 0)
    straight = _tune(root, tmp_path / "straight", trials=4)
    assert [(t.params, t.value) for t in _study(tmp_path / "straight").trials] == [
        (t.params, t.value) for t in after
    ]
    assert straight.best == second.best


def test_trial_parameters_depend_on_seed_number_and_history_only():
    """The sampler draws trial n with (seed, n): a study run in pieces, each piece with a fresh sampler (a new
    process), draws what one uninterrupted run draws, through the random start-up and the TPE phase."""

    def objective(trial):
        x = trial.suggest_float("x", -3, 3)
        k = trial.suggest_categorical("k", [1, 2, 4])
        return -((x - 1) ** 2) - abs(k - 2)

    def study(pieces, seed=0):
        storage = optuna.storages.InMemoryStorage()
        for n in pieces:
            s = optuna.create_study(
                storage=storage,
                study_name="s",
                direction="maximize",
                sampler=st.make_sampler(seed),
                load_if_exists=True,
            )
            s.optimize(objective, n_trials=n)
        return [t.params for t in s.trials]

    whole = study([9])
    assert study([2, 3, 4]) == whole and study([1] * 9) == whole
    assert study([9], seed=1) != whole
    assert len({json.dumps(p, sort_keys=True) for p in whole}) == 9


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_running(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "the process ended"
        if (out / "study.yaml").is_file():
            trials = _study(out).get_trials(states=(TrialState.RUNNING,))
            if trials and st.RUN_ATTR in trials[0].user_attrs:  # its parameters drawn, its run starting
                return
        time.sleep(0.2)
    raise AssertionError("no trial started")


@pytest.mark.slow  # a real `carebench tune` process (it imports torch and Lightning) is killed mid-trial
@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_a_trial_killed_or_interrupted_mid_way_is_failed_and_rerun(root, tmp_path, how):
    out = tmp_path / "s"
    slow = ["max_epochs=40", "patience=40", "--no-pruning"]
    cmd = [CAREBENCH, "tune", "--data", str(root / "data"), "--model", "lstm", "--task", "mortality", "--preset",
           "test", "--space", str(root / "space.yaml"), "--trials", "1", "--out", str(out), "--threads", "1", *slow]  # fmt: skip
    # Ctrl-C's default handling in the child: a test worker process may ignore SIGINT, and a child inherits that
    # (Python then never raises KeyboardInterrupt, the trial runs to its end and the command exits 0).
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_default_sigint
    )
    try:
        _wait_for_running(out, proc)
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == (-signal.SIGKILL if how == "kill" else 130)
    states = [t.state for t in _study(out).trials]
    # killed: the trial is left RUNNING by the dead process; interrupted: failed and re-queued at once
    assert states == ([TrialState.RUNNING] if how == "kill" else [TrialState.FAIL, TrialState.WAITING])
    res = CliRunner().invoke(app, cmd[1:])
    assert res.exit_code == 0, res.output
    trials = _study(out).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params  # the same trial again
    assert trials[1].system_attrs["failed_trial"] == 0
    why = "its worker process died" if how == "kill" else "interrupted"
    assert trials[0].user_attrs["failure"].startswith(why) and "failure" not in trials[1].user_attrs
    assert _entries(out / "trials") == [trials[1].user_attrs["run_id"]]  # no partial folder left


# ------------------------------------------------------------------------------------------- pruning
def test_pruning_stops_a_trial_after_a_reported_epoch_and_leaves_no_record(root, tmp_path, monkeypatch):
    class PruneTrialZero(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 0

    monkeypatch.setattr(st, "make_pruner", lambda max_epochs, pruning: PruneTrialZero())
    summary = _tune(root, tmp_path / "s", trials=1, overrides={"max_epochs": 3})
    trials = _study(tmp_path / "s").trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE]
    assert list(trials[0].intermediate_values) == [0]  # stopped after its first epoch
    assert list(trials[1].intermediate_values) == [0, 1, 2]
    assert trials[1].intermediate_values[2] == pytest.approx(trials[1].value)  # the best so far, at the end
    assert _entries(tmp_path / "s" / "trials") == [trials[1].user_attrs["run_id"]]
    assert (summary.complete, summary.pruned) == (1, 1)


def test_the_report_follows_the_best_validation_value_of_the_last_stage_only(root, tmp_path):
    """MedFuse with one pretraining epoch: epoch 0 (the EHR classifier) is never reported; each report is the
    best value so far, and the last one is the run's selected validation value."""
    cfg = resolve_config(
        data=root / "data",
        model="medfuse",
        task="mortality",
        preset="test",
        options={"progress": False},
        overrides={"max_epochs": 4, "patience": 4, "model.pretrain_epochs": 1},
    )
    seen = []
    run = train_run(cfg, tmp_path, on_validation=lambda epoch, best: seen.append((epoch, best)))
    assert [e for e, _ in seen] == [1, 2, 3]
    values = [v for _, v in seen]
    assert values == sorted(values) and values[-1] == pytest.approx(run.metrics["val_best"])


# ------------------------------------------------------------------------------------------- bad input
def _space_file(tmp_path: Path, text: str) -> str:
    p = tmp_path / "space_bad.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "nosuchnet"}, "--model: unknown model 'nosuchnet'"),
        ({"--task": "sepsis"}, "--task 'sepsis': the dataset"),
        ({"--space": ""}, "empty search space; nothing to tune"),
        (
            {"--space": "hidden: {type: float, low: 1, high: 0}"},
            "['hidden']: a float space for a hyper-parameter",
        ),
        ({"--space": "dropout: {type: float, low: 0.5, high: 0.1}"}, "['dropout']: needs low < high"),
        ({"--space": "dropout: {type: gaussian}"}, "'type' must be one of"),
        ({"--space": "hidden: ["}, "not valid YAML"),
        ({"--space": "[1, 2]"}, "expected a mapping"),
        ({"--space": "hiddden: {type: int, low: 1, high: 2}"}, "unknown hyper-parameter 'hiddden'"),
        ({"--storage": "sqlite:////nonexistent-dir/deeper/study.db"}, "--storage sqlite:////nonexistent-dir"),
        ({"--storage": "notadatabase://x"}, "--storage notadatabase://x: cannot open it"),
        (
            {"--storage": "postgresql://user:secret@127.0.0.1:9/db"},
            "--storage postgresql://user:***@127.0.0.1:9/db",
        ),
        ({"--trials": "0"}, "--trials must be >= 1"),
        ({"--fold": "7"}, "--fold must be"),
    ],
)
def test_bad_input_is_one_error_naming_the_option_and_nothing_is_written(root, tmp_path, change, message):
    out = tmp_path / "out"
    args = {"--data": str(root / "data"), "--model": "lstm", "--task": "mortality", "--trials": "2",
            "--out": str(out), "--preset": "test"}  # fmt: skip
    for key, value in change.items():
        args[key] = _space_file(tmp_path, value) if key == "--space" else value
    res = CliRunner().invoke(app, ["tune", *[x for kv in args.items() for x in kv]])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("error: ") and message in res.output.replace("\n", " "), res.output
    if "--space" in change:
        assert "--space" in lines[0]
    assert "secret" not in res.output  # a password is never printed
    assert not out.exists()


def test_a_model_that_declares_no_search_space_is_refused(root, tmp_path, monkeypatch):
    monkeypatch.setattr(get_model_class("lstm"), "search_space", {})
    args = ["tune", "--data", str(root / "data"), "--model", "lstm", "--task", "mortality", "--trials", "2",
            "--out", str(tmp_path / "out")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert "error: --model lstm: its declared search_space: empty search space" in res.output
    assert not (tmp_path / "out").exists()
    # a space whose every setting is fixed on the command line is empty too
    monkeypatch.undo()
    res = CliRunner().invoke(app, [*args, "model.hidden=8", "layers=1", "bidirectional=false", "dropout=0.1"])
    assert (
        res.exit_code == 2
        and "every setting in it is fixed: hidden, layers, bidirectional, dropout" in res.output
    )


def test_another_studys_directory_is_refused(root, tmp_path):
    _tune(root, tmp_path / "s", trials=1)
    with pytest.raises(UserError, match=r"holds study lstm_mortality_f1_.*not this command's study"):
        _tune(root, tmp_path / "s", trials=1, seed=5)
    with pytest.raises(
        UserError, match=r"--storage: the study in --out .* lives in study.db, not sqlite:///"
    ):
        _tune(root, tmp_path / "s", trials=2, storage=f"sqlite:///{tmp_path / 'other.db'}")
    assert len(_entries(tmp_path / "s" / "trials")) == 1


# ------------------------------------------------------------------------------------------- many workers
@pytest.mark.slow  # two worker processes each import torch and Lightning (about 15 s on a busy 2-core machine)
def test_two_worker_processes_on_one_study_end_with_exactly_n_complete_trials(root, tmp_path):
    summary = _tune(root, tmp_path / "s", trials=5, jobs=2, overrides={"max_epochs": 6, "patience": 6})
    assert summary.errors == [] and summary.complete == 5
    trials = _study(tmp_path / "s").trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 5
    # a failed trial may only be one settled by the budget race, never trained
    assert all(
        t.user_attrs["failure"].startswith("over budget") for t in trials if t.state == TrialState.FAIL
    )
    records = set(_entries(tmp_path / "s" / "trials"))
    assert records == {t.user_attrs["run_id"] for t in complete}
    assert os.getpid() not in {t.user_attrs[st.WORKER_ATTR]["pid"] for t in trials}  # run by the workers
    assert not (tmp_path / "s" / "logs").exists()  # both workers exited cleanly


@pytest.mark.slow  # starting Ray costs 15-90 s on a busy 2-core machine
def test_ray_workers_on_one_study_end_with_exactly_n_complete_trials(root, tmp_path):
    import ray  # the `ray` extra is part of the test environment (make test)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = _tune(root, tmp_path / "s", trials=4, jobs=2, executor="ray")
    finally:
        ray.shutdown()
    assert summary.errors == [] and summary.complete == 4
    trials = _study(tmp_path / "s").trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    pids = {t.user_attrs[st.WORKER_ATTR]["pid"] for t in trials}
    assert os.getpid() not in pids  # the trials ran in Ray's worker processes


# ------------------------------------------------------------------------------------------- plans and analysis
PLAN = {
    "name": "tuned",
    "preset": "test",
    "models": ["lstm"],
    "tasks": ["mortality"],
    "folds": [1],
    "seeds": [0, 1],
    "fairness": {"enabled": False},
    "statistics": {"n_bootstrap": 50, "n_permutations": 50},
    "tuning": {"trials": 2, "fold": 1, "spaces": {"lstm": SPACE}},
}


@pytest.mark.parametrize(
    ("tuning", "message"),
    [
        ({"trials": 0}, "key 'tuning.trials': expected an integer >= 1"),
        ({"fold": 1}, "give 'trials' (run the studies first) or 'studies'"),
        ({"trials": 2, "fold": 6}, "key 'tuning.fold': expected 'each' or a fold 1..5"),
        ({"trials": 2, "seeds": 1}, "unknown key 'tuning.seeds'"),
        ({"trials": 2, "spaces": {"resnet": SPACE}}, "key 'tuning.spaces.resnet': not a method of this plan"),
    ],
)
def test_plan_tuning_errors_name_the_key(tuning, message):
    with pytest.raises(PlanError, match=None) as e:
        parse_plan({**PLAN, "tuning": tuning})
    assert message in str(e.value)


def test_a_fixed_tuning_fold_is_refused_for_runs_on_other_folds():
    """A study on fold 1 has trained on folds 3-5 and validated on fold 2: the runs tested there need their own."""
    with pytest.raises(PlanError, match=r"test stays of this plan's runs on folds \[2\]; use 'fold: each'"):
        parse_plan({**PLAN, "folds": [1, 2]})
    assert (
        parse_plan({**PLAN, "folds": [1, 2], "tuning": {"trials": 2, "fold": "each"}}).tuning.fold == "each"
    )


def test_a_malformed_plan_space_stops_the_benchmark_before_anything_runs(root, tmp_path):
    plan = parse_plan({**PLAN, "tuning": {"trials": 2, "spaces": {"lstm": {"hidden": {"type": "int"}}}}})
    with pytest.raises(PlanError, match=r"key 'tuning.spaces.lstm'\['hidden'\]"):
        run_benchmark(plan, root / "data", tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def tuned_benchmark(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "runs"
    plan_file = out.parent / "tuned.yaml"
    plan_file.write_text(yaml.safe_dump(PLAN))
    summary = run_benchmark(load_plan(plan_file), root / "data", out, jobs=1, threads=1)
    assert summary.ok and summary.done == 2
    return out, plan_file


def test_a_plan_with_tuning_runs_on_the_best_trial_and_says_so(root, tuned_benchmark):
    out, plan_file = tuned_benchmark
    (study_dir,) = (out / "tuning").iterdir()
    study = _study(study_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    records = runs.find_runs(out)
    assert len(records) == 2 and {r.seed for r in records} == {0, 1}
    for r in records:
        cfg = TrainConfig.from_yaml(r.path / "config.yaml")
        assert {k: cfg.model_args[k] for k in SPACE} == best.params
        assert cfg.hparams_source == {
            "study": study.study_name,
            "storage": st.storage_label(st.default_storage(study_dir)),
            "trial": best.number,
            "value": best.value,
        }
        assert r.hparams_source == f"study {study.study_name} trial {best.number}"
    recorded = yaml.safe_load((out / "plan.yaml").read_text())
    assert recorded["tuning"]["trials"] == 2 and recorded["studies"][0]["best_trial"] == best.number
    # the same command again: no trial, no run
    again = run_benchmark(load_plan(plan_file), root / "data", out, jobs=1, threads=1)
    assert (again.skipped, again.done) == (2, 0) and len(_study(study_dir).trials) == 2
    res = CliRunner().invoke(
        app,
        ["benchmark", "--plan", str(plan_file), "--data", str(root / "data"), "--out", str(out), "--dry-run"],
    )
    assert res.exit_code == 0 and f"study {study.study_name}\t2/2 complete" in res.output
    assert sum(line.endswith("\tdone") for line in res.output.splitlines()) == 2


def test_a_plan_reads_finished_studies_and_the_runs_of_the_defaults_differ(root, tuned_benchmark, tmp_path):
    out, _ = tuned_benchmark
    plan = parse_plan(
        {**PLAN, "tuning": {"studies": str(out / "tuning"), "fold": 1, "spaces": {"lstm": SPACE}}}
    )
    from carebench.experiments.plan import expand_plan
    from carebench.experiments.tuned import TunedHparams, plan_studies, run_studies

    specs = plan_studies(plan, root / "data")
    tuned = expand_plan(plan, root / "data", TunedHparams(specs, run_studies(plan, specs, tmp_path)))
    assert [c.run_id for c in tuned] == [r.run_id for r in runs.find_runs(out)]  # the same runs, found again
    defaults = expand_plan(plan, root / "data")
    assert [c.hparams_source for c in defaults] == ["defaults", "defaults"]
    assert {c.run_id for c in defaults}.isdisjoint(c.run_id for c in tuned)
    empty = parse_plan({**PLAN, "tuning": {"studies": str(tmp_path), "fold": 1, "spaces": {"lstm": SPACE}}})
    with pytest.raises(PlanError, match="no study of lstm on mortality, fold 1"):
        run_studies(empty, plan_studies(empty, root / "data"), tmp_path)


def test_the_analysis_tests_the_best_trial_after_its_study(root, tuned_benchmark):
    from carebench.analysis.analyze import analyze
    from carebench.report import build_report
    from carebench.training import evaluate_run

    out, _ = tuned_benchmark
    res = analyze(out, fairness=False, missingness=False, ablation=False)
    table = res.tables["tuning"]
    assert len(table) == 1
    row = table.iloc[0]
    (study_dir,) = (out / "tuning").iterdir()
    best = max(_study(study_dir).trials, key=lambda t: (t.value, -t.number))
    tested = evaluate_run(study_dir / "trials" / best.user_attrs["run_id"], root / "data")["auprc"]
    assert (row.method, row.n_complete, row.best_trial, row.metric) == ("lstm", 2, best.number, "auprc")
    assert row.val == pytest.approx(best.value) and row.test == pytest.approx(tested)
    assert row.gap == pytest.approx(best.value - tested)
    assert (
        json.loads(row.best_params) == best.params
        and row.space == "dropout [0, 0.5]; hidden {8, 16}; layers [1, 2] int"
    )
    assert set(res.tables["runs"].hparams_source) == {f"study {row.study} trial {best.number}"}
    html = build_report(out).read_text()
    assert "Hyper-parameter search" in html and "gap (val - test)" in html
    with pytest.raises(UserError, match="validation-only tuning trials"):
        analyze(study_dir / "trials")


# ------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("model", list_models())
def test_every_registered_methods_declared_space_gives_models_that_build(model, root):
    """The declared space holds the defaults, and three random points of it, at the quick preset, each resolve to
    a run configuration (types as the run expects) and build the model, with its last stage inside the epochs."""
    from carebench.tuning.space import study_space, suggest
    from carebench.tuning.worker import trial_config

    space = study_space(model)
    defaults = get_model_class(model).default_hparams
    for key, s in space.items():  # docs/tuning.md: every declared space holds the method's defaults
        d = defaults[key]
        assert d in s["choices"] if s["type"] == "categorical" else s["low"] <= d <= s["high"], key
    spec = st.StudySpec(
        model, "phenotype", 1, "base", "quick", 0, str(root / "data"), "", "auroc_macro", space
    )
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    for _ in range(3):
        trial = study.ask()
        params = suggest(trial, space)
        cfg = trial_config(spec, params, trial.number, "sqlite://")
        assert {k: cfg.model_args[k] for k in params} == params and not cfg.evaluate_test
        net = create_model(model, "phenotype", 4, cfg.image_size, **cfg.model_args)
        assert net.selection_start_epoch < cfg.max_epochs
        study.tell(trial, 0.0)
