"""Each default is defined once: the plan, `carebench analyze` and the Python entry points resolve the same
analysis options (the plan used to default to 1,000 permutations where `analyze` used 10,000)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from typer.testing import CliRunner

from carebench import cli
from carebench.analysis import comparisons, fairness
from carebench.analysis.options import AnalysisOptions, resolve_options
from carebench.analysis.parallel import default_jobs
from carebench.evaluation import statistics as st
from carebench.evaluation.options import DEFAULTS, FairnessOptions, StatisticsOptions
from carebench.experiments.plan import Missingness, parse_plan, plan_record

EXPECTED = {"n_bootstrap": 1000, "n_permutations": 10000, "confidence": 0.95, "seed": 0}


def _resampling(opts: AnalysisOptions) -> dict:
    return {k: getattr(opts, k) for k in EXPECTED}


def test_the_owner_holds_the_documented_defaults():
    assert {k: getattr(DEFAULTS, k) for k in EXPECTED} == EXPECTED
    assert StatisticsOptions().label_groups == {} and FairnessOptions().enabled is True
    assert DEFAULTS.pairs == "findings" and resolve_options(None).pairs == "findings"
    assert DEFAULTS.sequential_h == 50 and resolve_options(None, sequential_h=0).sequential_h == 0


def test_plan_cli_and_python_resolve_the_same_options(tmp_path, monkeypatch):
    python = resolve_options(None)  # carebench.analysis.analyze(runs) with no options and no plan.yaml
    # a plan that leaves the statistics and fairness sections out, as `benchmark` records it in plan.yaml
    p = parse_plan({"name": "p", "models": ["lstm"], "tasks": ["mortality"]})
    recorded = plan_record(p, [])
    from_plan = resolve_options(recorded)
    assert recorded["statistics"]["n_permutations"] == 10000
    # `carebench analyze RUNS` without options: capture what the CLI passes to the Python entry point
    seen = {}

    def fake_analyze(runs_dir, *, data=None, console=None, **options):
        seen.update(options)
        raise SystemExit(0)

    monkeypatch.setattr("carebench.analysis.analyze.analyze", fake_analyze)
    result = CliRunner().invoke(cli.app, ["analyze", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    from_cli = resolve_options(None, **seen)
    from_cli_with_plan = resolve_options(recorded, **seen)
    # every option that shapes a table agrees; the CLI's worker processes default to every core (Python: 1), which
    # no table depends on (tests/test_analyze.py compares the tables of --jobs 1 and 2)
    assert python.jobs == 1 and from_cli.jobs == from_cli_with_plan.jobs == default_jobs()
    for opts in (from_plan, from_cli, from_cli_with_plan):
        assert dataclasses.replace(opts, jobs=1) == python
    assert _resampling(python) == EXPECTED
    assert python.fairness is True and python.test_rates == sorted({0.0, *Missingness().test_rates})


def test_an_option_given_beats_the_plan_which_beats_the_default():
    p = parse_plan(
        {
            "name": "p",
            "models": ["lstm"],
            "tasks": ["mortality"],
            "statistics": {"n_permutations": 500, "seed": 3},
        }
    )
    recorded = plan_record(p, [])
    assert _resampling(resolve_options(recorded)) == {**EXPECTED, "n_permutations": 500, "seed": 3}
    given = resolve_options(recorded, n_permutations=20, seed=None)
    assert (given.n_permutations, given.seed) == (20, 3)
    planned = plan_record(parse_plan({"name": "p", "models": ["lstm"], "tasks": ["mortality"],
                                      "statistics": {"pairs": "all"}}), [])  # fmt: skip
    assert resolve_options(planned).pairs == "all"
    assert resolve_options(planned, pairs="reference").pairs == "reference"
    assert resolve_options(planned).statistics.pairs == "all"


def test_kernel_keyword_defaults_read_the_owner():
    for fn, key, owner in [
        (st.paired_permutation_test, "n_permutations", "n_permutations"),
        (st.bootstrap_ci, "n_resamples", "n_bootstrap"),
        (comparisons.compare_methods, "n_permutations", "n_permutations"),
        (comparisons.compare_methods, "n_resamples", "n_bootstrap"),
        (comparisons.compare_methods, "sequential_h", "sequential_h"),
        (st.paired_permutation_test, "sequential_h", "sequential_h"),
        (fairness.analyze_fairness, "n_resamples", "n_bootstrap"),
    ]:
        assert inspect.signature(fn).parameters[key].default == getattr(DEFAULTS, owner), fn.__name__


def test_bad_option_values_name_the_option():
    with pytest.raises(ValueError, match="--n-permutations: expected an integer >= 1, got 0"):
        resolve_options(None, n_permutations=0)
    with pytest.raises(ValueError, match=r"--confidence: expected a number in \(0, 1\), got 1\.5"):
        resolve_options(None, confidence=1.5)
    with pytest.raises(ValueError, match="--sequential-h: expected an integer >= 0, got -1"):
        resolve_options(None, sequential_h=-1)
    with pytest.raises(ValueError, match="--pairs: expected one of findings, reference, all, got 'some'"):
        resolve_options(None, pairs="some")
