"""The run record (carebench.runs): identity, atomic writing, reading, the dataset check, the predictions frame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from carebench import runs
from carebench.training import TrainConfig

CONFIG = {"model": "lstm", "task": "mortality", "cohort": "base", "fold": 2, "seed": 1, "lr": 1e-3,
          "data": "/x/data", "data_fingerprint": "abc", "threads": 1, "cxr_dropout_train": 0.0}  # fmt: skip


def _finished(root, config=CONFIG, n=4):
    work = runs.start_run(root, config)
    frame = runs.predictions_frame(
        config["task"],
        ["mortality"],
        {
            "stay_id": np.arange(n)[::-1],
            "has_cxr": np.arange(n) % 2,
            "y": np.ones((n, 1)),
            "p": np.full((n, 1), 0.3),
        },
    )
    frame.to_parquet(work / runs.PREDICTIONS)
    return runs.finish_run(work)


def test_run_id_hashes_what_can_change_a_result_only():
    rid = runs.run_id(CONFIG)
    assert rid.startswith("lstm_mortality_f2_s1_") and len(rid.rsplit("_", 1)[1]) == 12
    for key, value in [("data", "/moved"), ("threads", 2), ("num_workers", 3), ("progress", False),
                       ("modalities", ["ehr"]), ("channels_last", False), ("cudnn_benchmark", False),
                       ("run_id", "anything")]:  # fmt: skip
        assert runs.run_id({**CONFIG, key: value}) == rid, key
    for key, value in [("lr", 2e-3), ("data_fingerprint", "abd"), ("cxr_dropout_train", 0.5), ("seed", 1),
                       ("precision", "bf16-mixed")]:  # fmt: skip
        changed = runs.run_id({**CONFIG, key: value})
        assert (changed == rid) == (value == CONFIG.get(key)), key
    assert set(runs.NOT_HASHED) == {"data", "num_workers", "threads", "progress", "modalities", "hparams_source",
                                    "channels_last", "cudnn_benchmark"}  # fmt: skip
    src = {"study": "lstm_mortality_f2_x", "trial": 3}
    assert runs.run_id({**CONFIG, "hparams_source": src}) == rid  # where the values came from: recorded only
    # evaluate_test was added later: at its default the earlier runs keep their ids, a validation-only run differs
    assert runs.run_id({**CONFIG, "evaluate_test": True}) == rid
    assert runs.run_id({**CONFIG, "evaluate_test": False}) != rid


def test_train_config_and_run_record_agree_on_the_id(tmp_path):
    cfg = TrainConfig(model="lstm", task="mortality", data=str(tmp_path), data_fingerprint="f")
    assert cfg.run_id == runs.run_id(cfg.to_dict())
    text = runs.config_yaml(cfg.to_dict())
    assert text.startswith(f"run_id: {cfg.run_id}\n")
    assert runs.parse_config(text, "x") == cfg.to_dict()  # round trip
    assert TrainConfig.from_yaml_text(text) == cfg


def test_start_and_finish_are_atomic_and_done_is_written_last(tmp_path):
    work = runs.start_run(tmp_path, CONFIG)
    rid = runs.run_id(CONFIG)
    assert work == tmp_path / f".{rid}.partial" and (work / runs.CONFIG).is_file()
    assert not runs.is_done(tmp_path, rid) and runs.finished_run_ids(tmp_path) == []
    with pytest.raises(runs.RunsError, match="no finished runs"):
        runs.find_runs(tmp_path)
    (tmp_path / rid).mkdir()  # an interrupted earlier attempt without DONE is replaced
    (tmp_path / rid / "stale").write_text("x")
    frame = pd.DataFrame({"stay_id": [1], "cxr_input": [True], "y_mortality": [1], "p_mortality": [0.5]})
    frame.to_parquet(work / runs.PREDICTIONS)
    final = runs.finish_run(work)
    assert final == tmp_path / rid and not work.exists() and not (final / "stale").exists()
    assert runs.is_done(tmp_path, rid) and runs.finished_run_ids(tmp_path) == [rid]
    with pytest.raises(ValueError, match="not a partial run folder"):
        runs.finish_run(final)


def test_reading_a_run_and_the_table(tmp_path):
    a = _finished(tmp_path)
    b = _finished(tmp_path, {**CONFIG, "model": "latefusion", "fold": 1})
    (tmp_path / ".junk.partial").mkdir()
    (tmp_path / "analysis").mkdir()  # other folders of a runs directory are not runs
    records = runs.find_runs(tmp_path)
    assert [r.path for r in records] == [b, a]  # ordered by task, cohort, model, fold, ...
    rec = runs.read_run(a)
    assert (rec.method, rec.task, rec.fold, rec.seed, rec.data_fingerprint) == (
        "lstm",
        "mortality",
        2,
        1,
        "abc",
    )
    table = runs.runs_table(records)
    assert list(table.columns) == runs.RUN_COLUMNS and table.model.tolist() == ["latefusion", "lstm"]
    preds = runs.read_predictions(rec)
    assert preds.stay_id.tolist() == [0, 1, 2, 3] and preds.cxr_input.tolist() == [
        True,
        False,
        True,
        False,
    ]  # sorted by stay
    assert runs.read_predictions(rec, "val") is None  # predates validation predictions
    with pytest.raises(runs.RunsError, match="split"):
        runs.read_predictions(rec, "holdout")


def test_malformed_records_are_errors_naming_the_file(tmp_path):
    d = _finished(tmp_path)
    (d / runs.PREDICTIONS).unlink()
    with pytest.raises(runs.RunsError, match=r"predictions.parquet: missing"):
        runs.read_run(d)
    d = _finished(tmp_path, {**CONFIG, "seed": 7})
    (d / runs.CONFIG).write_text("run_id: other\nmodel: lstm\ntask: mortality\nfold: 1\nseed: 7\n")
    with pytest.raises(runs.RunsError, match="run_id 'other' does not match its folder"):
        runs.read_run(d)
    (d / runs.CONFIG).write_text("model: [")
    with pytest.raises(runs.RunsError, match=r"config.yaml: not valid YAML"):
        runs.read_run(d)


def test_runs_on_two_datasets_are_never_pooled(tmp_path):
    _finished(tmp_path)
    _finished(tmp_path, {**CONFIG, "data_fingerprint": "xyz"})
    with pytest.raises(runs.RunsError, match=r"different datasets.*fingerprints (abc and xyz|xyz and abc)"):
        runs.common_dataset(runs.find_runs(tmp_path))
    runs.check_dataset("abc", tmp_path, "abc")
    with pytest.raises(runs.RunsError, match="its fingerprint is new, the run record says abc"):
        runs.check_dataset("abc", tmp_path, "new")


def test_predictions_frame_round_trips_every_task_kind():
    rng = np.random.default_rng(0)
    n = 5
    base = {"stay_id": np.array([5, 3, 1, 4, 2]), "has_cxr": np.ones(n)}
    y = rng.integers(0, 2, (n, 3))
    p = rng.random((n, 3))
    f = runs.predictions_frame("phenotype", ["a", "b", "c"], {**base, "y": y, "p": p, "p__ehr": 1 - p})
    order = np.argsort(base["stay_id"])
    y2, p2, names = runs.prediction_arrays(f, "phenotype")
    assert names == ["a", "b", "c"] and runs.prediction_heads(f) == ["ehr"]
    np.testing.assert_array_equal(y2, y[order])
    np.testing.assert_array_equal(p2, p[order])
    np.testing.assert_array_equal(runs.prediction_arrays(runs.head_frame(f, "ehr", "phenotype"), "phenotype")[1],
                                  1 - p[order])  # fmt: skip
    classes = rng.integers(0, 7, n)
    probs = rng.dirichlet(np.ones(7), n)
    names = [f"los_{k}" for k in range(7)]
    f = runs.predictions_frame("los", names, {**base, "y": classes, "p": probs})
    assert f.columns.tolist() == ["stay_id", "cxr_input", "y_los", *[f"p_{m}" for m in names]]
    y2, p2, names2 = runs.prediction_arrays(f, "los")
    assert names2 == names and y2.tolist() == classes[order].tolist()
    np.testing.assert_array_equal(p2, probs[order])
    with pytest.raises(runs.RunsError, match="missing columns"):
        runs.prediction_arrays(f.drop(columns="y_los"), "los")
