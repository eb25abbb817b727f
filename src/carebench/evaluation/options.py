"""The settings of the kernels and their defaults, each written once (light: no numpy, no scikit-learn).

A plan's `statistics` and `fairness` sections, `carebench analyze` (its options and its `--help`), the Python entry
points and the kernels' own keyword defaults all read them from here, so the same runs give the same p-values
whichever way the analysis is started.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from carebench.errors import OptionError

# Method pairs compared besides each fusion method vs the reference (StatisticsOptions.pairs).
PAIRS = ("findings", "reference", "all")
GROUP_SEP = "@"  # "auroc_macro@both": macro average over the labels of group "both"
# Names a fairness attribute cannot have: the columns of the fairness tables (docs/fairness.md).
RESERVED_ATTRIBUTE_NAMES = frozenset(
    {"label", "attribute", "group", "n", "n_pos", "threshold", "missing_cxr_rate", "suppressed", "prevalence",
     "auroc", "auprc", "tpr", "fpr", "ece", "positive_rate", "task", "cohort", "method", "run_id", "fold",
     "seed", "stay_id", "metric"}
)  # fmt: skip


def label_groups_problem(groups: Any) -> str | None:
    """Why `groups` is not a label-group mapping ({name: [label, ...]}, names without '@' or '/'), or None."""
    if not isinstance(groups, Mapping) or not groups:
        return "expected a non-empty mapping of group name to a list of labels"
    for g, labels in groups.items():
        if not isinstance(g, str) or not g or GROUP_SEP in g or "/" in g:
            return f"group name {g!r}: expected a non-empty name without '@' or '/'"
        if not isinstance(labels, list | tuple) or not labels or not all(isinstance(x, str) for x in labels):
            return f"group {g!r}: expected a non-empty list of label names, got {labels!r}"
    return None


@dataclass(frozen=True)
class StatisticsOptions:
    """The resampling settings of the analysis, and the one place their defaults are written.

    The kernels' own defaults, a plan's `statistics` section, `carebench analyze` and the report all read them
    from here, so the same runs give the same p-values whichever entry point resolves the options.
    n_bootstrap: resamples per bootstrap CI; n_permutations: permutations per paired test; confidence: CI level;
    seed: of every resampling; label_groups: named groups of labels for group-macro metrics ({} = none);
    pairs: which method pairs get a paired comparison besides each fusion method vs the reference
    (`PAIRS`: "findings" = each method vs late fusion, what the findings read; "all" = every pair, work
    quadratic in the methods; "reference" = none); sequential_h: a permutation test stops once that many null
    statistics were as extreme as the observed one (Besag & Clifford; 0 = always all n_permutations).
    """

    n_bootstrap: int = 1000
    n_permutations: int = 10000
    confidence: float = 0.95
    seed: int = 0
    label_groups: Mapping[str, Sequence[str]] = field(default_factory=dict)
    pairs: str = "findings"
    sequential_h: int = 50

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> StatisticsOptions:
        """Validated options from a mapping of some of the fields (the others keep their defaults).

        Raises `OptionError` (key, problem) for an unknown key or a bad value.
        """
        raw = dict(raw or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                raise OptionError(key, f"unknown option; expected one of {', '.join(names)}")
        values: dict[str, Any] = {}
        for key in ("n_bootstrap", "n_permutations", "seed", "sequential_h"):
            if raw.get(key) is not None:
                v, lo = raw[key], 0 if key in ("seed", "sequential_h") else 1
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    raise OptionError(key, f"expected an integer >= {lo}, got {v!r}")
                values[key] = v
        if raw.get("confidence") is not None:
            v = raw["confidence"]
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
                raise OptionError("confidence", f"expected a number in (0, 1), got {v!r}")
            values["confidence"] = float(v)
        if raw.get("pairs") is not None:
            if raw["pairs"] not in PAIRS:
                raise OptionError("pairs", f"expected one of {', '.join(PAIRS)}, got {raw['pairs']!r}")
            values["pairs"] = raw["pairs"]
        groups = raw.get("label_groups")
        if groups is not None and not (isinstance(groups, Mapping) and not groups):  # {} means no groups
            if problem := label_groups_problem(groups):
                raise OptionError("label_groups", problem)
            values["label_groups"] = {str(g): list(dict.fromkeys(v)) for g, v in groups.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["label_groups"] = {g: list(v) for g, v in self.label_groups.items()}
        return out


DEFAULTS = StatisticsOptions()


@dataclass(frozen=True)
class FairnessOptions:
    """Whether the analysis computes fairness tables, and over which attributes: the one place of the defaults
    (a plan's `fairness` section and `carebench analyze` read them from here). `attributes` () = every attribute
    the dataset declares, and has_cxr; named attributes are checked against the dataset's declarations when the
    analysis opens it."""

    enabled: bool = True
    attributes: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> FairnessOptions:
        """Validated options from a mapping of some of the fields (the others keep their defaults); an
        `OptionError` (key, problem) otherwise."""
        raw = dict(raw or {})
        unknown = [k for k in raw if k not in ("enabled", "attributes")]
        if unknown:
            raise OptionError(unknown[0], "unknown option; expected enabled, attributes")
        enabled = raw.get("enabled", cls.enabled)
        if not isinstance(enabled, bool):
            raise OptionError("enabled", f"expected true or false, got {enabled!r}")
        attrs = raw.get("attributes", cls.attributes)
        attrs = [attrs] if isinstance(attrs, str) else attrs
        if attrs is None:
            attrs = ()
        if not isinstance(attrs, list | tuple) or len(set(attrs)) != len(attrs):
            raise OptionError("attributes", f"expected a list of distinct attribute names, got {attrs!r}")
        bad = [a for a in attrs if not isinstance(a, str) or not a or a in RESERVED_ATTRIBUTE_NAMES]
        if bad:
            raise OptionError("attributes", f"{bad[0]!r} is not an attribute name")
        return cls(enabled=enabled, attributes=tuple(attrs))

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "attributes": list(self.attributes)}
