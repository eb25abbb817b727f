"""`analysis.resume.WorkCache`: the finished pieces of an interrupted `analyze` (the end-to-end kill-and-resume
test is in tests/test_analyze.py). Pinned here: tables come back exactly (dtypes, index, NaN, strings), a piece is
whole or absent, keys follow every input, and a cache that cannot be written only loses its pieces."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmark_fixture import write_runs
from carebench import runs as R
from carebench.analysis.resume import META, WorkCache
from fake_dataset import make_fake_dataset


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    data = make_fake_dataset(tmp_path_factory.mktemp("resume"), n=40, image_size=8, n_features=3, seed=1)
    out = tmp_path_factory.mktemp("runs")
    write_runs(data, out, task="los", signal={"lstm": 0.6}, folds=(1,), seeds=(0, 1))
    return R.find_runs(out)


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "label": ["a", "b", None],
            "n": np.array([3, 0, 7], dtype=np.int64),
            "estimate": [0.5, np.nan, 1 / 3],
            "flag": [True, False, True],
            "group": pd.Categorical(["f", "m", "f"]),
        },
        index=pd.Index([4, 2, 9], name="row"),
    )


def test_pieces_come_back_exactly_and_keys_follow_their_inputs(tmp_path, records):
    cache = WorkCache(tmp_path / "pieces", {"dataset": "abc"})
    key = cache.key("statistics", {"seed": 0}, records)
    assert cache.get(key) is None and cache.reused == 0
    cache.put(key, {"board": _frame(), "empty": pd.DataFrame()}, {"reference": None, "n_stays": 12})
    tables, meta = cache.get(key)
    pd.testing.assert_frame_equal(tables["board"], _frame(), check_exact=True)
    assert tables["empty"].empty and meta == {"reference": None, "n_stays": 12} and cache.reused == 1
    # every input of the key changes it: options, kind, runs, a run's files, the context (dataset, version)
    assert cache.key("statistics", {"seed": 1}, records) != key
    assert cache.key("fairness", {"seed": 0}, records) != key
    assert cache.key("statistics", {"seed": 0}, records[:1]) != key
    assert WorkCache(tmp_path / "pieces", {"dataset": "abd"}).key("statistics", {"seed": 0}, records) != key
    (records[0].path / R.PREDICTIONS).touch()  # the same bytes, written again
    assert cache.key("statistics", {"seed": 0}, records) != key
    # no temporaries are left; clear removes everything
    assert [p.name for p in (tmp_path / "pieces").iterdir()] == [key]
    cache.clear()
    assert not (tmp_path / "pieces").exists()


def test_a_damaged_piece_is_computed_again_and_a_failed_write_loses_only_pieces(tmp_path, records):
    cache = WorkCache(tmp_path / "pieces", {})
    key = cache.key("fairness", {}, records[:1])
    cache.put(key, {"groups": _frame()}, {"thresholds": {"los": 0.25}})
    (tmp_path / "pieces" / key / "groups.parquet").write_bytes(b"not parquet")
    assert cache.get(key) is None and cache.reused == 0
    json.loads((tmp_path / "pieces" / key / META).read_text())  # the meta itself is whole
    blocked = tmp_path / "file"
    blocked.write_text("a file where the pieces would go")
    bad = WorkCache(blocked, {})
    bad.put(key, {"groups": _frame()}, {})
    assert bad.failed and str(blocked) in bad.failed and bad.get(key) is None
    assert blocked.read_text() == "a file where the pieces would go"
    assert WorkCache(None, {}).get(key) is None  # no root: nothing kept
