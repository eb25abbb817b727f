"""Experiment plans: validation errors name the key, exact expansion counts and order, de-duplication, profiles."""

from __future__ import annotations

import itertools

import pytest
import yaml

from carebench.evaluation.options import FairnessOptions, StatisticsOptions
from carebench.experiments import PlanError, expand_plan, load_plan, parse_plan, profiles
from carebench.models import get_model_class, list_models
from carebench.training import resolve_config
from fake_dataset import make_fake_dataset

BASE = {
    "name": "t",
    "preset": "test",
    "models": ["lstm", "latefusion"],
    "tasks": ["mortality", "los"],
    "folds": [1, 2],
    "seeds": [0, 1],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fake_dataset(tmp_path_factory.mktemp("plan"), n=60, image_size=16, n_features=3, seed=1)


def plan(**changes):
    raw = {**BASE, **changes}
    return parse_plan({k: v for k, v in raw.items() if v is not None}, source="test.yaml")


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": None}, "key 'name'"),
        ({"name": "has space"}, "key 'name'"),
        ({"modles": ["lstm"]}, "unknown key 'modles'"),
        ({"models": ["lstm", "nosuchnet"]}, "key 'models': unknown value 'nosuchnet'"),
        ({"models": None}, "missing key 'models'"),
        ({"tasks": ["mortality", "Sepsis!"]}, "key 'tasks': task name 'Sepsis!'"),
        ({"tasks": []}, "key 'tasks': expected a non-empty list"),
        ({"cohorts": ["full"]}, "key 'cohorts': unknown value 'full'"),
        ({"folds": [0, 1]}, "key 'folds': expected integers 1..5, got 0"),
        ({"folds": [1, 6]}, "key 'folds': expected integers 1..5, got 6"),
        ({"folds": [1, 1]}, "key 'folds': values repeat"),
        ({"seeds": [-1]}, "key 'seeds': expected integers >= 0"),
        ({"seeds": ["a"]}, "key 'seeds': expected integers"),
        ({"preset": "huge"}, "key 'preset': expected one of"),
        ({"overrides": {"fold": 2}}, "key 'overrides.fold': set by the grid; use the plan key 'folds'"),
        ({"overrides": {"cxr_dropout_train": 0.5}}, "use the plan key 'missingness.train_rates'"),
        ({"overrides": [1, 2]}, "key 'overrides': expected a mapping"),
        ({"model_overrides": {"lstm": {"threads": 4}}}, "key 'model_overrides.lstm.threads': set per job by"),
        ({"model_overrides": {"nosuchnet": {"hidden": 3}}}, "key 'model_overrides.nosuchnet': unknown model"),
        ({"grids": []}, "key 'grids': expected a non-empty list"),
        ({"grids": [{"tasks": ["los"], "folds": [9]}]}, "key 'grids[0].folds'"),
        ({"grids": [{"preset": "full"}]}, "unknown key 'grids[0].preset'"),
        (
            {"missingness": {"train_rates": [0.5, 1.0]}},
            "key 'missingness.train_rates': expected X-ray missing rates",
        ),
        ({"missingness": {"test_rates": [-0.1]}}, "key 'missingness.test_rates'"),
        ({"missingness": {"train_rate": [0.5]}}, "unknown key 'missingness.train_rate'"),
        ({"missingness": {"train_rates": [0.5], "models": ["lstm"]}}, "'lstm' does not use the X-ray"),
        ({"models": ["lstm"], "missingness": {"train_rates": [0.5]}}, "no model of the plan uses the X-ray"),
        (
            {"fairness": {"attributes": ["auroc"]}},
            "key 'fairness.attributes': 'auroc' is not an attribute name",
        ),
        ({"fairness": {"enabled": "yes"}}, "key 'fairness.enabled'"),
        ({"statistics": {"n_bootstrap": 0}}, "key 'statistics.n_bootstrap': expected an integer >= 1"),
        ({"statistics": {"confidence": 95}}, "key 'statistics.confidence'"),
    ],
)
def test_validation_errors_name_the_key(changes, message):
    with pytest.raises(PlanError) as e:
        plan(**changes)
    assert message in str(e.value)
    assert "test.yaml" in str(e.value)


def test_bad_files_and_unknown_profile(tmp_path):
    with pytest.raises(PlanError, match="neither a built-in profile"):
        load_plan(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(PlanError, match=r"bad\.yaml: not valid YAML"):
        load_plan(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(PlanError, match=r"list\.yaml: expected a mapping"):
        load_plan(tmp_path / "list.yaml")


def test_override_errors_are_reported_at_expansion_with_the_run(data_dir):
    p = plan(model_overrides={"lstm": {"hiddden": 3}})
    with pytest.raises(
        PlanError, match=r"plan .t., model .lstm., task .mortality.: unknown option .hiddden."
    ):
        expand_plan(p, data_dir)
    with pytest.raises(PlanError, match="option 'max_epochs' must be an integer"):
        expand_plan(plan(overrides={"max_epochs": "many"}), data_dir)


def test_tasks_are_checked_against_the_dataset_at_expansion(data_dir):
    """A plan names tasks; which exist is the dataset's business (its manifest declares them)."""
    with pytest.raises(
        PlanError, match=r"task 'sepsis'.*declares no such task; it declares mortality, phenotype, los"
    ):
        expand_plan(plan(tasks=["mortality", "sepsis"]), data_dir)


# ---------------------------------------------------------------------------------------------- expansion
def test_expansion_count_order_and_resolution(data_dir):
    runs = expand_plan(plan(), data_dir)
    assert len(runs) == 2 * 2 * 2 * 2 == 16
    assert len({r.run_id for r in runs}) == 16
    # fold, seed, task, cohort, model: models innermost
    expected = [
        (f, s, t, "base", m)
        for f, s, t, m in itertools.product([1, 2], [0, 1], ["mortality", "los"], ["lstm", "latefusion"])
    ]
    assert [(r.fold, r.seed, r.task, r.cohort, r.model) for r in runs] == expected
    # each run is exactly what `carebench train` would resolve (same run id)
    r = runs[5]
    same = resolve_config(
        data=data_dir,
        model=r.model,
        task=r.task,
        preset="test",
        options={"fold": r.fold, "seed": r.seed, "cohort": r.cohort},
    )
    assert same.run_id == r.run_id
    assert all(not r.progress and r.cxr_dropout_train == 0 and r.preset == "test" for r in runs)
    assert [r.run_id for r in expand_plan(plan(), data_dir)] == [r.run_id for r in runs]  # deterministic


def test_duplicates_across_grids_collapse(data_dir):
    # the second grid repeats 4 runs of the first (lstm, mortality), the third adds 2x2 matched runs
    p = plan(
        grids=[
            {},
            {"models": ["lstm"], "tasks": ["mortality"]},
            {"models": ["lstm"], "tasks": ["mortality"], "cohorts": ["matched"]},
        ]
    )
    runs = expand_plan(p, data_dir)
    assert len(runs) == 16 + 4
    assert [r.cohort for r in runs].count("matched") == 4
    assert [r.run_id for r in runs[:16]] == [r.run_id for r in expand_plan(plan(), data_dir)]


def test_overrides_global_grid_and_per_model(data_dir):
    p = plan(
        models=["lstm", "transformer"],
        tasks=["mortality"],
        folds=[1],
        seeds=[0],
        overrides={"max_epochs": 1, "lr": "5e-4"},  # a YAML 1.1 string number is read as a number
        model_overrides={"lstm": {"hidden": 5}},
        grids=[{}, {"overrides": {"max_epochs": 3}, "model_overrides": {"lstm": {"layers": 2}}}],
    )
    runs = expand_plan(p, data_dir)
    assert len(runs) == 4
    by = {(r.model, r.max_epochs): r for r in runs}
    assert set(by) == {("lstm", 1), ("transformer", 1), ("lstm", 3), ("transformer", 3)}
    assert all(r.lr == 5e-4 for r in runs)
    assert by["lstm", 1].model_args["hidden"] == 5 and by["lstm", 1].model_args["layers"] == 1
    assert by["lstm", 3].model_args["hidden"] == 5 and by["lstm", 3].model_args["layers"] == 2
    assert "hidden" not in by["transformer", 1].model_args


def test_missingness_grid_adds_train_rate_runs(data_dir):
    p = plan(
        missingness={
            "train_rates": [0.0, 0.5, 0.9],
            "test_rates": [0.3, 0, 0.6],
            "cohorts": ["matched"],
            "tasks": ["mortality"],
        }
    )
    runs = expand_plan(p, data_dir)
    # default missingness models: the plan's X-ray models (latefusion, not lstm); rate 0 adds none of its own
    extra = [r for r in runs if r.cxr_dropout_train > 0]
    assert len(runs) == 16 + 2 * 2 * 2 * 1 * 1 * 1  # 2 rates x 2 folds x 2 seeds x task x cohort x model
    assert {(r.model, r.cohort, r.task) for r in extra} == {("latefusion", "matched", "mortality")}
    assert sorted({r.cxr_dropout_train for r in extra}) == [0.5, 0.9]
    assert all(r.cxr_dropout_val == r.cxr_dropout_train and r.cxr_dropout_test == 0 for r in extra)
    assert p.missingness.test_rates == (0.0, 0.3, 0.6)  # carried for the analysis, sorted; not training runs


def test_cli_overrides_join_the_plan(data_dir, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({**BASE, "overrides": {"max_epochs": 1}}))
    p = load_plan(f, {"lr": 0.01})
    assert p.grids[0].overrides == {"max_epochs": 1, "lr": 0.01}
    assert all(r.lr == 0.01 and r.max_epochs == 1 for r in expand_plan(p, data_dir))


# ---------------------------------------------------------------------------------------------- profiles
def test_profiles_exist_and_paper_has_the_paper_grid(data_dir):
    assert {"quick", "paper"} <= set(profiles())
    paper = load_plan("paper")
    models = list_models()
    cxr_models = [m for m in models if "cxr" in get_model_class(m).modalities]
    runs = expand_plan(paper, data_dir)
    main = len(models) * 3 * 2 * 5 * 3
    assert len(runs) == main + len(cxr_models) * 3 * 1 * 5 * 3 * 2
    assert {r.preset for r in runs} == {"full"} and {r.seed for r in runs} == {42, 123, 1234}
    assert {(r.model, r.task, r.cohort, r.fold) for r in runs[:main]} == set(
        itertools.product(models, ["mortality", "phenotype", "los"], ["base", "matched"], range(1, 6))
    )
    assert {r.cxr_dropout_train for r in runs} == {0.0, 0.5, 0.9}
    assert paper.missingness.test_rates == tuple(round(0.1 * i, 1) for i in range(10))
    assert paper.fairness == {"enabled": True, "attributes": []}  # every attribute the dataset declares
    assert paper.statistics["n_bootstrap"] == 1000


def test_quick_profile_covers_every_method_on_phenotype(data_dir):
    quick = load_plan("quick")
    runs = expand_plan(quick, data_dir)
    pheno = {
        r.model
        for r in runs
        if r.task == "phenotype"
        and r.fold == 1
        and r.seed == 0
        and r.cohort == "base"
        and r.cxr_dropout_train == 0
    }
    assert pheno == set(list_models())
    assert {r.preset for r in runs} == {"quick"} and {r.max_epochs for r in runs} == {20}  # the quick preset
    assert quick.statistics["n_bootstrap"] >= 1000 and quick.statistics["n_permutations"] == 10000
    xray = [m for m in list_models() if "cxr" in get_model_class(m).modalities]
    assert len(runs) == len(list_models()) + 3 * 2 + len(xray)
    # the missing-X-ray training grid: every method that reads the X-ray, once, at train = val rate 0.5
    dropped = sorted(r.model for r in runs if r.cxr_dropout_train > 0)
    assert dropped == sorted(xray) and len(xray) == 15
    assert {(r.task, r.cxr_dropout_train, r.cxr_dropout_val) for r in runs if r.cxr_dropout_train > 0} == {
        ("phenotype", 0.5, 0.5)
    }
    assert {r.task for r in runs} == {"mortality", "phenotype", "los"}
    assert any(r.cxr_dropout_train > 0 for r in runs) and quick.missingness.test_rates


def test_plan_dict_round_trips():
    p = plan(
        models="all",
        grids=[{}, {"tasks": ["phenotype"], "models": ["lstm"]}],
        missingness={"train_rates": [0.5], "test_rates": [0.0, 0.5]},
    )
    again = parse_plan(p.to_dict(), source="again")
    assert again.to_dict() == p.to_dict()
    assert p.grids[0].models == tuple(list_models())
    # analysis sections left out take the defaults of the dataclasses that own them (the same `analyze` uses)
    assert p.statistics == StatisticsOptions().to_dict() and p.fairness == FairnessOptions().to_dict()


def test_plan_label_groups_are_validated_and_reach_the_analysis():
    from carebench.analysis.options import resolve_options

    p = plan(statistics={"label_groups": {"cardiac": ["pheno_shock", "pheno_congestive_heart_failure"]}})
    assert p.statistics["label_groups"] == {"cardiac": ["pheno_shock", "pheno_congestive_heart_failure"]}
    opts = resolve_options(p.to_dict())
    assert opts.label_groups == {"cardiac": ["pheno_shock", "pheno_congestive_heart_failure"]}
    for bad in ({"a@b": ["pheno_shock"]}, {"cardiac": []}, ["pheno_shock"], {"cardiac": "pheno_shock"}):
        with pytest.raises(PlanError, match=r"statistics\.label_groups"):
            plan(statistics={"label_groups": bad})
