"""Bad input to `carebench prepare --meds`: one clear line naming the file and column (or the option), exit
code 2, and nothing left on disk (no output directory, no temporary file or directory beside it)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from carebench.cli import app
from meds_fixture import events, label_table, write_image, write_image_table, write_inputs, write_meds


def _fail(tmp_path: Path, args: list[str], *must_contain: str) -> str:
    parent = tmp_path / "outputs"
    parent.mkdir(exist_ok=True)
    before = sorted(os.listdir(parent))
    res = CliRunner().invoke(app, ["prepare", *args, "--out", str(parent / "data")])
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], res.stderr
    line = errors[0]
    for text in must_contain:
        assert text in line, line
    assert sorted(os.listdir(parent)) == before  # nothing written, no temporary left
    return line


def _args(p: dict[str, Path], *extra: str) -> list[str]:
    return ["--meds", str(p["meds"]), "--labels", f"mortality={p['labels']}", "--feature-spec", str(p["spec"]),
            *extra]  # fmt: skip


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    return write_inputs(tmp_path)


def _rewrite_shard(p: dict[str, Path], table: pa.Table, split: str = "train") -> Path:
    shard = p["meds"] / "data" / split / "0.parquet"
    pq.write_table(table, shard)
    return shard


def test_missing_required_column(inputs, tmp_path):
    shard = inputs["meds"] / "data" / "train" / "0.parquet"
    _rewrite_shard(inputs, pq.read_table(shard).drop_columns(["code"]))
    _fail(tmp_path, _args(inputs), str(shard), "missing required column 'code'", "MEDS data shard")


def test_mistyped_column(inputs, tmp_path):
    shard = inputs["meds"] / "data" / "train" / "0.parquet"
    t = pq.read_table(shard)
    t = t.set_column(1, "time", t.column("time").cast(pa.string()))
    _rewrite_shard(inputs, t)
    _fail(tmp_path, _args(inputs), str(shard), "column 'time' has type string, expected timestamp[us]")


def test_unsorted_times_within_a_subject(inputs, tmp_path):
    from meds_fixture import data_table

    rows = [r for r in events() if r[0] in (1, 2, 3, 4)]
    i, j = 4, 5  # subject 1's 08:00:01 and 08:30 heart rates, swapped
    rows[i], rows[j] = rows[j], rows[i]
    shard = _rewrite_shard(inputs, data_table(rows))
    _fail(tmp_path, _args(inputs), str(shard), "column 'time' is not sorted within subject 1", "row 5")


def test_subject_not_contiguous(inputs, tmp_path):
    from meds_fixture import data_table

    rows = [r for r in events() if r[0] in (1, 2, 3, 4)]
    rows = [r for r in rows if r[0] == 2] + rows  # subject 2 first, and again later
    rows = [r for k, r in enumerate(rows) if not (r[0] == 2 and k >= 3)] + [r for r in rows[:3]]
    shard = _rewrite_shard(inputs, data_table(rows))
    _fail(tmp_path, _args(inputs), str(shard), "column 'subject_id'", "subject 2 are not contiguous")


def test_subject_in_two_shards(inputs, tmp_path):
    from meds_fixture import data_table

    extra = inputs["meds"] / "data" / "extra.parquet"
    pq.write_table(data_table([(5, "2100-01-03 10:00:00", "HR//bpm", 1.0)]), extra)
    _fail(
        tmp_path, _args(inputs), "column 'subject_id': subject 5 has events in several files", "extra.parquet"
    )


def test_empty_data_directory(tmp_path):
    p = write_inputs(tmp_path)
    for f in (p["meds"] / "data").rglob("*.parquet"):
        f.unlink()
    _fail(tmp_path, _args(p), str(p["meds"] / "data"), "no .parquet files")


def test_no_data_directory(tmp_path):
    root = tmp_path / "notmeds"
    root.mkdir()
    p = write_inputs(tmp_path)
    _fail(tmp_path, _args({**p, "meds": root}), f"--meds {root}", "no data/ directory")


def test_labels_for_unknown_subjects(inputs, tmp_path):
    bad = tmp_path / "bad_labels.parquet"
    pq.write_table(label_table({1: True, 7: False, 8: True}), bad)
    _fail(tmp_path, _args({**inputs, "labels": bad}), str(bad), "column 'subject_id'", "2 subject(s)", "7, 8")


def test_label_file_missing_prediction_time(inputs, tmp_path):
    bad = tmp_path / "bad_labels.parquet"
    pq.write_table(label_table({1: True}).drop_columns(["prediction_time"]), bad)
    _fail(tmp_path, _args({**inputs, "labels": bad}), str(bad), "missing required column 'prediction_time'")


def test_label_file_with_an_extra_column(inputs, tmp_path):
    bad = tmp_path / "bad_labels.parquet"
    t = label_table({1: True})
    pq.write_table(t.append_column("stay", pa.array([3], pa.int64())), bad)
    _fail(tmp_path, _args({**inputs, "labels": bad}), str(bad), "unexpected column 'stay'")


def test_label_file_with_null_labels(inputs, tmp_path):
    bad = tmp_path / "bad_labels.parquet"
    t = label_table({1: True, 2: False})
    t = t.set_column(2, "boolean_value", pa.array([True, None], pa.bool_()))
    pq.write_table(t, bad)
    _fail(tmp_path, _args({**inputs, "labels": bad}), str(bad), "column 'boolean_value' has 1 null label(s)")


def test_label_file_with_duplicate_rows(inputs, tmp_path):
    bad = tmp_path / "bad_labels.parquet"
    pq.write_table(pa.concat_tables([label_table({1: True}), label_table({1: False})]), bad)
    _fail(
        tmp_path,
        _args({**inputs, "labels": bad}),
        str(bad),
        "'subject_id', 'prediction_time'",
        "appears 2 times",
    )


def test_image_table_pointing_at_missing_files(inputs, tmp_path):
    write_image(tmp_path / "images" / "b.png", 77)
    table = write_image_table(
        tmp_path, [(1, "2100-01-03 11:00:00", "b.png"), (2, "2100-01-03 11:00:00", "gone.png")]
    )
    _fail(
        tmp_path, _args(inputs, "--images", str(table)), str(table), "column 'path'", "1 file(s)", "gone.png"
    )


def test_image_table_missing_a_column(inputs, tmp_path):
    table = write_image_table(tmp_path, [(1, "2100-01-03 11:00:00", "b.png")])
    pq.write_table(pq.read_table(table).drop_columns(["time"]), table)
    _fail(tmp_path, _args(inputs, "--images", str(table)), str(table), "missing column 'time'")


def test_unreadable_image(inputs, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "b.png").write_bytes(b"not an image")
    table = write_image_table(tmp_path, [(1, "2100-01-03 11:00:00", "b.png")])
    _fail(
        tmp_path,
        _args(inputs, "--images", str(table)),
        str(table),
        "column 'path'",
        "b.png",
        "cannot be decoded",
    )


def test_spec_matching_no_code(inputs, tmp_path):
    inputs["spec"].write_text(
        "version: 1\nhours: 4\nfeatures:\n  - name: x\n    codes: [{prefix: 'NOPE//'}]\n"
    )
    _fail(tmp_path, _args(inputs), str(inputs["spec"]), "no code of the MEDS data matches any feature")


def test_splits_without_a_labelled_subject(inputs, tmp_path):
    splits = inputs["meds"] / "metadata" / "subject_splits.parquet"
    t = pq.read_table(splits).filter(pa.compute.not_equal(pa.compute.field("subject_id"), 3))
    pq.write_table(t, splits)
    _fail(tmp_path, _args(inputs), str(splits), "column 'subject_id' lacks 1 labelled subject(s) (3)")


def test_unknown_split_name(tmp_path):
    p = write_inputs(
        tmp_path, splits={1: "train", 2: "train", 3: "train", 4: "train", 5: "dev", 6: "held_out"}
    )
    _fail(tmp_path, _args(p), "subject_splits.parquet", "column 'split' has values ['dev']", "--folds hash")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mimic-cxr", "x"], "--mimic-cxr: a MIMIC option"),
        (["--image-size", "4"], "--image-size 4: expected a number of pixels >= 8"),
        (["--folds", "random"], "--folds random: expected one of auto, splits, hash"),
        (["--image-lookback-hours", "-1"], "--image-lookback-hours -1.0: expected a number of hours > 0"),
    ],
)
def test_option_errors(inputs, tmp_path, extra, message):
    _fail(tmp_path, _args(inputs, *extra), message)


def test_label_option_syntax(inputs, tmp_path):
    args = ["--meds", str(inputs["meds"]), "--labels", "mortality", "--feature-spec", str(inputs["spec"])]
    _fail(tmp_path, args, "--labels mortality: expected NAME=PATH")
    _fail(tmp_path, [*args[:2], *args[4:]], "--labels: at least one NAME=PATH")


def test_meds_options_need_meds(demo_root, tmp_path):
    _fail(tmp_path, ["--mimic-iv", str(demo_root), "--labels", "a=b"], "--labels: a MEDS option")
    _fail(tmp_path, [], "give exactly one of --mimic-iv ROOT or --meds ROOT")


def test_out_inside_the_meds_root(inputs, tmp_path):
    res = CliRunner().invoke(app, ["prepare", *_args(inputs), "--out", str(inputs["meds"] / "out")])
    assert res.exit_code == 2 and "must not be or lie inside the input --meds" in res.stderr
    assert not (inputs["meds"] / "out").exists()


def test_builder_without_meds_splits(tmp_path):
    root = write_meds(tmp_path / "m", splits=None)
    assert not (root / "metadata" / "subject_splits.parquet").exists()
    assert (root / "data" / "0.parquet").is_file()
