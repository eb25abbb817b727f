"""`prepare --meds` on a small MEDS dataset with known answers (tests/meds_fixture.py): the window, the grid
values, conversions, ranges, aggregations, age, attributes, folds from the MEDS splits, label files and images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from carebench.data.meds.pipeline import _Timer, build
from carebench.data.meds.source import MedsInputError
from meds_fixture import PT, label_table, write_image, write_image_table, write_inputs


def _build(paths: dict[str, Path], labels: list[str] | None = None, **kw) -> tuple[dict, list[str]]:
    warnings: list[str] = []
    args = {
        "labels": labels or [f"mortality={paths['labels']}"],
        "feature_spec": paths["spec"],
        "images": None,
        "image_lookback_hours": None,
        "folds": "auto",
        "seed": 0,
        "threads": 1,
        "memory_limit": "1GB",
    }
    args.update(kw)
    parts = build(paths["meds"], timer=_Timer(), warnings=warnings, **args)
    return parts, warnings


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    return write_inputs(tmp_path)


def test_rows_labels_and_grid_values(inputs):
    parts, warnings = _build(inputs)
    c, ehr = parts["cohort"], parts["ehr"]
    assert list(c["subject_id"]) == [1, 2, 3, 4, 5, 6] and list(c["stay_id"]) == list(range(6))
    assert (c["prediction_time"] == pd.Timestamp(PT)).all()
    assert list(c["label_mortality"]) == [1, 0, 0, 1, 0, 0] and c["label_mortality"].dtype == np.int8
    assert ehr.shape == (6, 4, 4) and ehr.dtype == np.float32
    hr, temp, urine, k = (ehr[0, :, j] for j in range(4))
    # 08:00:00 is the (excluded) window start, 12:00:01 is after PT; 500 bpm is out of range
    np.testing.assert_array_equal(hr, np.array([95.0, np.nan, np.nan, 120.0], dtype=np.float32))
    np.testing.assert_allclose(temp, [np.nan, 37.2, np.nan, np.nan], rtol=1e-6)
    np.testing.assert_array_equal(urine, np.array([np.nan, np.nan, 150.0, np.nan], dtype=np.float32))
    np.testing.assert_allclose(k, [np.nan, np.nan, np.nan, 4.4], rtol=1e-6)  # tie at 11:10 -> larger
    assert ehr[1, 3, 0] == 60.0 and np.isnan(ehr[1, :3]).all()
    for s in range(3, 7):  # 10:00 closes step 1
        assert ehr[s - 1, 1, 0] == 70.0 + s and np.isnan(ehr[s - 1]).sum() == 15
    st = parts["feature_stats"]
    assert st["hr"] == {
        "events_in_window": 9,
        "dropped_out_of_range": 1,
        "observed_bins": 7,
        "rows_observed": 6,
    }
    assert st["temp"]["events_in_window"] == 2 and st["potassium"]["events_in_window"] == 3
    codes = {f: [m["code"] for m in v] for f, v in parts["code_map"].matched.items()}
    assert codes == {"hr": ["HR//beats", "HR//bpm"], "temp": ["TEMP//C", "TEMP//F"], "urine": ["URINE"],
                     "potassium": ["K"]}  # fmt: skip
    assert warnings == []


def test_age_and_attributes_at_the_prediction_time(inputs):
    c = _build(inputs)[0]["cohort"]
    assert list(c["age"]) == [100.0, 99.0, 149.0, 149.0, 149.0, 149.0]  # 2 is one second short of 100
    assert list(c["sex"]) == ["F", "M", "F", "M", "F", "M"]
    assert c["ward"].iloc[0] == "B" and c["ward"].iloc[1:].isna().all()  # WARD//C comes after PT


def test_folds_follow_the_meds_splits(inputs):
    parts = _build(inputs)[0]
    c = parts["cohort"].set_index("subject_id")
    assert parts["fold_mode"] == "splits"
    assert c.loc[6, "fold"] == 1 and c.loc[6, "split"] == "held_out"
    assert c.loc[5, "fold"] == 2 and c.loc[5, "split"] == "tuning"
    assert sorted(c.loc[[1, 2, 3, 4], "fold"].unique()) == [3, 4, 5]
    again = _build(inputs, seed=0)[0]["cohort"]
    assert list(again["fold"]) == list(parts["cohort"]["fold"])  # deterministic
    hashed = _build(inputs, folds="hash")[0]
    h = hashed["cohort"].set_index("subject_id")["fold"]
    assert hashed["fold_mode"] == "hash" and sorted(h.value_counts()) == [1, 1, 1, 1, 2]
    assert h[1] != h[4]  # stratified by mortality: the two deaths are dealt to different folds
    assert "split" not in hashed["cohort"]


def test_several_label_files_make_the_union_of_rows(inputs, tmp_path):
    later = PT.replace(hour=20)
    pq.write_table(label_table({1: 2, 3: 0}, "integer_value", later), tmp_path / "stage.parquet")
    pq.write_table(
        label_table({1: "home", 2: "rehab", 4: "home"}, "categorical_value"), tmp_path / "dest.parquet"
    )
    parts = _build(
        inputs,
        labels=[
            f"mortality={inputs['labels']}",
            f"stage={tmp_path / 'stage.parquet'}",
            f"discharge={tmp_path / 'dest.parquet'}",
        ],
    )[0]
    c = parts["cohort"]
    # 6 rows at PT plus 2 at 20:00 (subjects 1 and 3), sorted by subject and time
    assert list(zip(c["subject_id"], c["prediction_time"].dt.hour, strict=True)) == [
        (1, 12), (1, 20), (2, 12), (3, 12), (3, 20), (4, 12), (5, 12), (6, 12)
    ]  # fmt: skip
    assert c["label_mortality"].isna().sum() == 2 and c["label_mortality"].dtype == np.float32
    assert np.isnan(c["label_stage"].iloc[0])
    assert (
        c["label_stage"].iloc[1] == 2
        and c["label_stage"].iloc[4] == 0
        and c["label_stage"].notna().sum() == 2
    )
    assert c["label_discharge"].tolist()[0] == 0 and c["label_discharge"].iloc[2] == 1  # home=0, rehab=1
    decl = {t.name: t.declaration() for t in parts["tasks"]}
    assert decl["mortality"] == {"labels": ["label_mortality"]}  # a registered task: columns only
    assert decl["stage"]["spec"]["kind"] == "multiclass"
    assert decl["stage"]["spec"]["class_names"] == ["0", "1", "2"]
    assert decl["discharge"]["spec"]["class_names"] == ["home", "rehab"]
    # the second row of subject 1 (20:00) has its own window: (16:00, 20:00] holds none of its events
    assert np.isnan(parts["ehr"][1]).all()


def test_multilabel_task_from_several_boolean_files(inputs, tmp_path):
    for name, vals in (("a", {1: True, 2: False}), ("b", {1: False, 2: True})):
        pq.write_table(label_table(vals), tmp_path / f"{name}.parquet")
    parts = _build(
        inputs,
        labels=[
            f"mortality={inputs['labels']}",
            f"dx:a={tmp_path / 'a.parquet'}",
            f"dx:b={tmp_path / 'b.parquet'}",
        ],
    )[0]
    decl = {t.name: t.declaration() for t in parts["tasks"]}["dx"]
    assert decl == {"labels": ["label_dx_a", "label_dx_b"], "label_names": ["a", "b"],
                    "spec": {"kind": "multilabel", "description": "dx (MEDS label files)"}}  # fmt: skip
    c = parts["cohort"]
    assert c["label_dx_a"].iloc[:2].tolist() == [1, 0] and c["label_dx_b"].iloc[:2].tolist() == [0, 1]


def test_images_last_before_the_prediction_time(inputs, tmp_path):
    d = tmp_path / "images"
    write_image(d / "a.png", 10)
    write_image(d / "b.png", 77)
    write_image(d / "c.png", 200)
    write_image(d / "d.png", 150)
    table = write_image_table(
        tmp_path,
        [
            (1, "2100-01-03 07:00:00", "a.png"),  # before the 4 h look-back
            (1, "2100-01-03 11:00:00", "b.png"),  # the last one before PT
            (1, "2100-01-03 12:30:00", "c.png"),  # after PT
            (2, "2100-01-03 12:00:00", "d.png"),  # at PT: allowed
        ],
    )
    parts = _build(inputs, images=table)[0]
    c = parts["cohort"]
    assert list(c["has_cxr"]) == [True, True, False, False, False, False]
    assert list(c["cxr_index"]) == [0, 1, -1, -1, -1, -1]
    assert c["cxr_hours"].iloc[0] == 3.0 and c["cxr_hours"].iloc[1] == 4.0  # from the window start, 08:00
    assert [Path(p).name for p in parts["links"].paths] == ["b.png", "d.png"]
    wider = _build(inputs, images=table, image_lookback_hours=6.0)[0]
    assert wider["links"].stats["rows_with_several_candidates"] == 1
    assert [Path(p).name for p in wider["links"].paths] == ["b.png", "d.png"]
    narrow = _build(inputs, images=table, image_lookback_hours=0.5)[0]
    assert [Path(p).name for p in narrow["links"].paths] == ["d.png"]


def test_image_cache_pixels(inputs, tmp_path):
    from carebench.data.meds.images import build_cache

    write_image(tmp_path / "images" / "b.png", 77)
    write_image(tmp_path / "images" / "d.png", 150, size=(64, 32))
    table = write_image_table(
        tmp_path, [(1, "2100-01-03 11:00:00", "b.png"), (2, "2100-01-03 12:00:00", "d.png")]
    )
    links = _build(inputs, images=table)[0]["links"]
    build_cache(links, tmp_path / "cache.npy", 16, 1, table)
    cache = np.load(tmp_path / "cache.npy")
    assert cache.shape == (2, 16, 16) and cache.dtype == np.uint8
    assert (cache[0] == 77).all() and (cache[1] == 150).all()


def test_unmatched_matcher_is_a_warning(inputs):
    inputs["spec"].write_text(inputs["spec"].read_text().replace('["K"]', '["K", "K_ARTERIAL"]'))
    warnings = _build(inputs)[1]
    assert warnings == [
        "feature spec: feature 'potassium': code 'K_ARTERIAL' matches no code of the MEDS data"
    ]


def test_spec_errors(inputs):
    spec = inputs["spec"]
    text = spec.read_text()
    spec.write_text(text.replace('codes: ["K"]', 'codes: [{prefix: "HR//"}]'))
    with pytest.raises(MedsInputError, match=r"code 'HR//beats' is matched by features hr, potassium"):
        _build(inputs)
    spec.write_text(text.replace("aggregation: last", "aggregation: median"))
    with pytest.raises(Exception, match=r"feature 'potassium': 'aggregation' must be one of"):
        _build(inputs)


def _prepare(args: list[str]) -> None:
    from typer.testing import CliRunner

    from carebench.cli import app

    res = CliRunner().invoke(app, ["prepare", *args])
    assert res.exit_code == 0, (res.stderr, res.exception)


def test_prepare_meds_writes_the_dataset(inputs, tmp_path):
    from carebench.data import open_dataset

    write_image(tmp_path / "images" / "b.png", 77)
    write_image(tmp_path / "images" / "d.png", 150, size=(64, 32))
    table = write_image_table(
        tmp_path, [(1, "2100-01-03 11:00:00", "b.png"), (2, "2100-01-03 12:00:00", "d.png")]
    )
    args = ["--meds", str(inputs["meds"]), "--labels", f"mortality={inputs['labels']}", "--feature-spec",
            str(inputs["spec"]), "--images", str(table), "--image-size", "16", "--threads", "1"]  # fmt: skip
    _prepare([*args, "--out", str(tmp_path / "data")])
    ds = open_dataset(tmp_path / "data", mmap=False)
    m = ds.manifest
    assert m["producer"]["name"] == "meds" and m["producer"]["options"]["fold_mode"] == "splits"
    assert m["features"] == ["hr", "temp", "urine", "potassium"]
    assert m["time_grid"] == {"steps": 4, "step_hours": 1.0, "hours": 4.0}
    assert m["tasks"] == [{"name": "mortality", "labels": ["label_mortality"]}]
    assert [a["name"] for a in m["fairness"]["attributes"]] == ["sex", "ward"]
    assert m["images"] == {"file": "cxr.npy", "count": 2, "size": 16}
    assert m["warnings"] == [] and m["cohort_steps"][0]["stays"] == 6
    assert m["counts"]["labels"] == {"label_mortality": {"labelled": 6, "positive": 2}}
    assert m["counts"]["data"] == {"events": 33, "subjects": 6, "static_events": 6, "numeric_events": 18,
                                   "shards": 3}  # fmt: skip
    assert len(m["sources"]["data"]) == 3 and all("sha256" in r for r in m["sources"]["data"])
    assert m["meds_dataset"]["dataset_name"] == "toy"
    assert ds.ehr.shape == (6, 4, 4) and ds.ehr[0, 0, 0] == 95.0 and ds.ehr[0, 3, 0] == 120.0
    assert ds.cxr.shape == (2, 16, 16) and (ds.cxr[0] == 77).all() and (ds.cxr[1] == 150).all()
    c = ds.cohort
    assert list(c["cxr_index"]) == [0, 1, -1, -1, -1, -1] and list(c["fold"])[4:] == [2, 1]
    assert list(c["sex"]) == ["F", "M", "F", "M", "F", "M"] and c["age"].iloc[0] == 100
    # the same inputs give the same bytes
    _prepare([*args, "--out", str(tmp_path / "again")])
    assert open_dataset(tmp_path / "again").manifest["content_sha256"] == m["content_sha256"]


def test_unmatched_matcher_warning_reaches_the_manifest(inputs, tmp_path):
    from carebench.data import open_dataset

    inputs["spec"].write_text(inputs["spec"].read_text().replace('["K"]', '["K", "K_ARTERIAL"]'))
    _prepare(["--meds", str(inputs["meds"]), "--labels", f"mortality={inputs['labels']}", "--feature-spec",
              str(inputs["spec"]), "--out", str(tmp_path / "data")])  # fmt: skip
    m = open_dataset(tmp_path / "data").manifest
    assert m["warnings"] == [
        "feature spec: feature 'potassium': code 'K_ARTERIAL' matches no code of the MEDS data"
    ]
    assert m["feature_codes"]["potassium"] == [{"code": "K", "events": 3, "numeric_events": 3}]


def test_shipped_mimic_spec_mirrors_the_mimic_features():
    """`--feature-spec mimic-iv` is features.yaml with each itemid turned into the ETL's code prefix."""
    from carebench.data.definitions import load_features, meds_feature_spec
    from carebench.data.meds.spec import load_spec

    prefix = {
        "chartevents": "LAB//{}//",
        "labevents": "LAB//RESULT//{}//",
        "outputevents": "SUBJECT_FLUID_OUTPUT//{}//",
    }
    mimic, meds_spec = load_features(), load_spec(meds_feature_spec("mimic-iv"))
    assert meds_spec.hours == mimic.hours and meds_spec.step_hours == 1
    assert meds_spec.names == mimic.names
    for f, g in zip(mimic.features, meds_spec.features, strict=True):
        assert (g.unit, g.aggregation, g.valid_range) == (f.unit, f.aggregation, f.valid_range), f.name
        want = [(prefix[t].format(i), f.convert.get(i, "none")) for t, ids in f.itemids.items() for i in ids]
        assert [(m.pattern, m.conversion.name) for m in g.matchers] == want, f.name
        assert all(m.kind == "prefix" for m in g.matchers)


def test_meds_defaults_match_the_shared_prepare_options():
    from carebench.data.meds.options import MEDS
    from carebench.data.mimic.options import PREPARE

    for name in ("image_size", "threads", "memory_limit", "seed"):
        assert getattr(MEDS, name) == getattr(PREPARE, name), name


def test_image_table_as_csv(inputs, tmp_path):
    write_image(tmp_path / "images" / "b.png", 77)
    table = tmp_path / "images" / "images.csv"
    table.write_text("subject_id,time,path\n1,2100-01-03 11:00:00,b.png\n1,2100-01-03 12:30:00,b.png\n")
    parts = _build(inputs, images=table)[0]
    assert list(parts["cohort"]["cxr_index"]) == [0, -1, -1, -1, -1, -1]
    assert parts["cohort"]["cxr_hours"].iloc[0] == 3.0 and parts["image_stats"]["rows"] == 2
