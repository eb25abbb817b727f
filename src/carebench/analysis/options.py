"""The options of `carebench analyze`, resolved once: command line > the runs' plan (RUNS/plan.yaml) > defaults.

Every default is read from the dataclass that owns it, never written here again: the resampling settings from
`evaluation.statistics.StatisticsOptions`, the fairness settings from `evaluation.fairness.FairnessOptions`, the
test-time X-ray missing rates from `experiments.plan.Missingness`. So `carebench analyze`, the Python entry point
`analysis.analyze(...)` and a plan without a `statistics` section resolve the same options (tested).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carebench.analysis.parallel import default_jobs
from carebench.errors import OptionError, UserError
from carebench.evaluation.options import DEFAULTS, FairnessOptions, StatisticsOptions, label_groups_problem
from carebench.experiments.plan import Missingness

_FAIRNESS = FairnessOptions()


class AnalysisError(UserError, ValueError):
    """Options or runs the analysis cannot use (the message names the option, file or run)."""


@dataclass
class AnalysisOptions:
    """Resolved options; recorded in summary.json."""

    n_bootstrap: int = DEFAULTS.n_bootstrap
    n_permutations: int = DEFAULTS.n_permutations
    confidence: float = DEFAULTS.confidence
    seed: int = DEFAULTS.seed
    fairness: bool = _FAIRNESS.enabled
    fairness_attributes: list[str] = field(default_factory=lambda: list(_FAIRNESS.attributes))
    missingness: bool = True
    ablation: bool = True
    test_rates: list[float] = field(default_factory=lambda: list(Missingness().test_rates))
    device: str = "cpu"
    label_groups: dict[str, list[str]] = field(default_factory=dict)
    label_groups_source: str = ""
    # task -> its label groups: each group goes to the multilabel task(s) having all its labels (`groups_by_task`)
    task_label_groups: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    pairs: str = DEFAULTS.pairs
    sequential_h: int = DEFAULTS.sequential_h
    jobs: int = 1  # worker processes (analysis.parallel); the tables do not depend on it; CLI: every core

    @property
    def statistics(self) -> StatisticsOptions:
        return StatisticsOptions(
            n_bootstrap=self.n_bootstrap,
            n_permutations=self.n_permutations,
            confidence=self.confidence,
            seed=self.seed,
            label_groups=self.label_groups,
            pairs=self.pairs,
            sequential_h=self.sequential_h,
        )


def groups_by_task(
    groups: Mapping[str, Sequence[str]], labels: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, list[str]]]:
    """Each label group assigned to the multilabel task(s) of `labels` (task -> its output names) that have all of
    its labels, so one `--label-groups` file can hold the groups of several multilabel tasks. A group that fits no
    task is an error naming the group and the labels it lacks."""
    out: dict[str, dict[str, list[str]]] = {}
    if not groups:
        return out
    if not labels:
        raise AnalysisError(
            f"label groups {sorted(groups)}: label groups apply to multilabel tasks; the runs have none"
        )
    for g, members in groups.items():
        fits = [t for t, names in labels.items() if set(members) <= set(names)]
        if not fits:
            lacking = {t: sorted(set(members) - set(names)) for t, names in labels.items()}
            if len(lacking) == 1:
                [(t, unknown)] = lacking.items()
                raise AnalysisError(
                    f"label group {g!r}: unknown label(s) {unknown}; labels of task {t!r}: {list(labels[t])}"
                )
            raise AnalysisError(
                f"label group {g!r}: its labels are not all labels of one multilabel task ("
                + "; ".join(f"{t} lacks {u}" for t, u in lacking.items())
                + ")"
            )
        for t in fits:
            out.setdefault(t, {})[g] = list(members)
    return out


def read_label_groups(
    source: str | Path | Mapping[str, Any], what: str = "--label-groups"
) -> dict[str, list[str]]:
    """Label groups from a mapping or a JSON/YAML file: `{group: [labels]}`, or the planted.json of
    `carebench synth` (`{"phenotypes": {label: kind}}` -> one group per kind, in order of first appearance)."""
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise AnalysisError(f"{what} {path}: not a readable JSON or YAML file ({e})") from None
    if isinstance(data, Mapping) and isinstance(data.get("phenotypes"), Mapping):
        kinds = data["phenotypes"]
        data = {}
        for label, kind in kinds.items():
            data.setdefault(str(kind), []).append(str(label))
    # the labels themselves are checked against the runs' label columns by the statistics
    if problem := label_groups_problem(data):
        raise AnalysisError(
            f"{what} {source}: {problem} (e.g. {{cardiac: [label_a, label_b, ...]}}, or a planted.json)"
        )
    return {str(g): list(dict.fromkeys(v)) for g, v in data.items()}


_GIVEN = ("n_bootstrap", "n_permutations", "confidence", "seed", "fairness", "missingness", "ablation",
          "test_rates", "device", "label_groups", "jobs", "pairs", "sequential_h")  # fmt: skip


def resolve_options(plan: dict[str, Any] | None, **given: Any) -> AnalysisOptions:
    """Options from the command line (`given`, None = not given), else the plan's, else the defaults; validated."""
    unknown = sorted(set(given) - set(_GIVEN))
    if unknown:
        raise AnalysisError(f"unknown analysis option(s) {unknown}")
    plan = plan or {}
    planned = {k: v for k, v in (plan.get("statistics") or {}).items() if k != "label_groups"}
    stats = {k: given[k] if given.get(k) is not None else planned.get(k) for k in ("n_bootstrap", "n_permutations",
             "confidence", "seed", "pairs", "sequential_h")}  # fmt: skip
    try:
        resolved = StatisticsOptions.from_mapping(stats)
    except OptionError as e:
        raise AnalysisError(f"--{e.key.replace('_', '-')}: {e.problem}") from None
    try:
        fair = FairnessOptions.from_mapping(plan.get("fairness"))
    except OptionError as e:
        raise AnalysisError(f"plan.yaml of the runs: key 'fairness.{e.key}': {e.problem}") from None
    out = AnalysisOptions(
        n_bootstrap=resolved.n_bootstrap,
        n_permutations=resolved.n_permutations,
        confidence=resolved.confidence,
        seed=resolved.seed,
        pairs=resolved.pairs,
        sequential_h=resolved.sequential_h,
        fairness=given["fairness"] if given.get("fairness") is not None else fair.enabled,
        fairness_attributes=list(fair.attributes),
        missingness=given.get("missingness") is not False,
        ablation=given.get("ablation") is not False,
    )
    rates = given.get("test_rates") or (plan.get("missingness") or {}).get("test_rates") or out.test_rates
    rates = sorted({0.0, *(float(r) for r in rates)})
    if any(not 0.0 <= r <= 1.0 for r in rates):
        raise AnalysisError(f"test missing rates: expected numbers in [0, 1], got {rates}")
    out.test_rates = rates
    out.device = given.get("device") or out.device
    jobs = given.get("jobs")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0):
        raise AnalysisError(
            f"--jobs: expected a number of worker processes >= 0 (0: every core), got {jobs!r}"
        )
    out.jobs = 1 if jobs is None else jobs or default_jobs()
    groups = given.get("label_groups")
    what = "--label-groups"
    if groups is None and (plan.get("statistics") or {}).get("label_groups"):
        groups, what = plan["statistics"]["label_groups"], "plan statistics.label_groups"
    if groups is not None:
        out.label_groups = read_label_groups(groups, what)
        out.label_groups_source = str(groups) if isinstance(groups, str | Path) else "plan"
    return out
