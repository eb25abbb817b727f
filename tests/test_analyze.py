"""`carebench analyze`: run discovery, leaderboard and comparisons (exact rows, values equal to scikit-learn on
seed-averaged predictions computed here with pandas), plan options, fairness thresholds from validation
predictions, natural and test-time missingness, ablations and heads from real checkpoints, output files, errors.

Two runs directories: `written` (phenotype and LOS runs whose predictions are drawn from a known model, 2 folds x
2 seeds, no checkpoints) and `trained` (mortality runs trained for one epoch with the `test` preset)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm
from typer.testing import CliRunner

from benchmark_fixture import train_runs, write_plan, write_run, write_runs
from carebench import runs as R
from carebench.analysis import analyze as A
from carebench.analysis import options as AO
from carebench.analysis import outputs as O
from carebench.analysis.modality import RunPredictor
from carebench.cli import app
from carebench.data.folds import n_dropped
from carebench.data.store import dataset_fingerprint
from carebench.experiments.plan import read_plan_record
from fake_dataset import make_fake_dataset

torch.set_num_threads(2)
PHENO = ("latefusion", "lstm", "medfuse", "resnet")
N_PHENO_METRICS = 7 + 2 * 25  # macro/weighted/micro AUROC/AUPRC, macro F1 + per-label AUROC and AUPRC
N_COMPARE_KEYS = 2 + 2 * 25  # auroc_macro, auprc_macro + per-label auroc/auprc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fake_dataset(tmp_path_factory.mktemp("analyze"), n=150, image_size=16, n_features=4, seed=5)


@pytest.fixture(scope="module")
def written(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("written")
    write_runs(data_dir, out)  # phenotype: 4 methods x 2 folds x 2 seeds
    write_runs(data_dir, out, task="los", signal={"lstm": 0.6, "latefusion": 1.2}, folds=(1,), seeds=(0,))
    write_plan(
        out,
        fairness={"enabled": False},
        statistics={"n_bootstrap": 300, "n_permutations": 999, "confidence": 0.9, "seed": 3},
    )
    res = A.analyze(out)
    return out, res


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    runs = train_runs(data_dir, out, ["lstm", "resnet", "latefusion", "drfuse"])
    runs["latefusion_r05"] = train_runs(
        data_dir, out, ["latefusion"], cxr_dropout_train=0.5, cxr_dropout_val=0.5
    )["latefusion"]
    (
        runs["resnet"] / R.VAL_PREDICTIONS
    ).unlink()  # an older record: validation predictions from the checkpoint
    res = A.analyze(out, n_bootstrap=200, n_permutations=400, test_rates=[0.3, 0.9])
    return out, runs, res


def _pooled(data_dir, runs_dir, task, method):
    """Seed-averaged test predictions of a method's written runs, folds concatenated (pandas only)."""
    frames = []
    for cfg in sorted(runs_dir.glob(f"{method}_{task}_*/config.yaml")):
        frames.append(pd.read_parquet(cfg.parent / "predictions.parquet"))
    df = pd.concat(frames)
    return df.groupby("stay_id").mean().sort_index()


# ------------------------------------------------------------------------------------------- leaderboard
def test_leaderboard_rows_and_values_equal_sklearn_on_seed_averaged_predictions(data_dir, written):
    out, res = written
    board = res.tables["leaderboard"]
    pheno = board[board.task == "phenotype"]
    assert len(pheno) == len(PHENO) * N_PHENO_METRICS
    assert sorted(pheno.method.unique()) == list(PHENO)
    assert (pheno.n_seeds == 2).all() and (pheno.n_runs == 4).all() and (pheno.n_resamples_valid <= 300).all()
    los = board[board.task == "los"]
    assert len(los) == 2 * (6 + 7) and (los.n_seeds == 1).all() and los.seed_sd.isna().all()
    assert (board.cohort == "base").all()
    assert dict(zip(pheno.method, pheno.modalities, strict=False)) == {
        "latefusion": "ehr+cxr",
        "lstm": "ehr",
        "medfuse": "ehr+cxr",
        "resnet": "cxr",
    }

    cohort = pd.read_parquet(data_dir / "cohort.parquet")
    stays_f12 = set(cohort.stay_id[cohort.fold.isin([1, 2])])
    for method in ("lstm", "medfuse"):
        df = _pooled(data_dir, out, "phenotype", method)
        assert set(df.index) == stays_f12 and (pheno[pheno.method == method].n_stays == len(stays_f12)).all()
        ycols = [c for c in df.columns if c.startswith("y_pheno_")]
        y = df[ycols].to_numpy().astype(int)
        p = df[[f"p_{c[2:]}" for c in ycols]].to_numpy()
        got = pheno[pheno.method == method].set_index(["label", "metric"])["estimate"]
        assert got[("phenotype", "auroc_macro")] == pytest.approx(
            skm.roc_auc_score(y, p, average="macro"), abs=1e-12
        )
        assert got[("phenotype", "auprc_micro")] == pytest.approx(
            skm.average_precision_score(y, p, average="micro"), abs=1e-12
        )
        j = ycols.index("y_pheno_shock")
        assert got[("pheno_shock", "auroc")] == pytest.approx(skm.roc_auc_score(y[:, j], p[:, j]), abs=1e-12)
        # seed mean: the metric per seed (folds concatenated), then averaged
        per_seed = []
        for seed in (0, 1):
            parts = [
                pd.read_parquet(c.parent / "predictions.parquet")
                for c in sorted(out.glob(f"{method}_phenotype_*_s{seed}_*/config.yaml"))
            ]
            d = pd.concat(parts)
            per_seed.append(
                skm.roc_auc_score(d[ycols].to_numpy(), d[[f"p_{c[2:]}" for c in ycols]].to_numpy())
            )
        row = pheno[(pheno.method == method) & (pheno.metric == "auroc_macro") & (pheno.label == "phenotype")]
        assert row.seed_mean.item() == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert row.seed_sd.item() == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    ok = board.ci_low.notna()
    assert ok.mean() > 0.9
    assert (
        (board.ci_low[ok] <= board.estimate[ok] + 1e-12) & (board.estimate[ok] <= board.ci_high[ok] + 1e-12)
    ).all()


def test_comparisons_rows_reference_and_multiplicity(data_dir, written):
    out, res = written
    comp = res.tables["comparisons"]
    pheno = comp[comp.task == "phenotype"]
    # 2 fusion methods vs the reference + the 3 pairs with late fusion (default --pairs findings), each on 52 keys
    assert res.summary["options"]["pairs"] == "findings"
    assert len(pheno) == (2 + 3) * N_COMPARE_KEYS
    assert (pheno.comparison == "reference").sum() == 2 * N_COMPARE_KEYS
    pw = pheno[pheno.comparison == "pairwise"]
    assert set(zip(pw.method_a, pw.method_b, strict=True)) == {
        ("latefusion", "lstm"),
        ("latefusion", "medfuse"),
        ("latefusion", "resnet"),
    }
    # the reference: the unimodal method with the best macro AUPRC of its seed-averaged predictions
    best = {}
    for method in ("lstm", "resnet"):
        df = _pooled(data_dir, out, "phenotype", method)
        ycols = [c for c in df.columns if c.startswith("y_pheno_")]
        best[method] = skm.average_precision_score(
            df[ycols].to_numpy().astype(int), df[[f"p_{c[2:]}" for c in ycols]].to_numpy(), average="macro"
        )
    ref = max(best, key=best.get)
    assert set(pheno.reference) == {ref} and set(pheno[pheno.comparison == "reference"].method_b) == {ref}
    assert set(pheno[pheno.comparison == "reference"].method_a) == {"latefusion", "medfuse"}
    los = comp[comp.task == "los"]
    assert len(los) == 2 * 2 and set(los.reference) == {"lstm"}
    assert (comp.n_seeds_a[comp.task == "phenotype"] == 2).all()
    # sequential tests (default h = 50): a test that met 50 permuted differences as extreme as the observed one
    # stopped there with p = 50 / permutations used; the others drew all 999
    assert res.summary["options"]["sequential_h"] == 50
    stopped = comp.n_permutations < 999
    assert stopped.any() and (~stopped).any() and (comp.n_permutations >= 50).all()
    np.testing.assert_allclose(comp.p_value[stopped], 50 / comp.n_permutations[stopped], rtol=0, atol=1e-15)
    assert (comp.p_value[~stopped] <= 50 / 1000 + 1e-15).all()
    p = comp.p_value
    assert p.between(1 / 1000, 1).all()
    assert (comp.p_holm >= p - 1e-15).all() and (comp.p_bh >= p - 1e-15).all()
    assert (comp.p_holm >= comp.p_bh - 1e-12).all()
    # Holm recomputed here for one family
    fam = pheno[pheno.family == "phenotype:reference:auroc:per_label"]
    assert len(fam) == 2 * 25
    q = np.sort(fam.p_value.to_numpy())
    m = len(q)
    holm = np.minimum(1, np.maximum.accumulate((m - np.arange(m)) * q))
    np.testing.assert_allclose(np.sort(fam.p_holm.to_numpy()), holm, rtol=0, atol=1e-15)
    # the strong method is significantly better than the reference on macro AUROC
    strong = pheno[
        (pheno.comparison == "reference")
        & (pheno.method_a == "medfuse")
        & (pheno.label == "phenotype")
        & (pheno.metric == "auroc_macro")
    ].iloc[0]
    assert strong.delta > 0 and strong.p_holm < 0.05 and strong.ci_low > 0
    assert strong.delta == pytest.approx(strong.estimate_a - strong.estimate_b, abs=1e-12)


def test_plan_options_and_their_precedence(written):
    out, res = written
    opts = res.summary["options"]
    assert (opts["n_bootstrap"], opts["n_permutations"], opts["confidence"], opts["seed"]) == (
        300,
        999,
        0.9,
        3,
    )
    assert opts["fairness"] is False and res.tables["fairness_summary"].empty
    plan = read_plan_record(out)
    assert AO.resolve_options(plan, n_bootstrap=50, fairness=True).n_bootstrap == 50
    assert AO.resolve_options(plan, fairness=True).fairness is True
    default = AO.resolve_options(None)
    assert (default.n_bootstrap, default.n_permutations, default.confidence, default.fairness) == (
        1000,
        10000,
        0.95,
        True,
    )
    assert default.test_rates == [round(0.1 * i, 1) for i in range(10)]
    assert AO.resolve_options(None, test_rates=[0.5, 0.2]).test_rates == [0.0, 0.2, 0.5]
    with pytest.raises(AO.AnalysisError, match="--n-bootstrap"):
        AO.resolve_options(None, n_bootstrap=0)
    with pytest.raises(AO.AnalysisError, match="--confidence"):
        AO.resolve_options(None, confidence=1.5)


def test_natural_missingness_splits_stays_by_xray(data_dir, written):
    out, res = written
    nat = res.tables["missingness_natural"]
    cohort = pd.read_parquet(data_dir / "cohort.parquet")
    f12 = cohort[cohort.fold.isin([1, 2])]
    lstm = nat[(nat.task == "phenotype") & (nat.method == "lstm") & (nat.metric == "auroc_macro")].set_index(
        "subset"
    )
    assert lstm.n_stays.to_dict() == {
        "all": len(f12),
        "with_cxr": int(f12.has_cxr.sum()),
        "without_cxr": int((~f12.has_cxr).sum()),
    }
    df = _pooled(data_dir, out, "phenotype", "lstm")
    with_cxr = df.loc[sorted(f12.stay_id[f12.has_cxr])]
    ycols = [c for c in df.columns if c.startswith("y_pheno_")]
    y, p = with_cxr[ycols].to_numpy().astype(int), with_cxr[[f"p_{c[2:]}" for c in ycols]].to_numpy()
    ok = (y.min(0) == 0) & (y.max(0) == 1)
    assert lstm.loc["with_cxr", "value"] == pytest.approx(skm.roc_auc_score(y[:, ok], p[:, ok]), abs=1e-12)
    assert lstm.loc["all", "delta"] == 0
    assert set(nat.metric[nat.task == "los"]) == {"auroc_ovr_macro", "accuracy"}
    # no checkpoints in the written runs: no modality tables, and a note saying why
    assert res.tables["ablation"].empty and res.tables["missingness_test"].empty
    assert any("without a checkpoint" in w for w in res.summary["warnings"])


# ------------------------------------------------------------------------------------------- trained runs
def test_validation_predictions_are_recorded_and_equal_the_checkpoint(trained):
    _, runs, _ = trained
    for model in ("lstm", "latefusion"):
        rec = pd.read_parquet(runs[model] / R.VAL_PREDICTIONS)
        again = RunPredictor(runs[model]).predict(split="val")
        pd.testing.assert_frame_equal(rec, again, check_exact=True)


def test_fairness_thresholds_come_from_validation_predictions(trained, data_dir):
    _, runs, res = trained
    thr = res.tables["fairness_thresholds"].set_index("run_id")["threshold"]
    assert set(thr.index) == {runs[m].name for m in ("lstm", "resnet", "latefusion", "drfuse")}
    for model in ("lstm", "resnet"):
        val = (
            pd.read_parquet(runs[model] / R.VAL_PREDICTIONS)
            if model == "lstm"
            else RunPredictor(runs[model]).predict(split="val")
        )
        fpr, tpr, cut = skm.roc_curve(val.y_mortality, val.p_mortality, drop_intermediate=False)
        assert thr[runs[model].name] == pytest.approx(cut[1:][np.argmax((tpr - fpr)[1:])], abs=0)
    groups = res.tables["fairness_groups"]
    assert set(groups.attribute) >= {"overall", "gender", "age_band", "has_cxr"}
    assert set(groups.method) == {"lstm", "resnet", "latefusion", "drfuse"}
    summ = res.tables["fairness_summary"]
    g = summ[(summ.method == "lstm") & (summ.attribute == "gender") & (summ.metric == "auroc")].iloc[0]
    both = groups[
        (groups.method == "lstm") & (groups.attribute == "gender") & ~groups.suppressed.astype(bool)
    ]
    assert g.gap == pytest.approx(both.auroc.max() - both.auroc.min(), abs=1e-12)


def test_ablation_deltas_and_heads(trained):
    _, runs, res = trained
    abl = res.tables["ablation"]
    assert set(abl.method) == {"lstm", "resnet", "latefusion", "drfuse"}  # main runs only
    a = abl.set_index(["method", "condition", "metric"])
    assert a.loc[("lstm", "drop_cxr", "auroc"), "delta"] == 0.0  # the EHR-only model ignores the X-ray
    assert a.loc[("lstm", "drop_cxr", "auroc"), ["delta_ci_low", "delta_ci_high"]].tolist() == [0.0, 0.0]
    assert a.loc[("resnet", "drop_ehr", "auprc"), "delta"] == 0.0  # the X-ray-only model ignores the EHR
    pred = RunPredictor(runs["latefusion"])
    for cond in ("drop_cxr", "drop_ehr"):
        frame = pred.predict(condition=cond)
        want = skm.roc_auc_score(frame.y_mortality, frame.p_mortality)
        assert a.loc[("latefusion", cond, "auroc"), "value"] == pytest.approx(want, abs=1e-12)
        full = a.loc[("latefusion", "full", "auroc"), "value"]
        assert a.loc[("latefusion", cond, "auroc"), "delta"] == pytest.approx(want - full, abs=1e-12)
    assert a.loc[("latefusion", "drop_cxr", "auroc"), "n_cxr_input"] == 0
    heads = sorted(c for c in abl.condition.unique() if c.startswith("head:"))
    assert heads == ["head:cxr", "head:ehr", "head:shared"]
    assert set(abl[abl.condition.str.startswith("head:")].method) == {"drfuse"}
    rec = pd.read_parquet(runs["drfuse"] / "predictions.parquet")
    assert a.loc[("drfuse", "head:ehr", "auroc"), "value"] == pytest.approx(
        skm.roc_auc_score(rec.y_mortality, rec["p_mortality__ehr"]), abs=1e-6
    )


def test_test_time_missingness_composes_exactly(trained, data_dir):
    out, runs, res = trained
    records = {r.run_id: r for r in R.find_runs(out)}
    opts = AO.resolve_options(None, test_rates=[0.3, 0.9])
    for model in ("latefusion", "drfuse"):
        frames = A.controlled_predictions(records[runs[model].name], data_dir, opts, ablation=False)
        pred = RunPredictor(runs[model])
        for rate in (0.0, 0.3, 0.9):
            direct = pred.predict(cxr_missing_rate=rate)
            got = frames.at_rate[rate]
            assert got.stay_id.tolist() == direct.stay_id.tolist()
            assert got.cxr_input.tolist() == direct.cxr_input.tolist()
            np.testing.assert_allclose(got.p_mortality, direct.p_mortality, rtol=0, atol=1e-6)
    curve = res.tables["missingness_test"]
    main = curve[(curve.train_rate == 0.0) & (curve.metric == "auroc")]
    assert sorted(main.rate.unique()) == [0.0, 0.3, 0.9]
    assert len(curve) == (4 * 3 + 1 * 3) * 2  # 4 main methods + the dropout run; 3 rates; 2 metrics
    lf = main[main.method == "latefusion"].set_index("rate")
    natural = int(pd.read_parquet(runs["latefusion"] / "predictions.parquet").cxr_input.sum())
    assert lf.n_cxr_input.to_dict() == {r: natural - n_dropped(r, natural) for r in (0.0, 0.3, 0.9)}
    lstm = main[main.method == "lstm"]
    assert lstm.value.nunique() == 1 and not lstm.uses_cxr.any()  # a model that never reads the X-ray: flat
    train = res.tables["missingness_train"]
    assert sorted(train[train.metric == "auroc"].train_rate) == [0.0, 0.5]
    assert set(train.method) == {"latefusion"}
    dr = res.tables["dropout_runs"]
    assert set(dr.run_id) == {runs["latefusion"].name, runs["latefusion_r05"].name}


def test_outputs_on_disk(trained):
    out, _, res = trained
    adir = out / O.ANALYSIS_DIR
    for name in O.TABLES:
        pq = pd.read_parquet(adir / f"{name}.parquet")
        assert len(pq) == len(res.tables[name])
        if len(pq):
            assert len(pd.read_csv(adir / f"{name}.csv")) == len(pq)
    summary = json.loads((adir / O.SUMMARY).read_text())
    assert summary["n_runs"] == 5 and summary["n_main_runs"] == 4
    assert summary["tables"]["leaderboard"] == len(res.tables["leaderboard"])
    (group,) = summary["groups"]
    assert group["task"] == "mortality" and group["unimodal"] == ["lstm", "resnet"]
    assert group["reference"] in ("lstm", "resnet") and group["n_stays"] == 30
    tables, _ = O.load_analysis(out)
    pd.testing.assert_frame_equal(tables["comparisons"], res.tables["comparisons"].reset_index(drop=True))
    assert not list(out.glob(".analysis*"))


def test_worker_processes_give_identical_tables(trained, tmp_path):
    """The analysis on 2 worker processes (method pairs, bootstraps, fairness per run, forward passes per run)
    writes exactly the tables of the serial analysis: same rows, same values, bit for bit."""
    out, _, res = trained
    copy = shutil.copytree(out, tmp_path / "runs", ignore=shutil.ignore_patterns(O.ANALYSIS_DIR))
    parallel = A.analyze(copy, n_bootstrap=200, n_permutations=400, test_rates=[0.3, 0.9], jobs=2)
    assert res.summary["options"]["jobs"] == 1 and parallel.summary["options"]["jobs"] == 2
    assert parallel.tables.keys() == res.tables.keys()
    for name, table in res.tables.items():
        pd.testing.assert_frame_equal(parallel.tables[name], table, check_exact=True, obj=name)
    assert (
        len(res.tables["comparisons"]) and len(res.tables["fairness_groups"]) and len(res.tables["ablation"])
    )


def test_a_failed_write_leaves_the_previous_analysis(trained):
    out, _, res = trained
    before = (out / O.ANALYSIS_DIR / O.SUMMARY).read_text()
    bad = dict(res.tables, runs=pd.DataFrame({"x": [object()]}))
    with pytest.raises(Exception):  # noqa: B017 - pyarrow's error type for an unserialisable column
        O.write_analysis(out / O.ANALYSIS_DIR, bad, {"broken": True})
    assert (out / O.ANALYSIS_DIR / O.SUMMARY).read_text() == before
    assert not list(out.glob(".analysis*"))


def test_a_killed_analysis_resumes_from_the_pieces_it_finished(written, tmp_path, monkeypatch):
    """Killed in the second group's statistics, then again in the fairness of the fourth run: the third analyze
    computes only what was left (1 statistics group was kept, then 3 fairness runs), writes tables identical to an
    uninterrupted analysis, and removes the kept pieces."""
    from carebench.analysis import fairness as F
    from carebench.analysis.resume import WORK_DIR

    kw = {"fairness": True, "missingness": True, "ablation": False, "n_bootstrap": 20, "n_permutations": 19}
    src = shutil.copytree(written[0], tmp_path / "whole", ignore=shutil.ignore_patterns(O.ANALYSIS_DIR))
    whole = A.analyze(src, **kw)
    out = shutil.copytree(src, tmp_path / "runs", ignore=shutil.ignore_patterns(O.ANALYSIS_DIR))
    calls = {"statistics": 0, "fairness": 0}
    kill = {}
    real = {"statistics": A._statistics, "fairness": F._run_fairness}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            if kill.get(name) == calls[name]:
                raise KeyboardInterrupt
            return real[name](*args, **kwargs)

        return call

    monkeypatch.setattr(A, "_statistics", counted("statistics"))
    monkeypatch.setattr(F, "_run_fairness", counted("fairness"))
    kill.update(statistics=2)
    with pytest.raises(KeyboardInterrupt):
        A.analyze(out, **kw)
    assert len(list((out / WORK_DIR).iterdir())) == 1 and not (out / O.ANALYSIS_DIR).exists()
    calls.update(statistics=0, fairness=0)
    kill.clear()
    kill.update(fairness=4)
    with pytest.raises(KeyboardInterrupt):
        A.analyze(out, **kw)
    assert calls == {"statistics": 1, "fairness": 4}  # the first group was not computed again
    assert len(list((out / WORK_DIR).iterdir())) == 2 + 3
    calls.update(statistics=0, fairness=0)
    kill.clear()
    resumed = A.analyze(out, **kw)
    n_runs = len(whole.summary["run_ids"])
    assert calls == {"statistics": 0, "fairness": n_runs - 3} and resumed.summary["resumed_pieces"] == 2 + 3
    assert not (out / WORK_DIR).exists() and whole.summary["resumed_pieces"] == 0
    for name, table in whole.tables.items():
        pd.testing.assert_frame_equal(resumed.tables[name], table, check_exact=True, obj=name)
    assert len(whole.tables["fairness_groups"]) and len(whole.tables["missingness_natural"])

    # a changed option, or a retrained run of the kept group, reuses nothing of it
    for change in ("option", "retrained"):
        calls.update(statistics=0, fairness=0)
        kill.update(statistics=2)
        with pytest.raises(KeyboardInterrupt):
            A.analyze(out, **kw)
        kill.clear()
        if change == "retrained":
            (sorted(out.glob("latefusion_phenotype_*"))[0] / R.DONE).write_text("retrained\n")
        again = A.analyze(out, **{**kw, "seed": 1 if change == "option" else 0, "fairness": False})
        assert again.summary["resumed_pieces"] == 0 and calls["statistics"] == 2 + 2  # killed run, then both


def test_a_killed_analysis_resumes_its_checkpoint_passes(trained, tmp_path, monkeypatch):
    """Killed in the forward passes of the second group (real checkpoints: missing-X-ray curves, ablations), the
    next analyze runs only that group's passes again and writes the tables of the uninterrupted analysis."""
    out, runs, res = trained
    copy = shutil.copytree(out, tmp_path / "runs", ignore=shutil.ignore_patterns(O.ANALYSIS_DIR))
    kw = {"n_bootstrap": 200, "n_permutations": 400, "test_rates": [0.3, 0.9]}
    calls, kill = [], [5]
    real = A._controlled_job

    def job(j):
        calls.append(j[0].run_id)
        if len(calls) == kill[0]:
            raise KeyboardInterrupt
        return real(j)

    monkeypatch.setattr(A, "_controlled_job", job)
    with pytest.raises(KeyboardInterrupt):
        A.analyze(copy, **kw)
    assert len(calls) == 5 and calls[-1] == runs["latefusion_r05"].name  # the base group's 4 runs were done
    calls.clear()
    kill[0] = 0
    resumed = A.analyze(copy, **kw)
    assert calls == [runs["latefusion_r05"].name]
    # kept: the statistics, 4 runs' fairness and the base group's passes
    assert resumed.summary["resumed_pieces"] == 1 + 4 + 1
    for name, table in res.tables.items():
        pd.testing.assert_frame_equal(resumed.tables[name], table, check_exact=True, obj=name)
    assert len(res.tables["ablation"]) and len(res.tables["missingness_test"])


# ------------------------------------------------------------------------------------------- errors, CLI
def test_errors_name_the_problem(tmp_path, data_dir, written):
    with pytest.raises(R.RunsError, match="no finished runs"):
        A.analyze(tmp_path)
    with pytest.raises(R.RunsError, match="not a directory"):
        A.analyze(tmp_path / "nope")
    runs = tmp_path / "dup"
    a = write_run(data_dir, runs, "lstm", "mortality", 1, 0, 1.0)
    b = write_run(data_dir, runs, "lstm", "mortality", 1, 0, 1.0, overrides={"lr": 0.01})
    with pytest.raises(R.RunsError, match=f"{a.name}.*{b.name}|{b.name}.*{a.name}"):
        A.analyze(runs)
    shutil.rmtree(b)
    other = make_fake_dataset(tmp_path, n=60, seed=9, name="other")
    recorded, now = R.read_run(a).data_fingerprint, dataset_fingerprint(other)
    assert recorded != now
    with pytest.raises(R.RunsError, match=f"not the dataset.*{now}.*{recorded}") as err:
        A.analyze(runs, data=other)
    assert str(other) in str(err.value)  # names the dataset and both fingerprints
    (a / "predictions.parquet").unlink()
    with pytest.raises(R.RunsError, match=r"predictions\.parquet"):
        A.analyze(runs)


def test_cli_analyze(tmp_path, data_dir):
    runs = tmp_path / "runs"
    for model, signal in (("lstm", 1.0), ("latefusion", 1.5)):
        write_run(data_dir, runs, model, "mortality", 1, 0, signal)
    cli = CliRunner()
    res = cli.invoke(
        app,
        [
            "analyze",
            str(runs),
            "--no-progress",
            "--n-bootstrap",
            "100",
            "--n-permutations",
            "99",
            "--sequential-h",
            "0",
            "--skip-fairness",
            "--skip-missingness",
            "--skip-ablation",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith(str(runs / "analysis"))
    board = pd.read_parquet(runs / "analysis" / "leaderboard.parquet")
    assert len(board) == 2 * 9 and (board.n_resamples_valid <= 100).all()
    comp = pd.read_parquet(runs / "analysis" / "comparisons.parquet")
    # fusion vs lstm, and the one pair; --sequential-h 0: every test draws all its permutations
    assert len(comp) == 2 * 2 and (comp.n_permutations == 99).all()
    bad = cli.invoke(app, ["analyze", str(tmp_path / "empty")])
    assert bad.exit_code == 2 and "error:" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_label_groups_from_planted_json_add_group_rows(tmp_path, data_dir, written):
    """--label-groups planted.json: one group per planted kind; group macros in the leaderboard equal the mean of
    the per-label AUROCs, group comparisons form their own Holm family, bad files are named."""
    out = tmp_path / "runs"
    shutil.copytree(written[0], out)  # the module's analysis stays as it was
    names = [
        c[2:]
        for c in pd.read_parquet(next(out.glob("lstm_phenotype*")) / "predictions.parquet").columns
        if c.startswith("y_pheno_")
    ]
    planted = tmp_path / "planted.json"
    planted.write_text(
        json.dumps({"phenotypes": {nm: ("a" if j < 10 else "b") for j, nm in enumerate(names)}})
    )
    res = A.analyze(
        out,
        label_groups=str(planted),
        fairness=False,
        missingness=False,
        ablation=False,
        n_bootstrap=50,
        n_permutations=99,
    )
    assert res.summary["options"]["label_groups"] == {"a": names[:10], "b": names[10:]}
    board = res.tables["leaderboard"]
    pheno = board[board.task == "phenotype"]
    for method in PHENO:
        b = pheno[pheno.method == method].set_index(["label", "metric"])["estimate"]
        per_label = np.array([b[(nm, "auroc")] for nm in names[:10]])
        assert b[("group:a", "auroc_macro")] == pytest.approx(np.nanmean(per_label), abs=1e-12)
    comp = res.tables["comparisons"]
    fam = comp[comp.family == "phenotype:reference:auroc_macro:group"]
    assert set(fam.label) == {"group:a", "group:b"} and len(fam) == 2 * 2  # 2 fusion methods x 2 groups
    assert (fam.reference == fam.method_b).all() and set(fam.method_b) <= {"lstm", "resnet"}
    assert (
        len(board[board.task == "los"])
        and not board[board.task == "los"].label.str.startswith("group:").any()
    )
    # the CLI reads YAML {group: [labels]} too, and names a bad file or label
    groups = tmp_path / "groups.yaml"
    groups.write_text(f"first: [{names[0]}, {names[1]}]\n")
    assert AO.resolve_options(None, label_groups=str(groups)).label_groups == {"first": names[:2]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("first: pheno_x\n")
    with pytest.raises(
        AO.AnalysisError, match=r"--label-groups .*bad\.yaml: group 'first': expected a non-empty list"
    ):
        AO.resolve_options(None, label_groups=str(bad))
    with pytest.raises(AO.AnalysisError, match=r"--label-groups .*missing\.json: not a readable"):
        AO.resolve_options(None, label_groups=str(tmp_path / "missing.json"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("first: [pheno_nonexistent]\n")
    cli = CliRunner().invoke(
        app,
        [
            "analyze",
            str(out),
            "--no-progress",
            "--label-groups",
            str(unknown),
            "--skip-fairness",
            "--skip-missingness",
            "--skip-ablation",
        ],
    )
    assert cli.exit_code == 2 and "label group 'first': unknown label(s) ['pheno_nonexistent']" in cli.output


# ------------------------------------------------------------------------------------------- findings
def test_findings_follow_the_planted_signal_of_the_written_runs(written):
    out, res = written
    f = res.tables["findings"]
    assert (out / O.ANALYSIS_DIR / "findings.csv").is_file()
    assert len(pd.read_csv(out / O.ANALYSIS_DIR / "findings.csv")) == len(f) == 8
    assert list(zip(f.task, f.finding, strict=True)) == [("phenotype", i) for i in (1, 2, 3, 4)] + [
        ("los", i) for i in (1, 2, 3, 4)
    ]
    ph = f[f.task == "phenotype"].set_index("finding")
    # signal: medfuse 1.6 > latefusion 1.0 > lstm 0.8 > resnet 0.3 on every label
    assert ph.loc[1, "verdict"] == "supported" and (ph.loc[1, "method_a"], ph.loc[1, "method_b"]) == (
        "medfuse",
        "lstm",
    )
    comp = res.tables["comparisons"]
    row = comp[
        (comp.task == "phenotype")
        & (comp.comparison == "reference")
        & (comp.metric == "auprc_macro")
        & (comp.label == "phenotype")
        & (comp.method_a == "medfuse")
    ].iloc[0]
    assert (ph.loc[1, "effect"], ph.loc[1, "ci_low"], ph.loc[1, "p_value"]) == (
        row.delta,
        row.ci_low,
        row.p_holm,
    )
    assert ph.loc[1, "n_runs"] == 8
    per = comp[(comp.task == "phenotype") & (comp.comparison == "reference") & (comp.metric == "auprc")]
    sig = per[(per.p_holm < 0.05) & (per.ci_low > 0)]  # 999 permutations, 50 tests: Holm p >= 0.05 here
    assert ph.loc[1, "labels"] == ";".join(sorted(set(sig.label))) and per.label.nunique() == 25
    assert ph.loc[2, "verdict"] == "supported" and ph.loc[2, "method_a"] == "medfuse"
    assert ph.loc[3, "verdict"] == "undetermined (not analysed)"  # written runs have no checkpoint
    assert ph.loc[4, "verdict"] == "undetermined (not analysed)" and "fairness" in ph.loc[4, "reason"]
    los = f[f.task == "los"].set_index("finding")
    assert los.loc[2, "verdict"] == "undetermined (too few runs)"  # no cross-modal method on LOS
    assert res.summary["tables"]["findings"] == 8 and "medfuse" in res.summary["missing_aware"]


def test_findings_of_trained_runs_use_the_fairness_and_missingness_tables(trained):
    _, _, res = trained
    f = res.tables["findings"].set_index("finding")
    assert (f.task == "mortality").all() and len(f) == 4
    assert f.loc[3, "verdict"] == "undetermined (too few runs)"  # drfuse is the only missing-aware method
    assert "missing-aware: ['drfuse'], other: ['latefusion']" in f.loc[3, "reason"]
    assert f.loc[4, "verdict"] in ("supported", "not supported")
    fs = res.tables["fairness_summary"]
    ref = f.loc[4, "method_b"]
    assert ref == res.summary["groups"][0]["reference"]
    top = f.loc[4, "reason"].split("largest gap of " + ref + ": ")[1].split(";")[0]
    gaps = fs[(fs.label == "mortality") & (fs.metric == "auroc") & ~fs.attribute.str.contains(":")]
    gaps = gaps[gaps.attribute != "has_cxr"].groupby(["method", "attribute"]).gap.mean()
    assert top == gaps[ref].idxmax()
    assert f.loc[4, "effect"] == pytest.approx(gaps[f.loc[4, "method_a"]][top] - gaps[ref][top])
