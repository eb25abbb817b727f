"""Modality contribution and missingness: predictor reproduces the run, ablations, nested test-time X-ray dropout,
curves, natural missingness, tables over runs, errors. Tiny runs on the fake dataset (preset "test")."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from carebench.analysis import modality as M
from carebench.data.folds import n_dropped
from carebench.experiments.plan import DEFAULT_TEST_RATES
from carebench.runs import RunsError, read_run
from carebench.training import resolve_config, train_run
from fake_dataset import make_fake_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fake_dataset(tmp_path_factory.mktemp("modality"), n=150, image_size=16, n_features=4, seed=5)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    res = {}
    for model in ("lstm", "latefusion"):
        cfg = resolve_config(
            data=data_dir,
            model=model,
            task="mortality",
            preset="test",
            options={"progress": False, "max_epochs": 1},
        )
        res[model] = train_run(cfg, out).run_dir
    return res


@pytest.fixture(scope="module")
def predictors(runs):
    return {m: M.RunPredictor(d) for m, d in runs.items()}


def test_full_predictions_reproduce_the_run_record(runs, predictors):
    for model, pred in predictors.items():
        got = pred.predict()
        rec = pd.read_parquet(runs[model] / "predictions.parquet")
        pd.testing.assert_frame_equal(got, rec, check_exact=True)


def test_drop_cxr_changes_nothing_for_an_ehr_only_model(predictors):
    lstm = predictors["lstm"]
    full, no_cxr = lstm.predict(), lstm.predict(condition="drop_cxr")
    assert full.cxr_input.any() and not no_cxr.cxr_input.any()
    np.testing.assert_array_equal(no_cxr.p_mortality.to_numpy(), full.p_mortality.to_numpy())  # exact
    no_ehr = lstm.predict(condition="drop_ehr")
    assert not np.allclose(no_ehr.p_mortality, full.p_mortality)
    assert no_ehr.p_mortality.nunique() == 1  # an EHR-only model without EHR: one constant prediction


def test_drop_cxr_changes_an_xray_model_only_where_there_was_an_xray(predictors):
    lf = predictors["latefusion"]
    full, no_cxr = lf.predict(), lf.predict(condition="drop_cxr")
    had = full.cxr_input.to_numpy()
    assert had.sum() > 5 and (~had).sum() > 5
    diff = np.abs(no_cxr.p_mortality.to_numpy() - full.p_mortality.to_numpy())
    assert (diff[had] > 1e-7).all()  # every stay that had an X-ray changes
    assert diff[~had].max() <= 1e-6  # a stay without one already looked like this
    np.testing.assert_array_equal(no_cxr.y_mortality, full.y_mortality)
    at_one = lf.predict(cxr_missing_rate=1.0)  # missing rate 1 == dropping every X-ray
    np.testing.assert_allclose(at_one.p_mortality, no_cxr.p_mortality, rtol=0, atol=1e-6)


def test_test_time_missingness_is_nested_deterministic_and_exact(runs, predictors):
    lf = predictors["latefusion"]
    ds = lf.fold.test
    natural = ds.has_cxr | ds.dropped
    rates = DEFAULT_TEST_RATES
    masks = [lf.dropped(r) for r in rates]
    for r, m in zip(rates, masks, strict=True):
        assert m.sum() == n_dropped(r, natural.sum()) and not (m & ~natural).any()
    for lo, hi in itertools.pairwise(masks):
        assert not (lo & ~hi).any()  # stays dropped at r are dropped at every r' > r
    assert masks[-1].sum() > masks[1].sum() > 0
    again = M.RunPredictor(runs["latefusion"]).dropped(0.5)
    np.testing.assert_array_equal(again, masks[5])
    other = lf.dropped(0.5, seed=123)
    assert other.sum() == masks[5].sum() and not np.array_equal(other, masks[5])
    pred = lf.predict(cxr_missing_rate=0.5)
    by_stay = dict(zip(ds.stay_ids, natural & ~masks[5], strict=True))
    assert pred.cxr_input.tolist() == [by_stay[s] for s in pred.stay_id]


def test_missingness_curve_table(predictors):
    lf = predictors["latefusion"]
    curve = M.missingness_curve(
        lambda r: lf.predict(cxr_missing_rate=r), "mortality", method="latefusion", rates=[0.0, 0.5, 0.9]
    )
    n_with = int((lf.fold.test.has_cxr | lf.fold.test.dropped).sum())
    auroc = curve[curve.metric == "auroc"].set_index("rate")
    assert auroc["n_cxr_input"].to_dict() == {r: n_with - n_dropped(r, n_with) for r in (0.0, 0.5, 0.9)}
    for r in (0.0, 0.5, 0.9):
        p = lf.predict(cxr_missing_rate=r)
        assert auroc.loc[r, "value"] == pytest.approx(skm.roc_auc_score(p.y_mortality, p.p_mortality))
    assert auroc.loc[0.0, "delta"] == 0.0
    assert auroc.loc[0.9, "delta"] == pytest.approx(auroc.loc[0.9, "value"] - auroc.loc[0.0, "value"])
    assert set(curve.metric) >= {"auroc", "auprc", "brier", "ece"}
    with pytest.raises(M.ModalityError, match="rate"):
        M.missingness_curve(lambda r: None, "mortality", method="x", rates=[0.0, 1.5])
    with pytest.raises(M.ModalityError, match="increasing"):
        M.missingness_curve(lambda r: None, "mortality", method="x", rates=[0.5, 0.1])


def test_run_level_tables(runs):
    abl = M.run_ablation(runs["lstm"])
    assert set(abl.condition) == set(M.CONDITIONS) and (abl.run_id == runs["lstm"].name).all()
    drop_cxr = abl[abl.condition == "drop_cxr"]
    assert (drop_cxr.delta == 0).all()  # EHR-only model: exactly no contribution of the X-ray
    curve = M.run_missingness_curve(runs["latefusion"], rates=[0.0, 0.3])
    assert curve.rate.unique().tolist() == [0.0, 0.3] and (curve.method == "latefusion").all()
    table = M.dropout_runs_table(read_run(r) for r in runs.values())
    assert set(table.method) == {"lstm", "latefusion"} and (table.cxr_dropout_train == 0.0).all()
    assert not table.metric.str.contains("/").any() and "auroc" in set(table.metric)


def _fake_preds(seed, n=60, heads=()):
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1, 0], n // 3)
    df = pd.DataFrame(
        {
            "stay_id": np.arange(n),
            "cxr_input": np.arange(n) % 2 == 0,
            "y_mortality": y,
            "p_mortality": np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, n), 0, 1),
        }
    )
    for h in heads:
        df[f"p_mortality__{h}"] = rng.random(n)
    return df


def test_ablation_table_from_a_prediction_function():
    frames = {
        "full": _fake_preds(0, heads=("ehr", "cxr")),
        "drop_cxr": _fake_preds(1),
        "drop_ehr": _fake_preds(2),
    }
    frames["drop_cxr"]["cxr_input"] = False
    t = M.ablation_table(frames.__getitem__, "mortality", method="m")
    auroc = t[t.metric == "auroc"].set_index("condition")
    assert auroc.index.tolist() == ["full", "drop_cxr", "drop_ehr", "head:cxr", "head:ehr"]
    full = skm.roc_auc_score(frames["full"].y_mortality, frames["full"].p_mortality)
    assert auroc.loc["full", "value"] == pytest.approx(full)
    head = skm.roc_auc_score(frames["full"].y_mortality, frames["full"]["p_mortality__ehr"])
    assert auroc.loc["head:ehr", "value"] == pytest.approx(head)
    assert auroc.loc["head:ehr", "delta"] == pytest.approx(head - full)
    drop = skm.roc_auc_score(frames["drop_ehr"].y_mortality, frames["drop_ehr"].p_mortality)
    assert auroc.loc["drop_ehr", "delta"] == pytest.approx(drop - full)
    assert auroc.loc["drop_cxr", "n_cxr_input"] == 0 and auroc.loc["full", "n_cxr_input"] == 30
    with pytest.raises(M.ModalityError, match="conditions"):
        M.ablation_table(frames.__getitem__, "mortality", method="m", conditions=["drop_cxr"])
    shifted = dict(frames, drop_ehr=frames["drop_ehr"].assign(stay_id=lambda d: d.stay_id + 1))
    with pytest.raises(M.ModalityError, match="same stays"):
        M.ablation_table(shifted.__getitem__, "mortality", method="m")


def test_natural_missingness_by_availability():
    df = _fake_preds(3)
    t = M.natural_missingness(df, "mortality", method="m")
    auroc = t[t.metric == "auroc"].set_index("subset")
    assert auroc["n"].to_dict() == {"all": 60, "with_cxr": 30, "without_cxr": 30}
    w = df[df.cxr_input]
    assert auroc.loc["with_cxr", "value"] == pytest.approx(skm.roc_auc_score(w.y_mortality, w.p_mortality))
    with pytest.raises(M.ModalityError, match="cxr_input"):
        M.natural_missingness(df.drop(columns="cxr_input"), "mortality", method="m")


def test_errors(tmp_path, predictors):
    with pytest.raises(M.ModalityError, match="condition"):
        M.ablate_batch({}, "drop_both")
    with pytest.raises(RunsError, match="DONE: missing"):
        M.RunPredictor(tmp_path)
    with pytest.raises(M.ModalityError, match="split"):
        predictors["lstm"].predict(split="holdout")
    with pytest.raises(M.ModalityError, match=r"\[0, 1\]"):
        predictors["lstm"].dropped(-0.1)
