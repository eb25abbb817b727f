"""Statistics: vectorised kernels equal scikit-learn, bootstrap and permutation test agree with scipy, p-values
are uniform under the null and small under a clear difference, multiplicity adjustments match known values, and
the tidy comparison of runs equals the same numbers computed by hand from the long predictions table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import metrics as skm

from carebench.analysis.comparisons import compare_methods, method_metrics
from carebench.evaluation import statistics as st
from carebench.evaluation.metrics import compute_metrics
from carebench.evaluation.multiplicity import benjamini_hochberg, holm
from carebench.evaluation.statistics import (
    StatisticsInputError,
    available_metrics,
    bootstrap_ci,
    bootstrap_weights,
    metric_values,
    paired_bootstrap_ci,
    paired_permutation_test,
    rank_metrics_rows,
    swap_blocks,
    weighted_rank_metrics,
)
from carebench.tasks import TaskError

TOL = 1e-12
KIND = {"mortality": "binary", "phenotype": "multilabel", "los": "multiclass"}


def _task_data(task: str, n: int, rng: np.random.Generator):
    """Labels, two models' probabilities (rounded, so scores tie) and names for a task."""
    if task == "mortality":
        y = (rng.random(n) < 0.3).astype(int)
        p = np.round(np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1), 1)
        q = np.round(rng.random(n), 1)
        return y, p, q, ["mortality"]
    if task == "phenotype":
        y = (rng.random((n, 4)) < [0.5, 0.3, 0.15, 0.0]).astype(int)
        y[:2, 3] = 1  # a rare label (2 positives), often lost by a resample
        p = np.round(np.clip(0.3 * y + 0.7 * rng.random((n, 4)), 0, 1), 1)
        q = np.round(rng.random((n, 4)), 1)
        return y, p, q, [f"pheno_{j}" for j in range(4)]
    y = rng.choice(6, n, p=[0.25, 0.2, 0.15, 0.15, 0.1, 0.15])
    y[:2] = 6  # a rare class (2 stays)
    logits = rng.normal(size=(n, 7)) + 1.5 * np.eye(7)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    q = rng.dirichlet(np.ones(7), n)
    return y, p, q, [f"los_{k}" for k in range(7)]


# ------------------------------------------------------------------------------------------ kernels


def test_hand_examples():
    # scikit-learn's documented example, and a tie between a positive and a negative (half credit, one threshold)
    for y, s, auc, ap in (
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75, 0.5 * 1 + 0.5 * 2 / 3 + 0),
        ([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9], 3.5 / 4, 0.5 * 1 + 0.5 * 2 / 3),
    ):
        y, s = np.array(y), np.array(s)
        rows = rank_metrics_rows(y, s[None])
        weighted = weighted_rank_metrics(y, s, np.ones((1, 4), dtype=int))
        vals = metric_values(y, s, ["auroc", "auprc"])
        for got_auc, got_ap in (rows, weighted, (vals["auroc"], vals["auprc"])):
            assert got_auc[0] == pytest.approx(auc, abs=TOL)
            assert got_ap[0] == pytest.approx(ap, abs=TOL)
    # first example: AP = 1/2 * 1 (0.8) + 1/2 * 2/3 (0.35) = 0.8333
    assert rank_metrics_rows(np.array([0, 0, 1, 1]), np.array([[0.1, 0.4, 0.35, 0.8]]))[1][
        0
    ] == pytest.approx(5 / 6)


def test_row_kernel_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    r, n = 200, 50
    y = (rng.random((r, n)) < rng.uniform(0.05, 0.6, (r, 1))).astype(int)
    y[0] = 0  # one class only -> NaN
    scores = np.round(rng.random((r, n)), 1)  # about 5 stays per distinct score
    auc, ap = rank_metrics_rows(y, scores)
    assert np.isnan(auc[0]) and np.isnan(ap[0])
    for i in range(1, r):
        assert auc[i] == pytest.approx(skm.roc_auc_score(y[i], scores[i]), abs=TOL)
        assert ap[i] == pytest.approx(skm.average_precision_score(y[i], scores[i]), abs=TOL)


def test_weighted_kernel_equals_sklearn_sample_weight():
    rng = np.random.default_rng(1)
    n = 80
    y = (rng.random(n) < 0.25).astype(int)
    score = np.round(rng.random(n), 1)
    w = rng.integers(0, 4, (100, n))
    w[0, y == 1] = 0  # no positive weight -> NaN
    auc, ap = weighted_rank_metrics(y, score, w)
    assert np.isnan(auc[0]) and np.isnan(ap[0])
    for i in range(1, len(w)):
        assert auc[i] == pytest.approx(skm.roc_auc_score(y, score, sample_weight=w[i]), abs=TOL)
        assert ap[i] == pytest.approx(skm.average_precision_score(y, score, sample_weight=w[i]), abs=TOL)
        idx = np.repeat(np.arange(n), w[i])  # integer weights = a resample with repeated stays
        assert auc[i] == pytest.approx(skm.roc_auc_score(y[idx], score[idx]), abs=TOL)


@pytest.mark.parametrize("task", ["mortality", "phenotype", "los"])
def test_every_metric_equals_compute_metrics_on_resamples(task):
    rng = np.random.default_rng(2)
    n = 60
    y, p, _, names = _task_data(task, n, rng)
    keys = available_metrics(KIND[task], names)
    counts = next(bootstrap_weights(n, 40, seed=3)).T  # [40 resamples, n stays]
    got = metric_values(y, p, keys, names=names, weights=counts)
    full = compute_metrics(task, y, p, names)
    n_undefined = 0
    for r, w in enumerate(counts):
        idx = np.repeat(np.arange(n), w)
        want = compute_metrics(task, y[idx], p[idx], names)
        for k in keys:
            if np.isnan(got[k][r]) and not np.isnan(want[k]):
                # documented rule: an average is undefined when a label/class defined on the full data lost a class
                assert k.endswith(("_macro", "_weighted"))
                prefix = "auroc/" if task == "los" else f"{k.split('_')[0]}/"
                lost = [nm for nm in names if not np.isnan(full[prefix + nm]) and np.isnan(want[prefix + nm])]
                assert lost, (k, r)
                n_undefined += 1
            else:
                assert got[k][r] == pytest.approx(want[k], abs=TOL, nan_ok=True), (k, r)
    if task != "mortality":
        assert n_undefined > 0  # the rare label / class is lost by some resamples: the rule was exercised


@pytest.mark.parametrize("task", ["mortality", "phenotype", "los"])
def test_permutation_null_equals_sklearn_on_swapped_predictions(task):
    rng = np.random.default_rng(4)
    n, n_perm, seed = 40, 5, 5
    y, p, q, names = _task_data(task, n, rng)
    keys = (
        ["auroc", "auprc", "brier", "f1", "ece"]
        if task == "mortality"
        else (
            ["auprc_macro", "auroc_weighted", "auroc_micro", "auprc/pheno_2"]
            if task == "phenotype"
            else ["auroc_ovr_macro", "kappa_linear", "f1_macro", "auroc/los_6"]
        )
    )
    _, blocks = swap_blocks(n, n_perm, seed)
    swaps = np.concatenate(list(blocks)).astype(bool)
    want = []
    for s in swaps:
        s2 = s if p.ndim == 1 else s[:, None]
        a_star, b_star = np.where(s2, q, p), np.where(s2, p, q)  # stay i's scores swapped where s[i]
        ma, mb = compute_metrics(task, y, a_star, names), compute_metrics(task, y, b_star, names)
        want.append({k: ma[k] - mb[k] for k in keys})
    full_a, full_b = compute_metrics(task, y, p, names), compute_metrics(task, y, q, names)
    for k in keys:
        res = paired_permutation_test(y, p, q, k, names=names, n_permutations=n_perm, seed=seed)
        assert res.statistic == pytest.approx(full_a[k] - full_b[k], abs=TOL)
        assert res.null_distribution == pytest.approx([w[k] for w in want], abs=TOL), k


# ------------------------------------------------------------------------------------------ bootstrap


def _auroc_vectorised(y, p, axis=-1):
    """Reference AUROC by midranks (scipy.stats.rankdata), vectorised over resamples for scipy.stats.bootstrap."""
    ranks = stats.rankdata(p, axis=-1)
    n1 = y.sum(axis=-1)
    n0 = y.shape[-1] - n1
    return ((ranks * y).sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _small_binary(rng, n=40):
    y = np.r_[np.ones(15, int), np.zeros(n - 15, int)]
    rng.shuffle(y)
    return y, np.round(np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1), 2), np.round(rng.random(n), 2)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_equals_scipy_on_the_same_resamples(method):
    # Our unstratified draws are scipy's (rng.integers(0, n, (R, n)) of the same generator), so the intervals match
    # to rounding; if scipy changes its resampling this test says so, and the Monte Carlo test below still holds.
    y, p, q = _small_binary(np.random.default_rng(5))
    ref = stats.bootstrap(
        (y, p),
        _auroc_vectorised,
        paired=True,
        vectorized=True,
        n_resamples=3000,
        method=method,
        rng=np.random.default_rng(7),
    )
    got = bootstrap_ci(y, p, "auroc", n_resamples=3000, seed=7, method=method)
    assert (got.ci_low, got.ci_high) == pytest.approx(tuple(ref.confidence_interval), abs=TOL)
    assert got.standard_error == pytest.approx(ref.standard_error, abs=TOL)
    assert got.estimate == pytest.approx(skm.roc_auc_score(y, p), abs=TOL)

    def delta(y, p, q, axis=-1):
        return _auroc_vectorised(y, p) - _auroc_vectorised(y, q)

    ref = stats.bootstrap(
        (y, p, q),
        delta,
        paired=True,
        vectorized=True,
        n_resamples=3000,
        method=method,
        rng=np.random.default_rng(8),
    )
    got = paired_bootstrap_ci(y, p, q, "auroc", n_resamples=3000, seed=8, method=method)
    assert (got.ci_low, got.ci_high) == pytest.approx(tuple(ref.confidence_interval), abs=TOL)


def test_bootstrap_agrees_with_scipy_within_monte_carlo_error():
    # Independent resamples: percentile bounds of an AUROC at 5,000 resamples differ by Monte Carlo error only
    # (sd of a 2.5 % quantile here ~ 0.003); tolerance 0.01.
    y, p, _ = _small_binary(np.random.default_rng(6))
    ref = stats.bootstrap(
        (y, p),
        _auroc_vectorised,
        paired=True,
        vectorized=True,
        n_resamples=5000,
        method="percentile",
        rng=np.random.default_rng(100),
    )
    got = bootstrap_ci(y, p, "auroc", n_resamples=5000, seed=1, method="percentile")
    assert got.ci_low == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert got.ci_high == pytest.approx(ref.confidence_interval.high, abs=0.01)
    assert got.ci_low < got.estimate < got.ci_high


def test_bootstrap_skips_and_counts_resamples_without_both_classes():
    y = np.zeros(20, int)
    y[3] = 1
    p = np.linspace(0, 1, 20)
    res = bootstrap_ci(y, p, "auroc", n_resamples=2000, seed=0)
    expected_valid = 2000 * (1 - (19 / 20) ** 20)  # the positive is drawn at least once
    sd = np.sqrt(2000 * (19 / 20) ** 20 * (1 - (19 / 20) ** 20))
    assert abs(res.n_valid - expected_valid) < 4 * sd
    assert res.n_resamples == 2000 and len(res.distribution) == res.n_valid
    assert not np.isnan(res.distribution).any()
    # threshold metrics stay defined on every resample
    assert bootstrap_ci(y, p, "brier", n_resamples=500, seed=0).n_valid == 500


def test_stratified_bootstrap_keeps_class_counts():
    rng = np.random.default_rng(9)
    y = (rng.random(50) < 0.1).astype(int)
    for counts in bootstrap_weights(50, 300, seed=2, strata=y):
        assert (counts.sum(axis=0) == 50).all()
        assert (counts[y == 1].sum(axis=0) == y.sum()).all()
    p = np.clip(0.4 * y + 0.6 * rng.random(50), 0, 1)
    res = bootstrap_ci(y, p, "auroc", n_resamples=500, seed=0, stratify=True)
    assert res.n_valid == 500  # every stratified resample keeps both classes


def test_seeded_results_are_deterministic():
    rng = np.random.default_rng(10)
    y, p, q = _small_binary(rng)
    a = paired_bootstrap_ci(y, p, q, "auprc", n_resamples=300, seed=4)
    b = paired_bootstrap_ci(y, p, q, "auprc", n_resamples=300, seed=4)
    c = paired_bootstrap_ci(y, p, q, "auprc", n_resamples=300, seed=5)
    assert np.array_equal(a.distribution, b.distribution) and not np.array_equal(
        a.distribution, c.distribution
    )
    t1 = paired_permutation_test(y, p, q, "auprc", n_permutations=300, seed=4)
    t2 = paired_permutation_test(y, p, q, "auprc", n_permutations=300, seed=4)
    t3 = paired_permutation_test(y, p, q, "auprc", n_permutations=300, seed=5)
    assert np.array_equal(t1.null_distribution, t2.null_distribution) and t1.p_value == t2.p_value
    assert not np.array_equal(t1.null_distribution, t3.null_distribution)


# ------------------------------------------------------------------------------------------ permutation test


@pytest.mark.parametrize("metric, fn", [("auroc", skm.roc_auc_score), ("auprc", skm.average_precision_score)])
def test_permutation_exact_equals_scipy(metric, fn):
    # n = 8 stays: 2**8 = 256 <= n_permutations, so both enumerate every swap pattern (exact test).
    rng = np.random.default_rng(11)
    y = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    pa, pb = np.round(rng.random(8), 1), np.round(rng.random(8), 1)
    ref = stats.permutation_test(
        (pa, pb),
        lambda a, b: fn(y, a) - fn(y, b),
        permutation_type="samples",
        n_resamples=1000,
        vectorized=False,
    )
    got = paired_permutation_test(y, pa, pb, metric, n_permutations=1000)
    assert got.exact and got.n_permutations == 256
    assert got.statistic == pytest.approx(ref.statistic, abs=TOL)
    assert got.p_value == pytest.approx(ref.pvalue, abs=TOL)
    assert np.sort(got.null_distribution) == pytest.approx(np.sort(ref.null_distribution), abs=TOL)


def test_permutation_monte_carlo_agrees_with_scipy():
    rng = np.random.default_rng(12)
    n, r = 60, 4000
    y = (rng.random(n) < 0.4).astype(int)
    pa = np.clip(0.15 * y + 0.85 * rng.random(n), 0, 1)
    pb = rng.random(n)

    def delta(a, b, axis=-1):
        return _auroc_vectorised(y, a) - _auroc_vectorised(y, b)

    ref = stats.permutation_test(
        (pa, pb),
        delta,
        permutation_type="samples",
        n_resamples=r,
        vectorized=True,
        rng=np.random.default_rng(1),
    )
    got = paired_permutation_test(y, pa, pb, "auroc", n_permutations=r, seed=2, sequential_h=0)
    assert not got.exact and got.n_permutations == r
    assert got.statistic == pytest.approx(ref.statistic, abs=TOL)
    assert 0.01 < ref.pvalue < 0.5  # a p-value in the range where the comparison means something
    sd = np.sqrt(2 * ref.pvalue * (1 - ref.pvalue) / r)  # two independent Monte Carlo estimates
    assert abs(got.p_value - ref.pvalue) < 4 * sd + 2 / r


def test_p_values_uniform_under_the_null_and_small_under_a_clear_difference():
    rng = np.random.default_rng(13)
    n = 40
    pvals = []
    for i in range(200):
        y = (rng.random(n) < 0.4).astype(int)
        signal = 0.3 * y
        pa = np.clip(signal + 0.7 * rng.random(n), 0, 1)  # both models from the same distribution
        pb = np.clip(signal + 0.7 * rng.random(n), 0, 1)
        pvals.append(paired_permutation_test(y, pa, pb, "auroc", n_permutations=199, seed=i).p_value)
    pvals = np.array(pvals)
    # binomial(200, 0.05): mean 10, sd 3.1 -> [2, 20] is about +-3 sd; p <= 0.5 in about half
    assert 2 <= (pvals <= 0.05).sum() <= 20
    assert 0.38 <= (pvals <= 0.5).mean() <= 0.62
    y = (rng.random(200) < 0.4).astype(int)
    good = np.clip(0.5 * y + 0.5 * rng.random(200), 0, 1)
    noise = rng.random(200)
    for metric in ("auroc", "auprc"):
        res = paired_permutation_test(y, good, noise, metric, n_permutations=999, seed=0)
        assert res.statistic > 0.2 and res.p_value < 0.01
        assert res.p_value == pytest.approx(1 / 1000)  # no permutation as extreme: the +1 correction's floor
    greater = paired_permutation_test(y, good, noise, n_permutations=999, alternative="greater")
    less = paired_permutation_test(y, good, noise, n_permutations=999, alternative="less")
    assert greater.p_value < 0.01 and less.p_value > 0.99


def test_sequential_p_values_are_besag_clifford_on_the_same_permutations():
    """With h > 0 each key's test stops at its h-th permuted difference as extreme as the observed one: p = h / L,
    its null distribution is the first L of the full run's (same seed), and a key that never gets there keeps
    the full run's p. Keys do not influence each other."""
    rng = np.random.default_rng(21)
    n, h, r = 300, 20, 3000
    y = (rng.random((n, 3)) < 0.35).astype(int)
    pa = np.clip(0.3 * y + 0.7 * rng.random((n, 3)), 0, 1)
    pb = np.clip(0.3 * y + 0.7 * rng.random((n, 3)), 0, 1)  # labels 0, 1: same distribution as a
    pb[:, 2] = rng.random(n)  # label 2: b is noise, a clearly better
    names = ["l0", "l1", "l2"]
    keys = ["auroc_macro", "auroc/l0", "auprc/l1", "auroc/l2"]
    full = st.paired_permutation_tests(y, pa, pb, keys, names=names, n_permutations=r, seed=4, sequential_h=0)
    seq = st.paired_permutation_tests(y, pa, pb, keys, names=names, n_permutations=r, seed=4, sequential_h=h)
    stopped = 0
    for k in keys:
        hits = np.cumsum(np.abs(full[k].null_distribution) >= abs(full[k].statistic) - 1e-12)
        assert seq[k].statistic == full[k].statistic
        if hits[-1] >= h:
            stop = int(np.argmax(hits >= h)) + 1
            assert (seq[k].n_permutations, seq[k].p_value) == (stop, h / stop)
            np.testing.assert_array_equal(seq[k].null_distribution, full[k].null_distribution[:stop])
            stopped += 1
        else:
            assert (seq[k].n_permutations, seq[k].p_value) == (r, full[k].p_value)
    assert stopped == 2 and seq["auroc/l2"].p_value == 1 / (r + 1)
    alone = st.paired_permutation_test(
        y, pa, pb, "auroc/l0", names=names, n_permutations=r, seed=4, sequential_h=h
    )
    assert (alone.p_value, alone.n_permutations) == (seq["auroc/l0"].p_value, seq["auroc/l0"].n_permutations)


def test_sequential_test_stops_drawing_permutations(monkeypatch):
    """The saving is real: once every key has stopped, no further block of permutations is evaluated."""
    rng = np.random.default_rng(22)
    n, r = 2000, 50_000
    y = (rng.random(n) < 0.3).astype(int)
    pa, pb = rng.random(n), rng.random(n)  # two equally useless models: p far from significance
    calls = []
    real = st._MetricSet.evaluate_swapped
    monkeypatch.setattr(
        st._MetricSet, "evaluate_swapped", lambda self, wt: calls.append(wt.shape[1]) or real(self, wt)
    )
    res = st.paired_permutation_test(y, pa, pb, "auroc", n_permutations=r, seed=0, sequential_h=10)
    per_block = max(1, 8 * st.RNG_BLOCK // (2 * n))
    assert res.n_permutations < per_block and res.p_value == 10 / res.n_permutations > 0.05
    assert calls == [1, per_block]  # the observed arrangement, then one block: 1 of the 6 blocks of 50,000


def test_stopped_keys_channels_are_no_longer_evaluated(monkeypatch):
    """Once a label's test has stopped, the following blocks evaluate only the channels of the keys still open
    (one significant label of 25 no longer keeps all 25 in the kernel), and every result is identical to
    evaluating all channels to the end."""
    rng = np.random.default_rng(24)
    n, r = 2000, 30_000
    y = (rng.random((n, 3)) < 0.3).astype(int)
    pa, pb = (
        rng.random((n, 3)),
        rng.random((n, 3)),
    )  # labels 0, 1: two useless models, p far from significance
    pa[:, 2] = np.clip(0.5 * y[:, 2] + 0.5 * rng.random(n), 0, 1)  # label 2: a clearly better than b
    names, keys = ["l0", "l1", "l2"], ["auroc/l0", "auprc/l1", "auroc/l2"]
    seen = []
    real = st._MetricSet.evaluate_swapped
    monkeypatch.setattr(
        st._MetricSet,
        "evaluate_swapped",
        lambda self, wt: seen.append(sorted(self.channels)) or real(self, wt),
    )
    kw = {"names": names, "n_permutations": r, "seed": 3, "sequential_h": 10}
    res = st.paired_permutation_tests(y, pa, pb, keys, **kw)
    per_block = max(1, 8 * st.RNG_BLOCK // (2 * n))
    blocks = -(-r // per_block)
    assert res["auroc/l2"].n_permutations == r and res["auroc/l0"].n_permutations < per_block
    assert seen == [names, names] + [["l2"]] * (blocks - 1)  # observed, first block, then label 2 alone
    monkeypatch.setattr(
        st._MetricSet, "restrict", lambda self, keys: self
    )  # evaluate every channel throughout
    seen[:] = []
    every = st.paired_permutation_tests(y, pa, pb, keys, **kw)
    assert seen == [names] * (blocks + 1)
    for k in keys:
        assert (res[k].statistic, res[k].p_value, res[k].n_permutations) == (
            every[k].statistic, every[k].p_value, every[k].n_permutations,
        )  # fmt: skip
        np.testing.assert_array_equal(res[k].null_distribution, every[k].null_distribution)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_restricting_to_open_keys_changes_no_result(kind, monkeypatch):
    """Binary and multiclass tests with rank and thresholded keys: dropping the stopped keys' channels and
    features gives the same p-values, permutation counts and null distributions as evaluating all to the end."""
    rng = np.random.default_rng(26)
    n, r = 1500, 12_000
    if kind == "binary":
        y = (rng.random(n) < 0.3).astype(int)
        pa = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
        pb = 0.5 * np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)  # ranks as good as a's, calibration worse
        keys, names = ["auroc", "auprc", "f1", "brier", "ece"], None
    else:
        y = rng.integers(0, 3, n)
        c0a, c0b = 0.5 * rng.random(n), 0.5 * rng.random(n)  # class 0: both models useless
        c2a, c2b = (
            0.5 * np.clip(0.4 * (y == 2) + 0.6 * rng.random(n), 0, 1),
            0.5 * rng.random(n),
        )  # class 2: a
        pa, pb = np.column_stack([c0a, 1 - c0a - c2a, c2a]), np.column_stack([c0b, 1 - c0b - c2b, c2b])
        keys, names = ["auroc_ovr_macro", "auroc/c0", "auroc/c2", "kappa", "accuracy"], ["c0", "c1", "c2"]
    kw = {"names": names, "n_permutations": r, "seed": 6, "sequential_h": 10}
    res = st.paired_permutation_tests(y, pa, pb, keys, **kw)
    used = {k: v.n_permutations for k, v in res.items()}
    assert min(used.values()) < max(used.values()) == r  # some keys stopped early, some ran to the end
    monkeypatch.setattr(st._MetricSet, "restrict", lambda self, keys: self)
    every = st.paired_permutation_tests(y, pa, pb, keys, **kw)
    for k in keys:
        assert (res[k].p_value, res[k].n_permutations) == (every[k].p_value, every[k].n_permutations)
        np.testing.assert_array_equal(res[k].null_distribution, every[k].null_distribution)


@pytest.mark.parametrize("columns", [1, 32, 33, 200])
def test_prefix_sums_by_cumsum_and_by_running_row_agree(columns, monkeypatch):
    """`_prefix_at` takes numpy's cumsum for few weightings and a running row for many: both give
    out[t] = the weights of items[:points[t]] summed, exactly, at and on either side of the switch."""
    rng = np.random.default_rng(25)
    n = 500
    wt = rng.integers(0, 4, (n, columns)).astype(np.int16)
    items = rng.permutation(n)[:420]
    points = np.unique(np.concatenate([[0, 1, 420], rng.integers(0, 421, 150)]))
    want = np.stack([wt[items[:x]].sum(axis=0) for x in points]).astype(np.int16)
    np.testing.assert_array_equal(st._prefix_at(wt, items, points, np.int16), want)
    monkeypatch.setattr(st, "CUMSUM_MAX_COLUMNS", 0 if columns <= 32 else 10**6)  # the other path
    np.testing.assert_array_equal(st._prefix_at(wt, items, points, np.int16), want)


def test_auroc_only_kernel_skips_the_positives_prefix_sums(monkeypatch):
    """A paired test that needs no average precision (LOS, or AUROC alone) takes the negatives' prefix sums only:
    the same AUROC null, half the prefix work."""
    rng = np.random.default_rng(23)
    n = 400
    y = (rng.random(n) < 0.3).astype(int)
    y[:4] = [0, 1, 0, 1]
    pa, pb = np.round(rng.random(n), 2), np.round(rng.random(n), 2)  # ties within and across the two models
    ch = st._rank_channel(np.concatenate([pa, pb]), np.concatenate([y, y]), paired=True)
    wt = np.concatenate([1 - (sw := rng.integers(0, 2, (n, 64), dtype=np.uint8)), sw], axis=0)
    calls = []
    real = st._prefix_at
    monkeypatch.setattr(st, "_prefix_at", lambda *a: calls.append(1) or real(*a))
    (auc_a, ap_a), (auc_b, _) = st._rank_kernel_paired(ch, wt, ap=True)
    full_calls, calls[:] = len(calls), []
    (auc_a2, ap_a2), (auc_b2, ap_b2) = st._rank_kernel_paired(ch, wt, ap=False)
    assert (full_calls, len(calls)) == (2, 1)
    np.testing.assert_array_equal(auc_a2, auc_a)
    np.testing.assert_array_equal(auc_b2, auc_b)
    assert np.isnan(ap_a2).all() and np.isnan(ap_b2).all() and not np.isnan(ap_a).any()
    j = 5  # one permutation checked against scikit-learn
    mixed = np.where(sw[:, j] == 1, pb, pa)
    assert auc_a2[j] == pytest.approx(skm.roc_auc_score(y, mixed), abs=TOL)
    # the tests built on it: LOS (AUROC only) and a binary AUROC-only test give the p-values of the full kernel
    y3 = rng.integers(0, 3, n)
    p3a, p3b = rng.dirichlet(np.ones(3), n), rng.dirichlet(np.ones(3), n)
    monkeypatch.setattr(st, "_prefix_at", real)
    fast = st.paired_permutation_test(
        y3, p3a, p3b, "auroc_ovr_macro", n_permutations=200, seed=1, sequential_h=0
    )
    slow_kernel = st._rank_kernel_paired
    monkeypatch.setattr(st, "_rank_kernel_paired", lambda ch, wt, ap=True: slow_kernel(ch, wt, True))
    slow = st.paired_permutation_test(
        y3, p3a, p3b, "auroc_ovr_macro", n_permutations=200, seed=1, sequential_h=0
    )
    np.testing.assert_array_equal(fast.null_distribution, slow.null_distribution)


# ------------------------------------------------------------------------------------------ multiplicity


def test_holm_and_bh_known_values():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, max(., 2*0.03), max(., 1*0.04)
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: m*p/rank = 0.02, 0.02, 0.04, 0.04, then running minimum from the largest
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.01, np.nan, 0.02])
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.02, 0.02])  # NaN outside the family
    rng = np.random.default_rng(14)
    q = rng.random(57) ** 3
    assert benjamini_hochberg(q) == pytest.approx(stats.false_discovery_control(q, method="bh"), abs=TOL)
    assert (holm(q) >= benjamini_hochberg(q) - TOL).all() and (holm(q) >= q).all()
    with pytest.raises(StatisticsInputError, match=r"\[0, 1\]"):
        holm([0.2, 1.5])


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_gives_clear_errors():
    y, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6])
    with pytest.raises(StatisticsInputError, match=r"not available for binary.*choose from"):
        bootstrap_ci(y, p, "auroc_macro")
    with pytest.raises(StatisticsInputError, match="probabilities"):
        bootstrap_ci(y, p * 3, "auroc")
    with pytest.raises(StatisticsInputError, match="differ in shape"):
        paired_permutation_test(y, p, np.r_[p, 0.5][:3].reshape(3), "auroc")
    with pytest.raises(StatisticsInputError, match="alternative"):
        paired_permutation_test(y, p, p, alternative="bigger")
    with pytest.raises(StatisticsInputError, match="method"):
        bootstrap_ci(y, p, method="student")
    with pytest.raises(StatisticsInputError, match="stratify"):
        bootstrap_ci(np.eye(4, dtype=int), np.full((4, 4), 0.5), "auroc_macro", stratify=True)
    with pytest.raises(StatisticsInputError, match="0/1"):
        bootstrap_ci(np.array([0, 2, 0, 1]), p)


# ------------------------------------------------------------------------------------------ runs -> tables


def _long_predictions(task: str, rng: np.random.Generator, n: int = 100) -> pd.DataFrame:
    """Long table of three methods x two seeds x five folds; 'fusion' is clearly the best model."""
    y, _, _, names = _task_data(task, n, rng)
    stays = rng.permutation(np.arange(1000, 1000 + n))
    fold = np.arange(n) % 5 + 1
    frames = []
    for method, strength in (("ehr", 0.6), ("cxr", 0.2), ("fusion", 1.6)):
        for seed in (0, 1):
            df = pd.DataFrame({"method": method, "seed": seed, "fold": fold, "stay_id": stays})
            if task == "los":
                logits = rng.normal(size=(n, 7)) + 2 * strength * np.eye(7)[y]
                prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
                df["y_los"] = y
                for k in range(7):
                    df[f"p_los_{k}"] = prob[:, k]
            else:
                yy = y.reshape(n, -1)
                prob = 1 / (1 + np.exp(-(strength * 2 * (yy - 0.5) + rng.normal(size=yy.shape))))
                for j, nm in enumerate(names):
                    df[f"y_{nm}"] = yy[:, j]
                    df[f"p_{nm}"] = prob[:, j]
            frames.append(df.sample(frac=1, random_state=seed))  # row order must not matter
    return pd.concat(frames, ignore_index=True)


def _seed_average(preds: pd.DataFrame, method: str, task: str):
    """Independent of the module: pandas mean over seeds per stay, sorted by stay_id."""
    g = preds[preds["method"] == method].groupby("stay_id").mean(numeric_only=True).sort_index()
    if task == "mortality":
        return g["y_mortality"].to_numpy(int), g["p_mortality"].to_numpy()
    if task == "phenotype":
        cols = [c for c in preds.columns if c.startswith("y_pheno_")]
        return g[cols].to_numpy(int), g[["p_" + c[2:] for c in cols]].to_numpy()
    return g["y_los"].to_numpy(int), g[[f"p_los_{k}" for k in range(7)]].to_numpy()


@pytest.mark.parametrize("task", ["mortality", "phenotype", "los"])
def test_compare_methods_table(task):
    preds = _long_predictions(task, np.random.default_rng(15))
    names = {
        "mortality": ["mortality"],
        "phenotype": [f"pheno_{j}" for j in range(4)],
        "los": [f"los_{k}" for k in range(7)],
    }[task]
    table = compare_methods(preds, task, unimodal=["ehr", "cxr"], n_resamples=200, n_permutations=199, seed=0)
    sel = {"mortality": "auprc", "phenotype": "auprc_macro", "los": "auroc_ovr_macro"}[task]
    by_method = {
        m: compute_metrics(task, *_seed_average(preds, m, task), names) for m in ("cxr", "ehr", "fusion")
    }
    best = max(["cxr", "ehr"], key=lambda m: by_method[m][sel])
    assert table.attrs["reference"] == best == "ehr"
    keys = {
        "mortality": ["auroc", "auprc"],
        "phenotype": [
            "auroc_macro",
            "auprc_macro",
            *[f"{m}/{nm}" for m in ("auroc", "auprc") for nm in names],
        ],
        "los": ["auroc_ovr_macro", "accuracy"],
    }[task]
    # fusion vs ehr (reference), then the 3 pairs (cxr, ehr), (cxr, fusion) in name order and (fusion, ehr)
    # oriented as its reference comparison, with that comparison's result
    assert len(table) == 4 * len(keys)
    ref_rows = table[table["comparison"] == "reference"]
    assert set(zip(ref_rows["method_a"], ref_rows["method_b"], strict=True)) == {("fusion", "ehr")}
    pair_rows = table[table["comparison"] == "pairwise"]
    assert set(zip(pair_rows["method_a"], pair_rows["method_b"], strict=True)) == {
        ("cxr", "ehr"),
        ("cxr", "fusion"),
        ("fusion", "ehr"),
    }
    same = ["label", "metric", "delta", "ci_low", "ci_high", "p_value", "n_permutations", "n_resamples_valid"]
    twice = pair_rows[pair_rows["method_a"] == "fusion"]
    pd.testing.assert_frame_equal(twice[same].reset_index(drop=True), ref_rows[same].reset_index(drop=True))
    for row in table.itertuples():
        key = row.metric if row.label == task else f"{row.metric}/{row.label}"
        ma, mb = by_method[row.method_a][key], by_method[row.method_b][key]
        assert row.estimate_a == pytest.approx(ma, abs=TOL) and row.estimate_b == pytest.approx(mb, abs=TOL)
        assert row.delta == pytest.approx(ma - mb, abs=TOL)
        assert row.n_stays == 100 and row.n_seeds_a == 2 and row.n_permutations == 199
    overall = ref_rows[ref_rows["label"] == task]
    assert (overall["delta"] > 0).all() and (overall["p_value"] < 0.01).all()
    assert (overall["ci_low"] > 0).all()
    for _, fam in table.groupby("family"):
        assert fam["p_holm"].to_numpy() == pytest.approx(holm(fam["p_value"].to_numpy()))
        assert fam["p_bh"].to_numpy() == pytest.approx(benjamini_hochberg(fam["p_value"].to_numpy()))
    if task == "phenotype":
        assert set(table["family"]) == {
            f"phenotype:{c}:{m}:{s}"
            for c in ("reference", "pairwise")
            for m, s in (
                ("auroc_macro", "overall"),
                ("auprc_macro", "overall"),
                ("auroc", "per_label"),
                ("auprc", "per_label"),
            )
        }
        assert len(table[table["family"] == "phenotype:pairwise:auroc:per_label"]) == 3 * 4


@pytest.mark.parametrize(
    ("task", "ci_method", "stratify"),
    [("phenotype", "percentile", False), ("mortality", "bca", True), ("los", "percentile", True)],
)
def test_compare_methods_resamples_each_method_once(task, ci_method, stratify, monkeypatch):
    """When every method has the same stays, each is bootstrapped once and every pair's CI is the difference of
    the two methods' values: identical to bootstrapping each pair (two models) on its own, in 3 method evaluations
    instead of 2 per pair (8 here)."""
    from carebench.analysis import comparisons as cmp

    preds = _long_predictions(task, np.random.default_rng(16), n=60)
    kw = {"unimodal": ["ehr", "cxr"], "n_resamples": 150, "n_permutations": 99, "seed": 2, "ci_method": ci_method,
          "stratify": stratify}  # fmt: skip
    calls = []
    real = st._evaluate_blocks
    monkeypatch.setattr(
        st, "_evaluate_blocks", lambda sets, blocks: calls.append(len(sets)) or real(sets, blocks)
    )
    shared = compare_methods(preds, task, **kw)
    per_value = 3 if ci_method == "bca" else 2  # point + resamples (+ jackknife)
    assert calls == [1] * 3 * per_value  # the three methods, one model each; no pair bootstrapped
    calls[:] = []
    monkeypatch.setattr(cmp, "_same_stays", lambda pooled, methods: False)  # each pair on its own
    alone = compare_methods(preds, task, **kw)
    assert calls == [2] * 3 * per_value  # three pairs (fusion vs ehr tested once for both rows), two models
    pd.testing.assert_frame_equal(shared, alone)
    assert shared["ci_low"].notna().all() and (shared["ci_low"] < shared["ci_high"]).all()


def test_compare_methods_pairwise_with_keeps_the_rows_of_those_pairs():
    """Restricting the pairs (analyze --pairs findings) gives the same statistics for the pairs it keeps: each pair
    is computed on its own; only the multiplicity families shrink."""
    task = "phenotype"
    preds = _long_predictions(task, np.random.default_rng(15))
    kw = {"unimodal": ["ehr", "cxr"], "n_resamples": 100, "n_permutations": 99, "seed": 0}
    full = compare_methods(preds, task, **kw)
    some = compare_methods(preds, task, pairwise_with=["fusion"], **kw)
    none = compare_methods(preds, task, pairwise=False, **kw)
    pw = some[some["comparison"] == "pairwise"]
    assert set(zip(pw["method_a"], pw["method_b"], strict=True)) == {("cxr", "fusion"), ("fusion", "ehr")}
    assert set(none["comparison"]) == {"reference"}
    cols = ["comparison", "method_a", "method_b", "label", "metric"]
    vals = ["delta", "ci_low", "ci_high", "p_value", "estimate_a", "estimate_b"]
    both = some.merge(full, on=cols, suffixes=("", "_full"))
    assert len(both) == len(some)
    for c in vals:
        np.testing.assert_array_equal(both[c].to_numpy(), both[f"{c}_full"].to_numpy())
    ref = some[some["comparison"] == "reference"].merge(none, on=cols, suffixes=("", "_none"))
    np.testing.assert_array_equal(ref["p_holm"].to_numpy(), ref["p_holm_none"].to_numpy())


def test_method_metrics_seed_ensemble_and_seed_spread():
    task = "mortality"
    preds = _long_predictions(task, np.random.default_rng(16))
    table = method_metrics(preds, task, metrics=["auroc", "brier"], n_resamples=300, seed=0)
    assert len(table) == 3 * 2
    for row in table.itertuples():
        y, p = _seed_average(preds, row.method, task)
        assert row.estimate == pytest.approx(compute_metrics(task, y, p, ["mortality"])[row.metric], abs=TOL)
        per_seed = []
        for _, g in preds[preds["method"] == row.method].groupby("seed"):
            g = g.sort_values("stay_id")
            per_seed.append(
                compute_metrics(
                    task, g["y_mortality"].to_numpy(), g["p_mortality"].to_numpy(), ["mortality"]
                )[row.metric]
            )
        assert row.seed_mean == pytest.approx(np.mean(per_seed), abs=TOL)
        assert row.seed_sd == pytest.approx(np.std(per_seed, ddof=1), abs=TOL)
        assert row.ci_low <= row.estimate <= row.ci_high and row.n_seeds == 2 and row.n_stays == 100


def test_run_tables_reject_inconsistent_predictions():
    preds = _long_predictions("mortality", np.random.default_rng(17), n=30)
    dup = pd.concat([preds, preds.iloc[[0]]], ignore_index=True)
    with pytest.raises(StatisticsInputError, match="appears more than once"):
        compare_methods(dup, "mortality", n_resamples=10, n_permutations=10)
    short = preds.drop(index=preds[(preds["method"] == "ehr") & (preds["seed"] == 1)].index[:3])
    with pytest.raises(StatisticsInputError, match="seeds of method 'ehr' cover different stays"):
        compare_methods(short, "mortality", n_resamples=10, n_permutations=10)
    flipped = preds.copy()
    flipped.loc[flipped["method"] == "cxr", "y_mortality"] = (
        1 - flipped.loc[flipped["method"] == "cxr", "y_mortality"]
    )
    with pytest.raises(StatisticsInputError, match=r"labels of stay .* differ between methods"):
        compare_methods(flipped, "mortality", n_resamples=10, n_permutations=10)
    with pytest.raises(StatisticsInputError, match=r"missing column.*p_mortality"):
        compare_methods(preds.drop(columns="p_mortality"), "mortality")
    with pytest.raises(StatisticsInputError, match="have no predictions"):
        compare_methods(preds, "mortality", reference="medfuse")
    with pytest.raises(TaskError, match="unknown task 'sepsis'; expected one of mortality, phenotype, los"):
        compare_methods(preds, "sepsis")


def test_kernel_memory_chunks_do_not_change_results(monkeypatch):
    rng = np.random.default_rng(18)
    y, p, q, names = _task_data("phenotype", 50, rng)
    keys = ["auroc_macro", "auprc_macro"]
    full = [paired_permutation_test(y, p, q, k, names=names, n_permutations=300, seed=1) for k in keys]
    boot = paired_bootstrap_ci(y, p, q, "auprc_macro", names=names, n_resamples=300, seed=1)
    monkeypatch.setattr(st, "CHUNK_BYTES", 4096)  # a few columns per kernel call
    small = [paired_permutation_test(y, p, q, k, names=names, n_permutations=300, seed=1) for k in keys]
    assert all(
        np.array_equal(a.null_distribution, b.null_distribution) for a, b in zip(full, small, strict=True)
    )
    assert np.array_equal(
        boot.distribution,
        paired_bootstrap_ci(y, p, q, "auprc_macro", names=names, n_resamples=300, seed=1).distribution,
    )


# ------------------------------------------------------------------------------------------ label groups


def test_group_macro_equals_sklearn_mean_over_the_group_and_resamples_like_macro():
    rng = np.random.default_rng(21)
    y, p, q, names = _task_data("phenotype", 120, rng)
    groups = {"ab": ["pheno_0", "pheno_1"], "rare": ["pheno_2", "pheno_3"]}
    keys = ["auroc_macro@ab", "auprc_macro@ab", "auroc_macro@rare", "auroc_macro"]
    assert set(keys) <= set(available_metrics("multilabel", names, groups))
    v = metric_values(y, p, keys, names=names, groups=groups)
    for g, labels in groups.items():
        idx = [names.index(nm) for nm in labels if 0 < y[:, names.index(nm)].sum() < len(y)]
        assert v[f"auroc_macro@{g}"][0] == pytest.approx(
            np.mean([skm.roc_auc_score(y[:, j], p[:, j]) for j in idx]), abs=TOL
        )
    assert v["auprc_macro@ab"][0] == pytest.approx(
        np.mean([skm.average_precision_score(y[:, j], p[:, j]) for j in (0, 1)]), abs=TOL
    )
    # a one-label group is that label's metric; the group of all labels is the macro average
    one = metric_values(y, p, ["auroc_macro@x", "auroc/pheno_1"], names=names, groups={"x": ["pheno_1"]})
    assert one["auroc_macro@x"][0] == one["auroc/pheno_1"][0]
    every = metric_values(y, p, ["auroc_macro@all", "auroc_macro"], names=names, groups={"all": names})
    assert every["auroc_macro@all"][0] == pytest.approx(every["auroc_macro"][0], abs=TOL)
    # on resamples a group is undefined exactly when one of its defined labels lost a class (pheno_3: 2 positives)
    w = np.concatenate(list(bootstrap_weights(len(y), 300, seed=3)), axis=1).T
    r = metric_values(
        y,
        p,
        ["auroc_macro@rare", "auroc/pheno_2", "auroc/pheno_3", "auroc_macro@ab"],
        names=names,
        groups=groups,
        weights=w,
    )
    lost = np.isnan(r["auroc/pheno_2"]) | np.isnan(r["auroc/pheno_3"])
    assert lost.any() and np.array_equal(np.isnan(r["auroc_macro@rare"]), lost)
    assert np.nanmax(np.abs(r["auroc_macro@rare"] - (r["auroc/pheno_2"] + r["auroc/pheno_3"]) / 2)) < TOL
    # the paired permutation test of a group uses the same swaps as the per-label tests
    t = st.paired_permutation_tests(
        y,
        p,
        q,
        ["auroc_macro@ab", "auroc/pheno_0", "auroc/pheno_1"],
        names=names,
        n_permutations=500,
        seed=0,
        groups=groups,
    )
    null = (t["auroc/pheno_0"].null_distribution + t["auroc/pheno_1"].null_distribution) / 2
    assert np.allclose(t["auroc_macro@ab"].null_distribution, null, atol=TOL)


def test_compare_methods_with_label_groups_picks_a_reference_per_group():
    """Model "ehr" sees labels 0-1 and "cxr" labels 2-3: each group's reference is the unimodal model that sees it,
    group rows have their own Holm family, and fusion (sees all) beats each group's reference."""
    rng = np.random.default_rng(22)
    n = 300
    y = (rng.random((n, 4)) < 0.3).astype(int)

    def see(cols: list[int], strength: float) -> np.ndarray:  # informative on `cols`, noise elsewhere
        z = np.where(np.isin(np.arange(4), cols), strength * (2 * y - 1), 0.0) + rng.normal(size=(n, 4))
        return 1 / (1 + np.exp(-z))

    rows = []
    for method, p in (
        ("ehr", see([0, 1], 0.6)),
        ("cxr", see([2, 3], 0.6)),
        ("fusion", see([0, 1, 2, 3], 1.2)),
    ):
        frame = pd.DataFrame({"method": method, "seed": 0, "stay_id": np.arange(n)})
        for j in range(4):
            frame[f"y_pheno_{j}"], frame[f"p_pheno_{j}"] = y[:, j], p[:, j]
        rows.append(frame)
    preds = pd.concat(rows, ignore_index=True)
    groups = {"e": ["pheno_0", "pheno_1"], "x": ["pheno_2", "pheno_3"]}
    table = compare_methods(
        preds,
        "phenotype",
        unimodal=["ehr", "cxr"],
        n_resamples=200,
        n_permutations=999,
        seed=0,
        label_groups=groups,
        metrics=["auroc_macro"],
    )
    assert table.attrs["group_references"] == {"e": "ehr", "x": "cxr"}
    ref = table[table["comparison"] == "reference"].set_index("label")
    assert ref.loc["group:e", "method_b"] == "ehr" and ref.loc["group:x", "method_b"] == "cxr"
    assert set(ref["method_a"]) == {"fusion"}
    fam = table[table["family"] == "phenotype:reference:auroc_macro:group"]
    assert len(fam) == 2 and (fam["delta"] > 0.1).all() and (fam["p_holm"] < 0.01).all()
    # pairwise rows carry every group; no label group may reuse the separator or name an unknown label
    assert len(table[(table["comparison"] == "pairwise") & (table["label"] == "group:e")]) == 3
    with pytest.raises(StatisticsInputError, match="label group 'bad': unknown label"):
        compare_methods(preds, "phenotype", unimodal=["ehr"], label_groups={"bad": ["pheno_9"]})
    with pytest.raises(StatisticsInputError, match="without '@'"):
        metric_values(
            y, y * 0.5, ["auroc_macro"], names=[f"pheno_{j}" for j in range(4)], groups={"a@b": ["pheno_0"]}
        )
