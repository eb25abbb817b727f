"""Thresholded metrics (F1, sensitivity, specificity, ...) at thresholds chosen on VALIDATION predictions, never at
0.5 on test: the kernels with per-stay thresholds, the leaderboard of `carebench analyze` (per method and fold,
the seed ensemble's validation thresholds) and the run record of `carebench train` (metrics.json)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from benchmark_fixture import train_runs, write_run
from carebench import runs as R
from carebench.analysis import analyze as A
from carebench.evaluation.metrics import choose_threshold, compute_metrics, task_thresholds
from carebench.evaluation.statistics import metric_values, paired_permutation_test
from fake_dataset import make_fake_dataset

torch.set_num_threads(2)
TOL = 1e-12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fake_dataset(
        tmp_path_factory.mktemp("thresholds"), n=200, image_size=16, n_features=4, seed=8
    )


# ------------------------------------------------------------------------------------------------ kernels
def test_kernels_decide_each_stay_at_its_own_threshold():
    rng = np.random.default_rng(0)
    n = 80
    y = (rng.random(n) < 0.3).astype(int)
    p = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.2, n), 0, 1)
    t = np.where(np.arange(n) < 40, 0.3, 0.6)  # two folds, two thresholds
    got = metric_values(y, p, ["f1", "recall", "specificity", "accuracy", "auroc"], thresholds=t)
    pred = (p >= t).astype(int)
    assert got["f1"][0] == pytest.approx(skm.f1_score(y, pred), abs=TOL)
    assert got["recall"][0] == pytest.approx(skm.recall_score(y, pred), abs=TOL)
    assert got["specificity"][0] == pytest.approx(skm.recall_score(y, pred, pos_label=0), abs=TOL)
    assert got["accuracy"][0] == pytest.approx(skm.accuracy_score(y, pred), abs=TOL)
    assert got["auroc"][0] == pytest.approx(
        skm.roc_auc_score(y, p), abs=TOL
    )  # rank metrics ignore thresholds
    # an undecided output (NaN threshold: one class in validation) has no thresholded metric
    undecided = metric_values(y, p, ["f1", "auroc"], thresholds=np.full(n, np.nan))
    assert np.isnan(undecided["f1"][0]) and not np.isnan(undecided["auroc"][0])
    # multilabel macro F1 at per-label thresholds, over the labels that have one
    yl = (rng.random((n, 3)) < 0.4).astype(int)
    pl = np.clip(0.3 + 0.3 * yl + rng.normal(0, 0.2, (n, 3)), 0, 1)
    tl = np.array([0.4, 0.55, np.nan])
    got = metric_values(yl, pl, ["f1_macro"], names=["a", "b", "c"], thresholds=tl)["f1_macro"][0]
    want = np.mean([skm.f1_score(yl[:, j], (pl[:, j] >= tl[j]).astype(int)) for j in (0, 1)])
    assert got == pytest.approx(want, abs=TOL)
    assert compute_metrics("phenotype", yl, pl, ["a", "b", "c"], tl)["f1_macro"] == pytest.approx(
        want, abs=TOL
    )


def test_permutation_swaps_carry_each_models_threshold():
    """Under a swap a stay contributes the other model's score decided at the other model's threshold."""
    rng = np.random.default_rng(1)
    n = 12  # 2**12 patterns <= n_permutations: the exact test enumerates every swap
    y = np.array([0, 1] * 6)
    pa, pb = rng.random(n), rng.random(n)
    ta, tb = 0.3, 0.7
    res = paired_permutation_test(y, pa, pb, "f1", n_permutations=5000, thresholds_a=ta, thresholds_b=tb)
    assert res.exact
    f1 = lambda d: skm.f1_score(y, d.astype(int), zero_division=0)  # noqa: E731
    assert res.statistic == pytest.approx(f1(pa >= ta) - f1(pb >= tb), abs=TOL)
    swap = (np.arange(4096)[:, None] >> np.arange(n)) & 1
    null = [
        f1(np.where(s, pb >= tb, pa >= ta)) - f1(np.where(s, pa >= ta, pb >= tb)) for s in swap.astype(bool)
    ]
    assert np.sort(res.null_distribution) == pytest.approx(np.sort(null), abs=TOL)


# ------------------------------------------------------------------------------------------------ analyze
def _shift_validation(run, shift: float) -> None:
    """Validation scores shifted upwards: the F1-optimal validation threshold then differs from the test one."""
    path = run / R.VAL_PREDICTIONS
    val = pd.read_parquet(path)
    for c in [c for c in val.columns if c.startswith("p_")]:
        val[c] = np.clip(val[c] + shift, 0.0, 1.0)
    val.to_parquet(path, index=False)


def test_leaderboard_uses_validation_thresholds_not_the_best_test_one(data_dir, tmp_path):
    out = tmp_path / "runs"
    for model, signal in (("lstm", 0.9), ("medfuse", 1.4)):
        for fold in (1, 2):
            for seed in (0, 1):
                run = write_run(data_dir, out, model, "mortality", fold, seed, signal)
                _shift_validation(run, 0.15 + 0.05 * seed)
    res = A.analyze(out, n_bootstrap=50, n_permutations=99, fairness=False, missingness=False, ablation=False)
    board = res.tables["leaderboard"].set_index(["method", "metric"])
    assert res.summary["groups"][0]["threshold_rule"] == "f1"

    cohort = pd.read_parquet(data_dir / "cohort.parquet")
    fold_of = cohort.set_index("stay_id")["fold"]
    for method in ("lstm", "medfuse"):
        test = pd.concat(
            pd.read_parquet(c.parent / R.PREDICTIONS) for c in out.glob(f"{method}_*/config.yaml")
        )
        test = test.groupby("stay_id").mean().sort_index()
        # the validation threshold of each fold's seed ensemble (validation scores averaged over the seeds)
        thr = {}
        for fold in (1, 2):
            val = pd.concat(
                pd.read_parquet(c.parent / R.VAL_PREDICTIONS)
                for c in out.glob(f"{method}_*_f{fold}_*/config.yaml")
            )
            val = val.groupby("stay_id").mean()
            thr[fold] = choose_threshold(val["y_mortality"].astype(int), val["p_mortality"], "f1")
        t = fold_of.reindex(test.index).map(thr).to_numpy()
        y, p = test["y_mortality"].to_numpy().astype(int), test["p_mortality"].to_numpy()
        pred = (p >= t).astype(int)
        assert board.loc[(method, "f1"), "estimate"] == pytest.approx(skm.f1_score(y, pred), abs=TOL)
        assert board.loc[(method, "recall"), "estimate"] == pytest.approx(skm.recall_score(y, pred), abs=TOL)
        spec = skm.recall_score(y, pred, pos_label=0)
        assert board.loc[(method, "specificity"), "estimate"] == pytest.approx(spec, abs=TOL)
        # the best threshold on test differs and would score higher; 0.5 gives another value again
        best_test = choose_threshold(y, p, "f1")
        assert not np.allclose(t, best_test)
        f1_best = skm.f1_score(y, (p >= best_test).astype(int))
        assert f1_best > board.loc[(method, "f1"), "estimate"] + 0.01
        assert board.loc[(method, "f1"), "estimate"] != pytest.approx(skm.f1_score(y, (p >= 0.5).astype(int)))


# ------------------------------------------------------------------------------------------------ train
def test_run_record_has_validation_thresholds_and_metrics_at_them(data_dir, tmp_path):
    run = train_runs(data_dir, tmp_path / "runs", ["lstm"], task="mortality")["lstm"]
    m = json.loads((run / R.METRICS).read_text())
    val = pd.read_parquet(run / R.VAL_PREDICTIONS)
    test = pd.read_parquet(run / R.PREDICTIONS)
    t = choose_threshold(val["y_mortality"].to_numpy(), val["p_mortality"].to_numpy(), "f1")
    assert m["thresholds"]["rule"] == "f1" and m["thresholds"]["chosen_on"] == "validation"
    assert m["thresholds"]["outputs"] == {"mortality": pytest.approx(t, abs=0)}
    y, p = test["y_mortality"].to_numpy(), test["p_mortality"].to_numpy()
    pred = (p >= t).astype(int)
    assert m["test"]["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0), abs=TOL)
    assert m["test"]["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0), abs=TOL)
    assert task_thresholds("mortality", val["y_mortality"], val["p_mortality"]) == pytest.approx([t])
