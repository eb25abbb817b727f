import pytest

from carebench.data.definitions import (
    DefinitionError,
    load_features,
    load_phenotypes,
    race_group,
)


def test_feature_file_has_required_features():
    fs = load_features()
    assert fs.hours == 48
    assert len(fs.features) >= 25
    names = set(fs.names)
    for required in [
        "heart_rate",
        "sbp",
        "dbp",
        "mbp",
        "resp_rate",
        "spo2",
        "temperature",
        "glucose",
        "gcs_eye",
        "gcs_verbal",
        "gcs_motor",
        "fio2",
        "urine_output",
        "creatinine",
        "bun",
        "sodium",
        "potassium",
        "chloride",
        "bicarbonate",
        "anion_gap",
        "hemoglobin",
        "hematocrit",
        "wbc",
        "platelets",
        "lactate",
        "ph",
        "bilirubin_total",
    ]:
        assert required in names
    # invasive and non-invasive pressures are one feature
    sbp = next(f for f in fs.features if f.name == "sbp")
    assert set(sbp.itemids["chartevents"]) == {220050, 220179}
    # an itemid belongs to at most one feature
    ids = [i for f in fs.features for i in f.all_itemids()]
    assert len(ids) == len(set(ids))


def test_phenotypes_are_the_25_benchmark_ccs_categories():
    ph = load_phenotypes()
    assert [p.ccs for p in ph] == [
        2,
        49,
        50,
        53,
        55,
        98,
        99,
        100,
        101,
        105,
        106,
        108,
        109,
        122,
        127,
        130,
        131,
        133,
        134,
        151,
        153,
        157,
        158,
        238,
        249,
    ]
    assert sum(p.type == "acute" for p in ph) == 15
    assert sum(p.type == "chronic" for p in ph) == 10
    assert all(p.column.startswith("pheno_") for p in ph)


@pytest.mark.parametrize(
    "raw,group",
    [
        ("WHITE", "WHITE"),
        ("WHITE - RUSSIAN", "WHITE"),
        ("white - other european ", "WHITE"),
        ("PORTUGUESE", "WHITE"),
        ("BLACK/CAPE VERDEAN", "BLACK/AFRICAN AMERICAN"),
        ("HISPANIC/LATINO - PUERTO RICAN", "HISPANIC/LATINO"),
        ("HISPANIC OR LATINO", "HISPANIC/LATINO"),
        ("ASIAN - CHINESE", "ASIAN"),
        ("UNKNOWN", "OTHER"),
        ("SOMETHING NEW", "OTHER"),
        (None, "OTHER"),
        ("", "OTHER"),
    ],
)
def test_race_group_mapping(raw, group):
    assert race_group(raw) == group


def test_bad_feature_file_names_file_and_field(tmp_path):
    p = tmp_path / "f.yaml"
    p.write_text(
        "hours: 48\nfeatures:\n  - name: hr\n    itemids: {chartevents: [1]}\n"
        "    valid_range: [5, 1]\n    aggregation: mean\n"
    )
    with pytest.raises(DefinitionError, match=r"f\.yaml: feature 'hr': 'valid_range'"):
        load_features(p)
    p.write_text(
        "hours: 48\nfeatures:\n  - name: hr\n    itemids: {nosuchtable: [1]}\n"
        "    valid_range: [0, 1]\n    aggregation: mean\n"
    )
    with pytest.raises(DefinitionError, match="unknown source table 'nosuchtable'"):
        load_features(p)
