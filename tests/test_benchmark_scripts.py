"""The measurement scripts in benchmarks/ run against the current API (they have no other test, and an API change
once broke three of them silently): each is imported from its file and its pure parts are pinned on small inputs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from carebench import runs
from carebench.data.store import open_dataset
from carebench.evaluation.metrics import compute_metrics
from fake_dataset import make_fake_dataset

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fake_dataset(tmp_path_factory.mktemp("bench"), n=150, image_size=16, n_features=4, seed=3)


def test_analysis_scale_writes_finished_runs_with_planted_differences(data_dir, tmp_path):
    scale = _script("analysis_scale")
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "name: tiny\nmodels: [lstm, latefusion]\ntasks: [mortality, los]\nfolds: [1]\nseeds: [0, 1]\n"
    )
    out = tmp_path / "runs"
    cmd = [
        sys.executable,
        str(BENCH / "analysis_scale.py"),
        "generate",
        "--plan",
        str(plan),
        "--data",
        str(data_dir),
    ]
    subprocess.run([*cmd, "--out", str(out), "--workers", "1"], check=True, capture_output=True)
    done = sorted(out.glob(f"*/{runs.DONE}"))
    assert len(done) == 2 * 2 * 2  # methods x tasks x seeds
    ds = open_dataset(data_dir, mmap=True)
    for marker in done:
        cfg = runs.read_config(marker.parent)
        test = pd.read_parquet(marker.parent / runs.PREDICTIONS)
        y, p, names = runs.prediction_arrays(test, cfg["task"])
        metrics = json.loads((marker.parent / runs.METRICS).read_text())
        assert names == ds.output_names(cfg["task"])
        recorded = {k: np.nan if v is None else v for k, v in metrics["test"].items()}  # JSON null = NaN
        assert recorded == pytest.approx(compute_metrics(cfg["task"], y, p, names), nan_ok=True)
        assert (marker.parent / runs.VAL_PREDICTIONS).is_file()
    # planted X-ray gains: none for late fusion (one of the null fusion methods), daft the first with a gain
    assert json.loads((out / "planted_gains.json").read_text()) == {"latefusion": 0.0}
    # units: one (task, cohort) group's permutation test of a pair and one run's fairness, as JSON lines
    sub = tmp_path / "mortality"
    base = [sys.executable, str(BENCH / "analysis_scale.py")]
    subprocess.run([*base, "subset", "--runs", str(out), "--out", str(sub), "--seeds", "2", "--tasks", "mortality"],
                   check=True, capture_output=True)  # fmt: skip
    with pytest.raises(subprocess.CalledProcessError):  # two groups: refused
        subprocess.run([*base, "units", "--runs", str(out)], check=True, capture_output=True)
    lines = subprocess.run(
        [*base, "units", "--runs", str(sub), "--pairs", "latefusion:lstm", "--fairness-methods", "latefusion",
         "--n-permutations", "300", "--n-bootstrap", "20"], check=True, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    perm, fair = (json.loads(line) for line in lines)
    n_test = len(pd.read_parquet(done[0].parent / runs.PREDICTIONS))
    assert (perm["unit"], perm["pair"], perm["stays"], fair["unit"], fair["stays"]) == (
        "permutation", "latefusion:lstm", n_test, "fairness", n_test,
    )  # fmt: skip
    assert 0 < perm["permutations_min_median_max"][0] <= perm["permutations_min_median_max"][2] <= 300
    assert fair["group_rows"] > 1  # the dataset's attributes, not the overall row alone
    assert scale.gains(
        ["daft", "latefusion", "lstm"], {"daft": [1, 2], "latefusion": [1, 2], "lstm": [1]}
    ) == {
        "daft": 0.1,
        "latefusion": 0.0,
    }


def test_cost_model_splits_a_step_into_its_ehr_and_image_parts():
    cost = _script("cost_model")
    rows = [
        {"method": "m", "availability": 0.3, "reference": 5.0, "ours fp32": 2.0, "ours default": 1.0},
        {"method": "m", "availability": 1.0, "reference": 6.0, "ours fp32": 5.5, "ours default": 1.7},
        {"method": "x", "availability": 1.0, "reference": None, "ours fp32": 1.0, "ours default": 1.0},
    ]
    model = cost.step_model(rows)
    assert set(model) == {"m"}  # a method without a reference measurement is left out
    assert model["m"]["reference"] == pytest.approx(5.5)
    ehr, img = model["m"]["ours fp32"]
    assert (ehr, img) == (pytest.approx(0.5), pytest.approx(5.0))  # 0.5 + a x 5.0 through both points
    ehr, img = model["m"]["ours default"]
    assert ehr + 0.3 * img == pytest.approx(1.0) and ehr + img == pytest.approx(1.7)


def test_reference_steps_batch_has_the_asked_share_of_x_rays(data_dir):
    steps = _script("reference_steps")
    batch, features, outputs = steps.our_batch(str(data_dir), 8, 0.25, 16)
    assert int(batch["has_cxr"].sum()) == 2 and len(batch["stay_id"]) == 8
    assert len(features) == 4 and outputs == open_dataset(data_dir, mmap=True).output_names("phenotype")
    ref = steps.reference_batch(batch, triplets=False)
    # the reference's layout: values then its 1 = missing channels; the image on 3 channels
    assert ref["ehr_ts"].shape[-1] == 2 * len(features)
    np.testing.assert_array_equal(
        ref["ehr_ts"][..., len(features) :].numpy(), 1.0 - batch["ehr_mask"].numpy()
    )
    assert ref["cxr_imgs"].shape[1] == 3


def test_prepare_memory_sizes_are_duckdb_sizes():
    prep = _script("prepare")
    assert prep._mib("512MB") == pytest.approx(512e6 / 2**20)
    assert prep._mib("2GiB") == 2048 and prep._mib("8GB") == pytest.approx(8e9 / 2**20)
    with pytest.raises(SystemExit, match="not a size"):
        prep._mib("lots")


def test_cost_model_totals_follow_the_split_sizes(data_dir, tmp_path):
    """Device-hours of a one-run plan, recomputed by hand from the fold's split sizes and the step model."""
    from carebench.data.folds import split_rows

    plan = tmp_path / "plan.yaml"
    plan.write_text("name: one\nmodels: [lstm]\ntasks: [mortality]\nfolds: [1]\nseeds: [0]\n")
    steps = tmp_path / "steps.json"
    rows = [
        {
            "method": "lstm",
            "availability": 0.3,
            "reference": 900.0,
            "ours fp32": 600.0,
            "ours default": 300.0,
        },
        {
            "method": "lstm",
            "availability": 1.0,
            "reference": 1100.0,
            "ours fp32": 600.0,
            "ours default": 300.0,
        },
    ]
    steps.write_text(json.dumps(rows))
    cmd = [sys.executable, str(BENCH / "cost_model.py"), "--steps", str(steps), "--data", str(data_dir)]
    out = subprocess.run(
        [*cmd, "--plan", str(plan), "--epochs", "10"], check=True, capture_output=True, text=True
    )
    ds = open_dataset(data_dir, mmap=True)
    split = split_rows(ds.cohort, ds.label_columns("mortality"), 1, "base")
    n_tr, n_val, n_test = (len(split[s]) for s in ("train", "val", "test"))

    def hours(t: float) -> float:  # 10 epochs of training steps and validation forwards, then the test pass
        fwd = t / 3
        return (10 * (n_tr // 16 * t + -(-n_val // 16) * fwd) + -(-n_test // 16) * fwd) / 3600

    line = next(x for x in out.stdout.splitlines() if x.startswith("| 10 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert hours(300.0) > 4  # step times large enough that the rounded hours depend on the split sizes
    assert cells[1:4] == [f"{hours(t):,.0f}" for t in (1000.0, 600.0, 300.0)]
    assert cells[4] == f"{hours(1000.0) / hours(300.0):.2f}x"
