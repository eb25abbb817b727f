"""The Python API `carebench.data.write_dataset` and the generic processed-dataset contract.

- The worked example of docs/dataset.md, run as written: a non-MIMIC dataset (7 features on a 2-hourly grid, a
  3-class task and a binary task of its own, its own fairness attributes, no MIMIC columns), then `train`,
  `analyze` and `report` through the CLI on it: the report shows that task's metrics and the attributes' fairness
  tables.
- Validation: each rule of the writer refuses bad input with one error naming the column or argument, and leaves
  nothing behind.
- The fingerprint: the same data and declarations give the same fingerprint; a different declaration another.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from carebench.analysis.options import AnalysisError, groups_by_task
from carebench.cli import app
from carebench.data import DatasetError, open_dataset, write_dataset
from carebench.data.describe import summarize
from carebench.data.store import FORMAT_VERSION, MANIFEST, dataset_fingerprint
from carebench.errors import UserError
from carebench.tasks import TaskError, get_task
from html_tables import Tables

torch.set_num_threads(2)
DOC = Path(__file__).resolve().parents[1] / "docs" / "dataset.md"


def doc_example() -> str:
    """The python block of docs/dataset.md's section "Way in 2: the Python API"."""
    text = DOC.read_text()
    section = text[text.index("## Way in 2: the Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def mine(tmp_path_factory) -> Path:
    """The doc's example, executed in a fresh directory: it writes data/mine."""
    root = tmp_path_factory.mktemp("api")
    cwd = Path.cwd()
    try:
        os.chdir(root)
        exec(compile(doc_example(), str(DOC), "exec"), {})
    finally:
        os.chdir(cwd)
    return root / "data" / "mine"


def _invoke(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (args, res.stdout, res.stderr)
    return res.stdout


def test_the_doc_example_writes_a_dataset_with_its_own_declarations(mine):
    ds = open_dataset(mine)
    assert ds.tasks == ["acuity", "readmission_30d"]  # declaration order
    assert ds.features == ["hr", "sbp", "dbp", "rr", "spo2", "temp", "gcs"] and ds.ehr.shape == (120, 12, 7)
    assert ds.declarations.step_hours == 2.0 and ds.declarations.hours == 24.0
    assert ds.output_names("acuity") == ["acuity_0", "acuity_1", "acuity_2"]
    assert ds.task("acuity").display_names == ["low", "medium", "high"]
    assert get_task("acuity").kind == "multiclass" and get_task("readmission_30d").threshold == "f1"
    assert ds.attributes == ["site", "age_band", "has_cxr"]
    groups = ds.groups()
    age = ds.cohort["age_years"]
    want = np.where(age < 50, "18-50", np.where(age < 70, "50-70", "70+"))
    assert groups["age_band"].astype(str).tolist() == want.tolist()
    c = ds.cohort
    assert not [col for col in c.columns if col == "hadm_id" or col.startswith("pheno_")]
    assert set(c["fold"]) == {1, 2, 3, 4, 5} and (c.groupby("subject_id")["fold"].nunique() == 1).all()
    assert (
        ds.cxr.shape == (int(c["has_cxr"].sum()), 32, 32) and (c.loc[~c["has_cxr"], "cxr_index"] == -1).all()
    )
    m = json.loads((mine / MANIFEST).read_text())
    assert m["format_version"] == FORMAT_VERSION and m["producer"]["name"] == "my-hospital-export"
    assert m["images"] == {"file": "cxr.npy", "count": int(c["has_cxr"].sum()), "size": 32}
    labels = summarize(ds).labels.set_index("name")
    assert labels.loc["class 2: high", "positives"] == (c["acuity"] == 2).sum()
    assert labels.loc["readmitted within 30 days", "positives"] == c["readmitted"].sum()
    assert "120 stays of 60 patients" in _invoke(["describe", str(mine)])


def test_train_analyze_report_on_the_new_dataset(mine, tmp_path):
    runs = tmp_path / "runs"
    for model in ("lstm", "resnet", "latefusion"):
        _invoke(["train", "--data", str(mine), "--model", model, "--task", "acuity", "--preset", "test",
                 "--fold", "1", "--out", str(runs), "max_epochs=1"])  # fmt: skip
    _invoke(["train", "--data", str(mine), "--model", "lstm", "--task", "readmission_30d", "--preset", "test",
             "--fold", "1", "--out", str(runs), "max_epochs=1"])  # fmt: skip
    _invoke(["analyze", str(runs), "--n-bootstrap", "50", "--n-permutations", "99", "--no-progress"])
    _invoke(["report", str(runs)])
    html = (runs / "report" / "index.html").read_text()
    tables = Tables()
    tables.feed(html)
    board = pd.read_parquet(runs / "analysis" / "leaderboard.parquet")

    # the multiclass task's leaderboard: its reported metrics, one row per method, values of the analysis
    rows = tables.tables["leaderboard-acuity-base"]
    assert [c for c, _ in rows[0]] == ["method", "modalities", "runs (seeds)", "AUROC (OvR macro)", "Accuracy",
                                       "κ linear", "F1 macro"]  # fmt: skip
    assert sorted(r[0][0].replace(" (reference)", "") for r in rows[1:]) == ["latefusion", "lstm", "resnet"]
    b = board[(board.task == "acuity") & (board.label == "acuity")].set_index(["method", "metric"])
    for r in rows[1:]:
        method = r[0][0].replace(" (reference)", "")
        assert float(r[3][1]["data-value"]) == pytest.approx(b.loc[(method, "auroc_ovr_macro"), "estimate"])
    # per-class rows under the dataset's output names
    assert {"acuity_0", "acuity_1", "acuity_2"} <= set(board.loc[board.task == "acuity", "label"])
    # the binary task: thresholded metrics at the run's validation threshold (rule recorded in the run)
    rows = tables.tables["leaderboard-readmission_30d-base"]
    assert {"F1", "Sensitivity", "Specificity"} <= {c for c, _ in rows[0]}
    metrics = json.loads(next(runs.glob("lstm_readmission_30d_*/metrics.json")).read_text())
    assert metrics["thresholds"]["rule"] == "f1" and set(metrics["thresholds"]["outputs"]) == {
        "readmission_30d"
    }
    assert "decision threshold chosen on the validation split" in html

    # the dataset's own fairness attributes in the fairness table of the new task
    fair = tables.tables["fairness-acuity-base"]
    assert {"site", "age_band", "has_cxr"} <= {r[0][0] for r in fair[1:]}
    summary = pd.read_parquet(runs / "analysis" / "fairness_summary.parquet")
    assert set(summary.loc[summary.task == "acuity", "attribute"]) == {"site", "age_band", "has_cxr"}
    # the cohort tables: class names, no MIMIC task
    labels = tables.tables["cohort-labels"]
    assert {"class 0: low", "class 1: medium", "class 2: high", "readmitted within 30 days"} <= {
        r[2][0] for r in labels[1:]
    }
    assert "mortality" not in set(board.task) and "leaderboard-mortality-base" not in tables.tables
    s = json.loads((runs / "analysis" / "summary.json").read_text())
    assert [t["name"] for t in s["tasks"]] == ["acuity", "readmission_30d"]


def _two_multilabel_tasks(root: Path) -> Path:
    """A dataset declaring two multilabel tasks of its own, with disjoint label names."""
    rng = np.random.default_rng(5)
    n = 100
    severity = rng.normal(size=n)
    cohort = pd.DataFrame({"stay_id": np.arange(n) + 1, "subject_id": np.arange(n) // 2})
    for c in "abc":
        cohort[f"comp_{c}"] = (severity + rng.normal(0, 1, n) > 0.5).astype(int)
    for c in "xyz":
        cohort[f"dx_{c}"] = (severity + rng.normal(0, 1, n) > 0.0).astype(int)
    ehr = (severity[:, None, None] + rng.normal(0, 1, (n, 6, 3))).astype(np.float32)
    write_dataset(
        root,
        cohort=cohort,
        ehr=ehr,
        features=["a", "b", "c"],
        tasks={
            "complications": {"labels": ["comp_a", "comp_b", "comp_c"], "spec": {"kind": "multilabel"}},
            "diagnoses": {"labels": ["dx_x", "dx_y", "dx_z"], "spec": {"kind": "multilabel"}},
        },
        seed=0,
    )
    return root


def test_analyze_in_a_new_process_knows_the_datasets_tasks_and_splits_label_groups(tmp_path, monkeypatch):
    """`analyze` reads runs before it opens their dataset: a process that has not opened it yet (here: the task
    registry emptied, as in a new process) must still know the dataset's own tasks. One label-groups file holds
    the groups of two multilabel tasks; each group goes to the task that has its labels."""
    import carebench.tasks as T
    from carebench.analysis.analyze import analyze

    data = _two_multilabel_tasks(tmp_path / "two")
    runs = tmp_path / "runs"
    for task in ("complications", "diagnoses"):
        _invoke(["train", "--data", str(data), "--model", "lstm", "--task", task, "--preset", "test", "--fold",
                 "1", "--out", str(runs), "max_epochs=1"])  # fmt: skip
    options = {"n_bootstrap": 20, "n_permutations": 19, "fairness": False, "missingness": False,
               "ablation": False}  # fmt: skip
    groups = {"early": ["comp_a", "comp_b"], "common": ["dx_x", "dx_y", "dx_z"]}
    monkeypatch.setattr(T, "_DECLARED", {})
    res = analyze(runs, label_groups=groups, **options)
    assert res.summary["options"]["task_label_groups"] == {
        "complications": {"early": ["comp_a", "comp_b"]},
        "diagnoses": {"common": ["dx_x", "dx_y", "dx_z"]},
    }
    board = res.tables["leaderboard"]
    auroc = board[board.metric.isin(["auroc", "auroc_macro"])].set_index(["task", "label"])["estimate"]
    assert {lb for lb in board.label if lb.startswith("group:")} == {"group:early", "group:common"}
    assert auroc[("complications", "group:early")] == pytest.approx(
        np.mean([auroc[("complications", nm)] for nm in ("comp_a", "comp_b")]), abs=1e-12
    )
    assert auroc[("diagnoses", "group:common")] == pytest.approx(auroc[("diagnoses", "diagnoses")], abs=1e-12)
    assert ("diagnoses", "group:early") not in auroc.index

    # a group that is in neither task names what each task lacks
    with pytest.raises(AnalysisError, match=r"label group 'mixed': .*complications lacks \['dx_x'\]; "
                                            r"diagnoses lacks \['comp_a'\]"):  # fmt: skip
        analyze(runs, label_groups={"mixed": ["comp_a", "dx_x"]}, **options)
    # the dataset moved: its tasks cannot be declared, and the error says how to go on
    moved = tmp_path / "moved"
    data.rename(moved)
    monkeypatch.setattr(T, "_DECLARED", {})
    with pytest.raises(UserError, match=r"two: dataset of the runs not found; it declares their task\(s\) "
                                        r"\['complications', 'diagnoses'\] \(pass --data DIR"):  # fmt: skip
        analyze(runs, **options)
    assert len(analyze(runs, data=moved, **options).summary["run_ids"]) == 2


def test_label_groups_go_to_the_multilabel_tasks_that_have_their_labels():
    labels = {"t1": ["a", "b", "c"], "t2": ["c", "d"]}
    assert groups_by_task({"g": ["a", "b"], "h": ["d"], "shared": ["c"]}, labels) == {
        "t1": {"g": ["a", "b"], "shared": ["c"]},
        "t2": {"h": ["d"], "shared": ["c"]},
    }
    assert groups_by_task({}, labels) == {} and groups_by_task({}, {}) == {}
    with pytest.raises(
        AnalysisError, match=r"label group 'g': unknown label\(s\) \['z'\]; labels of task 't1'"
    ):
        groups_by_task({"g": ["a", "z"]}, {"t1": labels["t1"]})
    with pytest.raises(AnalysisError, match=r"label group 'g': .*t1 lacks \['d'\]; t2 lacks \['a'\]"):
        groups_by_task({"g": ["a", "d"]}, labels)
    with pytest.raises(AnalysisError, match=r"apply to multilabel tasks; the runs have none"):
        groups_by_task({"g": ["a"]}, {})


# ------------------------------------------------------------------------------------------------ validation
def test_tune_studies_a_task_the_dataset_declares(mine, tmp_path):
    """A study of the dataset's own multiclass task optimises that task's selection metric on validation."""
    import optuna

    out = tmp_path / "study"
    _invoke(["tune", "--data", str(mine), "--model", "lstm", "--task", "acuity", "--preset", "test", "--trials", "2",
             "--out", str(out), "--threads", "1", "max_epochs=1"])  # fmt: skip
    spec = yaml.safe_load((out / "study.yaml").read_text())
    assert spec["task"] == "acuity" and spec["selection_metric"] == get_task("acuity").selection_metric
    trials = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(0.0 <= t.value <= 1.0 for t in trials)


def _inputs(n: int = 30, **changes):
    rng = np.random.default_rng(3)
    cohort = pd.DataFrame(
        {
            "stay_id": np.arange(n) + 1,
            "subject_id": np.arange(n) // 2,
            "y": rng.integers(0, 2, n),
            "k": rng.integers(0, 3, n),
            "sex": rng.choice(["f", "m"], n),
            "age": rng.uniform(20, 90, n),
        }
    )
    kw = {
        "cohort": cohort,
        "ehr": rng.normal(size=(n, 4, 3)).astype(np.float32),
        "features": ["a", "b", "c"],
        "tasks": {
            "outcome": {"labels": ["y"], "spec": {"kind": "binary"}},
            "grade": {"labels": ["k"], "spec": {"kind": "multiclass", "class_names": ["x", "y", "z"]}},
        },
        "fairness": {"sex": {"column": "sex"}, "age_band": {"column": "age", "bins": [18, 60]}},
    }
    kw.update(changes)
    return kw


def _edit(**columns):
    kw = _inputs()
    c = kw["cohort"].copy()
    for name, value in columns.items():
        c[name] = value
    kw["cohort"] = c
    return kw


def _images(n_img: int):
    return np.zeros((n_img, 8, 8), np.uint8)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            _inputs(cohort=_inputs()["cohort"].drop(columns="subject_id")),
            "required column 'subject_id' missing",
        ),
        (_edit(stay_id=[1, 1, *range(3, 31)]), "stay_id 1 appears 2 times"),
        (
            _edit(fold=np.where(np.arange(30) == 1, 2, 1 + np.arange(30) // 2 % 5)),
            "subject 0 has stays in folds [1, 2]",
        ),
        (_edit(fold=np.repeat([1, 2, 3, 4, 6], 6)), "'fold' must be 1..5, found [6]"),
        (_edit(fold=np.repeat([1, 2, 3, 4, 4], 6)), "fold(s) [5] hold no stay"),
        (_inputs(ehr=np.zeros((30, 4, 2), np.float32)), "ehr: shape (30, 4, 2), expected [30 stays"),
        (_inputs(ehr=np.zeros((30, 4, 3), np.int64)), "ehr: dtype int64, expected float32"),
        (_inputs(ehr=np.full((30, 4, 3), np.inf, np.float32)), "ehr: infinite value at stay row 0"),
        (_inputs(features=["a", "a", "c"]), "features: names repeat: ['a']"),
        (_edit(y=[2] + [0] * 29), "column 'y' (task 'outcome', binary) must hold 0 or 1"),
        (_edit(k=[3] + [0] * 29), "column 'k' (task 'grade', multiclass) must hold classes 0..2"),
        (_edit(y=np.nan), "column 'y' (labels of task 'outcome') holds no label at all"),
        (_inputs(tasks={"sepsis": {"labels": ["y"]}}), "task 'sepsis' is not a built-in task"),
        (
            _inputs(tasks={"mortality": {"labels": ["y", "k"]}}),
            "task 'mortality' (binary, 1 outputs) needs 1",
        ),
        (_inputs(tasks={"t": {"labels": ["y"], "spec": {"kind": "regression"}}}), "kind 'regression' is not"),
        (
            _inputs(tasks={"t": {"labels": ["y"], "spec": {"kind": "binary", "selection_metric": "f1"}}}),
            "must be threshold-free",
        ),
        (_inputs(tasks={"t": {"labels": ["nope"], "spec": {"kind": "binary"}}}), "missing columns ['nope']"),
        (_inputs(fairness={"sex": {"column": "gender"}}), "missing columns ['gender']"),
        (_inputs(fairness={"a": {"column": "sex", "bins": [0]}}), "attribute 'a' with bins) must be numeric"),
        (_inputs(fairness={"a": {"column": "age", "bins": [30, 60]}}), "below the first bin edge 30"),
        (_inputs(fairness={"auroc": {"column": "sex"}}), "attribute name 'auroc' is reserved"),
        (
            _edit(cxr_index=[0] + [-1] * 29, cxr_hours=1.0) | {"images": _images(2)},
            "1 of the 2 images are referenced by no stay",
        ),
        (
            _edit(cxr_index=[5] + [-1] * 29, cxr_hours=1.0) | {"images": _images(1)},
            "cxr_index 5 out of range",
        ),
        (
            _edit(cxr_index=[0] + [-1] * 29, cxr_hours=1.0, has_cxr=False) | {"images": _images(1)},
            "has_cxr False but cxr_index 0",
        ),
        (_edit(cxr_index=[0] + [-1] * 29, cxr_hours=np.nan) | {"images": _images(1)}, "no finite cxr_hours"),
        (_edit(cxr_index=[0] + [-1] * 29) | {"images": _images(1)}, "required column 'cxr_hours' missing"),
        (_inputs(images=np.zeros((2, 8, 8), np.float32)), "images: dtype float32, expected uint8"),
        (_edit(has_cxr=True), "has_cxr is True for some stays but no images were given"),
        (_inputs(extra_manifest={"tasks": []}), "extra_manifest: keys ['tasks'] are written by the writer"),
    ],
)
def test_bad_input_is_refused_with_one_clear_error_and_nothing_written(tmp_path, kw, message):
    with pytest.raises((DatasetError, TaskError)) as e:
        write_dataset(tmp_path / "out", **kw)
    assert message in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no dataset, no temporary directory


def test_existing_output_is_kept_without_overwrite(tmp_path):
    first = write_dataset(tmp_path / "d", **_inputs())
    with pytest.raises(DatasetError, match="already exists"):
        write_dataset(tmp_path / "d", **_inputs())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a carebench dataset"):
        write_dataset(tmp_path / "other", **_inputs(), overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert write_dataset(first, **_inputs(), overwrite=True) == first


def test_folds_are_assigned_subject_disjoint_and_kept_when_given(tmp_path):
    ds = open_dataset(write_dataset(tmp_path / "a", **_inputs(n=40), seed=1))
    c = ds.cohort
    assert (c.groupby("subject_id")["fold"].nunique() == 1).all()
    assert c.groupby("fold")["subject_id"].nunique().tolist() == [4, 4, 4, 4, 4]
    given = _inputs(n=40)
    given["cohort"] = given["cohort"].assign(fold=1 + given["cohort"]["subject_id"] % 5)
    kept = open_dataset(write_dataset(tmp_path / "b", **given)).cohort
    assert kept["fold"].tolist() == (1 + given["cohort"]["subject_id"] % 5).tolist()


def test_fingerprint_is_content_and_declarations(tmp_path):
    a = write_dataset(tmp_path / "a", **_inputs())
    b = write_dataset(
        tmp_path / "sub" / "b", **_inputs(), producer={"name": "elsewhere"}
    )  # other path, producer
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    other = _inputs()
    other["tasks"] = {"outcome": {"labels": ["y"], "spec": {"kind": "binary", "threshold": "youden"}}}
    c = write_dataset(tmp_path / "c", **other)
    assert (a / "cohort.parquet").read_bytes() == (c / "cohort.parquet").read_bytes()
    assert dataset_fingerprint(c) != dataset_fingerprint(a)  # same files, another declaration


def test_an_older_format_is_refused_with_the_way_out(tmp_path):
    d = write_dataset(tmp_path / "d", **_inputs())
    m = json.loads((d / MANIFEST).read_text())
    m["format_version"] = 1
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(
        DatasetError, match=r"format_version 1, this carebench reads 2.*re-run `carebench prepare`"
    ):
        open_dataset(d)
