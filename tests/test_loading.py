"""Loading: folds, cohorts, training-only statistics, imputation, scaling guards, X-ray dropout, batch contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from carebench.data import folds
from carebench.data import loading as L
from carebench.data.definitions import load_phenotypes
from carebench.data.store import open_dataset
from carebench.models import ModelConfigError, create_model
from fake_dataset import make_fake_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fake_dataset(tmp_path_factory.mktemp("loading"), n=120, image_size=16, n_features=4, seed=1)


@pytest.fixture()
def data(data_dir):
    return open_dataset(data_dir)


def test_fold_roles():
    assert folds.fold_roles(1) == {"train": (3, 4, 5), "val": (2,), "test": (1,)}
    assert folds.fold_roles(5) == {"train": (2, 3, 4), "val": (1,), "test": (5,)}
    with pytest.raises(L.LoadingError, match="--fold"):
        folds.fold_roles(6)


def test_split_rows_base_and_matched(data):
    c = data.cohort
    for fold in (1, 3):
        base = folds.split_rows(c, ["label_mortality"], fold, "base")
        allrows = np.concatenate(list(base.values()))
        assert sorted(allrows) == list(range(len(c)))  # a partition of every stay
        assert set(c.fold.iloc[base["test"]]) == {fold}
        assert set(c.fold.iloc[base["val"]]) == {fold % 5 + 1}
        matched = folds.split_rows(c, ["label_mortality"], fold, "matched")
        for split in folds.SPLITS:
            expect = [r for r in base[split] if c.has_cxr.iloc[r]]
            assert list(matched[split]) == expect
    with pytest.raises(L.LoadingError, match="--cohort"):
        folds.split_rows(c, ["label_mortality"], 1, "full")


def test_stats_use_training_stays_only(data_dir, tmp_path):
    d = open_dataset(data_dir, mmap=False)
    rows = folds.split_rows(d.cohort, ["label_mortality"], 2, "base")
    stats = L.compute_norm_stats(d.ehr, rows["train"], chunk=7)  # several chunks
    train = d.ehr[rows["train"]].astype(np.float64).reshape(-1, d.ehr.shape[2])
    q25, q50, q75 = np.nanpercentile(train, [25, 50, 75], axis=0)
    np.testing.assert_allclose(stats.median, q50, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.iqr, q75 - q25, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(stats.n_observed, (~np.isnan(train)).sum(0))
    # changing every validation and test value leaves the statistics unchanged ...
    ehr = d.ehr.copy()
    ehr[np.concatenate([rows["val"], rows["test"]])] += 1000.0
    same = L.compute_norm_stats(ehr, rows["train"])
    np.testing.assert_array_equal(same.median, stats.median)
    np.testing.assert_array_equal(same.scale, stats.scale)
    # ... while changing the training values does change them
    ehr[rows["train"]] += 1000.0
    assert not np.allclose(L.compute_norm_stats(ehr, rows["train"]).median, stats.median)


def test_forward_fill_then_median_then_robust_scale_by_hand():
    nan = np.nan
    raw = np.array([[[nan, 1.0], [2.0, nan], [nan, nan], [6.0, 4.0]]])  # [1, T=4, F=2]
    stats = L.NormStats(
        median=np.array([3.0, 10.0]),
        iqr=np.array([2.0, 4.0]),
        std=np.array([1.0, 1.0]),
        scale=np.array([2.0, 4.0]),
        n_observed=np.array([5, 5]),
    )
    values, mask = L.impute_and_scale(raw, stats)
    filled = np.array([[3.0, 1.0], [2.0, 1.0], [2.0, 1.0], [6.0, 4.0]])  # leading NaN -> median, else carry
    expect = (filled - [3.0, 10.0]) / [2.0, 4.0]
    np.testing.assert_allclose(values[0], expect, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(mask[0], [[0, 1], [1, 0], [0, 0], [1, 1]])
    assert values.dtype == np.float32 and mask.dtype == np.float32


def test_forward_fill_stays_within_a_stay():
    nan = np.nan
    raw = np.array([[[5.0], [nan]], [[nan], [nan]]])
    out = L.forward_fill(raw)
    assert out[0, 1, 0] == 5.0 and np.isnan(out[1]).all()


def test_scale_guards_iqr_zero_std_zero_never_observed():
    n, t = 20, 4
    ehr = np.full((n, t, 3), np.nan, dtype=np.float32)
    ehr[:, 0, 0] = 7.0
    ehr[:2, 1, 0] = [100.0, -100.0]  # IQR of feature 0 is 0, std is not
    ehr[:, :, 1] = 3.0  # constant: IQR 0 and std 0
    stats = L.compute_norm_stats(ehr, np.arange(n))  # feature 2 never observed
    vals = np.concatenate([np.full(n, 7.0), [100.0, -100.0]])
    assert stats.iqr[0] == 0 and stats.scale[0] == pytest.approx(vals.std(ddof=1))
    assert stats.median[1] == 3.0 and stats.scale[1] == 1.0
    assert stats.median[2] == 0.0 and stats.scale[2] == 1.0 and stats.n_observed[2] == 0
    values, _ = L.impute_and_scale(ehr[:1], stats)
    assert np.isfinite(values).all()
    assert values[0, 0, 0] == 0.0 and values[0, 1, 0] == pytest.approx(93.0 / vals.std(ddof=1), rel=1e-6)


def test_cxr_dropout_exact_deterministic_nested():
    stay_ids = np.arange(1000, dtype=np.int64) * 7 + 3
    has = np.zeros(1000, bool)
    has[::2] = True  # 500 stays with an X-ray
    d30 = folds.cxr_dropout(stay_ids, has, 0.3, seed=11)
    assert d30.sum() == 150 and not d30[~has].any()
    assert folds.cxr_dropout(stay_ids, has, 0.333, seed=11).sum() == 167  # round(166.5) up
    np.testing.assert_array_equal(d30, folds.cxr_dropout(stay_ids, has, 0.3, seed=11))
    perm = np.random.default_rng(0).permutation(1000)  # per stay, not per position
    np.testing.assert_array_equal(folds.cxr_dropout(stay_ids[perm], has[perm], 0.3, seed=11), d30[perm])
    other = folds.cxr_dropout(stay_ids, has, 0.3, seed=12)
    assert other.sum() == 150 and (other != d30).any()
    d60 = folds.cxr_dropout(stay_ids, has, 0.6, seed=11)
    assert d60.sum() == 300 and (d60 | ~d30).all()  # nested: 30% subset of 60%
    assert folds.cxr_dropout(stay_ids, has, 0.0, 1).sum() == 0
    assert folds.cxr_dropout(stay_ids, has, 1.0, 1).sum() == 500
    with pytest.raises(L.LoadingError, match="dropout rate"):
        folds.cxr_dropout(stay_ids, has, 1.5, 1)


@pytest.mark.parametrize(
    "task,yshape,ydtype",
    [("mortality", (1,), torch.float32), ("phenotype", (25,), torch.float32), ("los", (), torch.int64)],
)
def test_batch_contract(data, task, yshape, ydtype):
    fold = L.build_fold(data, task=task, fold=1, image_size=16)
    ds = fold.test
    batch = ds.__getitems__(list(range(len(ds))))
    b, t, f = len(ds), 48, 4
    assert batch["ehr"].shape == (b, t, f) and batch["ehr"].dtype == torch.float32
    assert batch["ehr_mask"].shape == (b, t, f) and torch.isfinite(batch["ehr"]).all()
    assert batch["cxr"].shape == (b, 1, 16, 16) and batch["cxr"].dtype == torch.float32
    assert batch["has_cxr"].dtype == torch.bool and batch["stay_id"].dtype == torch.int64
    assert batch["y"].shape == (b, *yshape) and batch["y"].dtype == ydtype
    c = data.cohort.iloc[ds.rows]
    np.testing.assert_array_equal(batch["stay_id"].numpy(), c.stay_id.to_numpy())
    np.testing.assert_array_equal(batch["has_cxr"].numpy(), c.has_cxr.to_numpy())
    if task == "phenotype":
        np.testing.assert_array_equal(batch["y"].numpy(), c[[p.column for p in load_phenotypes()]].to_numpy())
    # the observed mask is exactly "not NaN" in the raw array
    np.testing.assert_array_equal(batch["ehr_mask"].numpy(), ~np.isnan(data.ehr[ds.rows]))
    # images: (uint8 / 255 - mean) / std where present (no resize at S = 16), zeros where missing
    has = c.has_cxr.to_numpy().copy()
    raw = data.cxr[c.cxr_index.to_numpy()[has]].astype(np.float32) / 255.0
    np.testing.assert_allclose(batch["cxr"][has, 0].numpy(), (raw - L.CXR_MEAN) / L.CXR_STD, atol=1e-6)
    assert (batch["cxr"][~has] == 0).all()
    assert (batch["cxr_hours"][~has] == 0).all()
    np.testing.assert_allclose(batch["cxr_hours"][has].numpy(), c.cxr_hours.to_numpy()[has], rtol=1e-6)


def test_resize_on_the_fly_and_dropout_in_batches(data):
    fold = L.build_fold(
        data,
        task="mortality",
        fold=2,
        image_size=8,
        cxr_dropout_rates={"train": 0.5, "test": 1.0},
        cxr_dropout_seed=3,
    )
    n_train = int(data.cohort.has_cxr.iloc[fold.train.rows].sum())
    assert fold.train.dropped.sum() == folds.n_dropped(0.5, n_train)
    assert fold.val.dropped.sum() == 0
    batch = fold.test.__getitems__(list(range(len(fold.test))))
    assert batch["cxr"].shape[-1] == 8 and not batch["has_cxr"].any()
    assert (batch["cxr"] == 0).all() and (batch["cxr_hours"] == 0).all()
    tr = fold.train.__getitems__(list(range(len(fold.train))))
    dropped = torch.from_numpy(fold.train.dropped)
    assert not tr["has_cxr"][dropped].any() and (tr["cxr"][dropped] == 0).all()
    assert tr["has_cxr"].sum() == n_train - dropped.sum()
    # a constant image stays constant after resizing
    const = torch.full((2, 1, 16, 16), 0.25)
    np.testing.assert_allclose(L.resize_cxr(const, 8).numpy(), 0.25, atol=1e-6)
    const8 = torch.full((2, 1, 16, 16), 77, dtype=torch.uint8)
    assert (L.resize_cxr(const8, 8) == 77).all() and (L.resize_cxr(const8, 24) == 77).all()
    # the uint8 kernel (used for the cache) is within one grey level of the float one
    img = torch.from_numpy(data.cxr[:4].copy())[:, None]
    diff = L.resize_cxr(img, 8).float() - L.resize_cxr(img.float(), 8)
    assert diff.abs().max() <= 1.0
    resized = fold.train.__getitems__([int(i) for i in np.flatnonzero(fold.train.has_cxr)[:3]])["cxr"]
    rows = fold.train.rows[np.flatnonzero(fold.train.has_cxr)[:3]]
    raw = torch.from_numpy(data.cxr[data.cohort.cxr_index.to_numpy()[rows]].copy())[:, None]
    expect = L.normalise_cxr(L.resize_cxr(raw, 8).float() / 255.0)
    torch.testing.assert_close(resized, expect, atol=1e-6, rtol=0)


def test_matched_cohort_has_every_xray(data):
    fold = L.build_fold(data, task="los", fold=4, cohort="matched", image_size=16)
    for ds in (fold.train, fold.val, fold.test):
        assert ds.has_cxr.all() and len(ds) == int(data.cohort.has_cxr.iloc[ds.rows].sum())


def test_matched_needs_images(tmp_path):
    d = open_dataset(make_fake_dataset(tmp_path, n=40, with_cxr=False))
    with pytest.raises(L.LoadingError, match=r"cxr\.npy"):
        L.build_fold(d, task="mortality", fold=1, cohort="matched")
    fold = L.build_fold(d, task="mortality", fold=1, image_size=8)  # base cohort works without images
    assert not fold.train.has_cxr.any()


def test_loader_covers_each_stay_once(data):
    fold = L.build_fold(data, task="mortality", fold=1, image_size=16)
    ids = torch.cat([b["stay_id"] for b in L.make_loader(fold.val, 7, shuffle=False)])
    assert sorted(ids.tolist()) == sorted(fold.val.stay_ids.tolist())
    seen = [b["stay_id"] for b in L.make_loader(fold.train, 7, shuffle=True, drop_last=True, seed=5)]
    assert all(len(s) == 7 for s in seen) and len(set(torch.cat(seen).tolist())) == len(seen) * 7
    again = [b["stay_id"] for b in L.make_loader(fold.train, 7, shuffle=True, drop_last=True, seed=5)]
    assert all(torch.equal(a, b) for a, b in zip(seen, again, strict=True))


def test_augment_cxr():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 12, 12)
    has = torch.tensor([True, True, False, True])
    x[2] = 5.0
    ident = L.augment_cxr(x, has, degrees=0.0, scale=(1.0, 1.0), translate=0.0, generator=g)
    torch.testing.assert_close(ident[has], x[has], atol=1e-5, rtol=0)
    assert (ident[2] == 0).all()  # a missing image stays zero
    const = torch.full((2, 1, 12, 12), 1.5)
    shrunk = L.augment_cxr(const, torch.tensor([True, True]), degrees=0.0, scale=(0.5, 0.5), translate=0.0)
    black = (0.0 - L.CXR_MEAN) / L.CXR_STD
    assert shrunk[0, 0, 0, 0].item() == pytest.approx(black, abs=1e-5)  # pixels from outside are black
    assert shrunk[0, 0, 6, 6].item() == pytest.approx(1.5, abs=1e-5)  # the centre keeps its value
    a = L.augment_cxr(x, has, generator=torch.Generator().manual_seed(1))
    b = L.augment_cxr(x, has, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a[has], x[has])


def test_worker_processes_give_the_same_batches(data):
    """num_workers is not part of the run id: batches must not depend on it."""
    fold = L.build_fold(data, task="phenotype", fold=3, image_size=16)
    serial = list(L.make_loader(fold.train, 16, shuffle=True, drop_last=True, seed=2))
    parallel = list(L.make_loader(fold.train, 16, shuffle=True, drop_last=True, seed=2, num_workers=2))
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_static_is_age_z_scored_with_training_stats_and_gender_male(data_dir):
    """`static` = ((age - mean_train) / std_train, 1 if gender == "M" else 0), with mean and std (ddof=1) of the
    training split only: changing the ages of the validation and test stays changes no statistic."""
    d = open_dataset(data_dir, mmap=False)
    rows = folds.split_rows(d.cohort, ["label_mortality"], 2, "base")
    train_age = d.cohort.age.to_numpy(dtype=np.float64)[rows["train"]]
    mean, std = train_age.mean(), train_age.std(ddof=1)
    fold = L.build_fold(d, task="mortality", fold=2, image_size=16)
    assert fold.stats.age_mean == pytest.approx(mean, rel=1e-12) and fold.stats.age_std == pytest.approx(
        std, rel=1e-12
    )
    for split, ds in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
        batch = ds.__getitems__(list(range(len(ds))))
        c = d.cohort.iloc[rows[split]]
        assert batch["static"].shape == (len(ds), 2) and batch["static"].dtype == torch.float32
        np.testing.assert_allclose(
            batch["static"][:, 0].numpy(), (c.age.to_numpy() - mean) / std, rtol=1e-6, atol=1e-6
        )
        np.testing.assert_array_equal(
            batch["static"][:, 1].numpy(), (c.gender.to_numpy() == "M").astype(np.float32)
        )
    assert set(np.unique(batch["static"][:, 1].numpy())) == {0.0, 1.0}
    # the statistics come from the training stays only
    other = [r for s in ("val", "test") for r in rows[s]]
    d.cohort.loc[d.cohort.index[other], "age"] += 40.0
    again = L.build_fold(d, task="mortality", fold=2, image_size=16)
    assert (again.stats.age_mean, again.stats.age_std) == (fold.stats.age_mean, fold.stats.age_std)
    # a hand-made example: ages 20, 30, 40 -> mean 30, std 10
    assert L.compute_age_stats(pd.DataFrame({"age": [20.0, 30.0, 40.0, 99.0]}), np.array([0, 1, 2])) == (
        30.0,
        10.0,
    )
    assert L.compute_age_stats(pd.DataFrame({"age": [50.0]}), np.array([0])) == (
        50.0,
        1.0,
    )  # std undefined -> 1


def test_static_needs_age_and_gender_columns(data_dir):
    """A cohort without demographics still loads (no `static` key); only a method that reads them fails."""
    d = open_dataset(data_dir, mmap=False)
    for column in ("age", "gender"):
        broken = type(d)(d.root, d.manifest, d.cohort.drop(columns=column), d.ehr, d.cxr)
        fold = L.build_fold(broken, task="mortality", fold=1, image_size=16)
        batch = fold.train.__getitems__([0, 1, 2, 3])
        assert "static" not in batch and batch["ehr"].shape[0] == 4
        umse = create_model("umse", "mortality", batch["ehr"].shape[2], 16, preset="test")
        with pytest.raises(ModelConfigError, match="columns 'age' and 'gender'"):
            umse(batch)
    odd = d.cohort.copy()
    odd.loc[odd.index[0], "gender"] = "X"
    with pytest.raises(L.LoadingError, match="'gender' must be 'M' or 'F'"):
        L.build_fold(type(d)(d.root, d.manifest, odd, d.ehr, d.cxr), task="mortality", fold=1, image_size=16)
