"""Data files we own (features, phenotypes, race groups) and their typed, validated loaders.

The YAML files next to this module are the single source of truth for what `prepare` extracts and what
`synth` emits; both read them through these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from carebench.errors import UserError
from carebench.tasks import TASKS

AGGREGATIONS = ("mean", "sum", "min", "max", "last")
CONVERSIONS = ("fahrenheit_to_celsius", "fraction_to_percent")
SOURCE_TABLES = ("chartevents", "labevents", "outputevents")


class DefinitionError(UserError, ValueError):
    """A definitions file is malformed; the message names the file, entry and field."""


@dataclass(frozen=True)
class Feature:
    name: str
    unit: str
    itemids: dict[str, tuple[int, ...]]
    valid_range: tuple[float, float]
    aggregation: str
    convert: dict[int, str] = field(default_factory=dict)

    def all_itemids(self) -> tuple[int, ...]:
        return tuple(i for ids in self.itemids.values() for i in ids)


@dataclass(frozen=True)
class FeatureSet:
    hours: int
    features: tuple[Feature, ...]
    source: str

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]


@dataclass(frozen=True)
class Phenotype:
    column: str
    ccs: int
    type: str
    name: str


def _definition_path(filename: str) -> Path:
    return Path(str(resources.files(__package__).joinpath(filename)))


def _load_yaml(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as e:
        raise DefinitionError(f"{path}: file not found") from e
    except yaml.YAMLError as e:
        raise DefinitionError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise DefinitionError(f"{path}: expected a mapping at the top level")
    return data


def load_features(path: str | Path | None = None) -> FeatureSet:
    """Read and validate a features file (default: the packaged features.yaml)."""
    p = Path(path) if path is not None else _definition_path("features.yaml")
    data = _load_yaml(p)
    hours = data.get("hours")
    if not isinstance(hours, int) or hours <= 0:
        raise DefinitionError(f"{p}: 'hours' must be a positive integer, got {hours!r}")
    raw = data.get("features")
    if not isinstance(raw, list) or not raw:
        raise DefinitionError(f"{p}: 'features' must be a non-empty list")
    out: list[Feature] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"{p}: features[{i}]"
        if not isinstance(entry, dict):
            raise DefinitionError(f"{where}: expected a mapping")
        name = entry.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise DefinitionError(f"{where}: 'name' must be an identifier, got {name!r}")
        where = f"{p}: feature '{name}'"
        if name in seen:
            raise DefinitionError(f"{where}: duplicate name")
        seen.add(name)
        itemids = entry.get("itemids")
        if not isinstance(itemids, dict) or not itemids:
            raise DefinitionError(f"{where}: 'itemids' must map a source table to a list of itemids")
        ids: dict[str, tuple[int, ...]] = {}
        for table, lst in itemids.items():
            if table not in SOURCE_TABLES:
                raise DefinitionError(
                    f"{where}: unknown source table {table!r}; expected one of {SOURCE_TABLES}"
                )
            if not isinstance(lst, list) or not lst or not all(isinstance(x, int) for x in lst):
                raise DefinitionError(f"{where}: itemids.{table} must be a non-empty list of integers")
            ids[table] = tuple(lst)
        rng = entry.get("valid_range")
        if not (
            isinstance(rng, list)
            and len(rng) == 2
            and all(isinstance(x, int | float) for x in rng)
            and rng[0] <= rng[1]
        ):
            raise DefinitionError(f"{where}: 'valid_range' must be [low, high] with low <= high, got {rng!r}")
        agg = entry.get("aggregation")
        if agg not in AGGREGATIONS:
            raise DefinitionError(f"{where}: 'aggregation' must be one of {AGGREGATIONS}, got {agg!r}")
        conv = entry.get("convert") or {}
        all_ids = {i for v in ids.values() for i in v}
        for k, v in conv.items():
            if k not in all_ids:
                raise DefinitionError(f"{where}: convert names itemid {k}, which is not among its itemids")
            if v not in CONVERSIONS:
                raise DefinitionError(f"{where}: unknown conversion {v!r}; expected one of {CONVERSIONS}")
        out.append(
            Feature(
                name=name,
                unit=str(entry.get("unit", "")),
                itemids=ids,
                valid_range=(float(rng[0]), float(rng[1])),
                aggregation=agg,
                convert=dict(conv),
            )
        )
    return FeatureSet(hours=hours, features=tuple(out), source=str(p))


@cache
def load_phenotypes() -> tuple[Phenotype, ...]:
    """The 25 benchmark phenotypes, in column order."""
    p = _definition_path("phenotypes.yaml")
    data = _load_yaml(p)
    out = tuple(
        Phenotype(column=e["column"], ccs=int(e["ccs"]), type=e["type"], name=e["name"])
        for e in data["phenotypes"]
    )
    if len(out) != 25 or len({x.column for x in out}) != 25:
        raise DefinitionError(f"{p}: expected 25 distinct phenotypes, found {len(out)}")
    return out


@cache
def _race_rules() -> tuple[str, dict[str, str], list[tuple[str, str]]]:
    data = _load_yaml(_definition_path("race_groups.yaml"))
    exact: dict[str, str] = {}
    prefix: list[tuple[str, str]] = []
    for group, patterns in data["groups"].items():
        for pat in patterns:
            pat = pat.strip().upper()
            if pat.endswith("*"):
                prefix.append((pat[:-1], group))
            else:
                exact[pat] = group
    prefix.sort(key=lambda t: -len(t[0]))
    return data["default"], exact, prefix


def race_group(raw: str | None) -> str:
    """Map a raw MIMIC-IV race string to one of the 5 race groups (unmatched -> OTHER)."""
    default, exact, prefix = _race_rules()
    if raw is None:
        return default
    key = str(raw).strip().upper()
    if key in exact:
        return exact[key]
    for pre, group in prefix:
        if key.startswith(pre):
            return group
    return default


RACE_GROUPS = ("WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO", "ASIAN", "OTHER")
LOS_BINS_DAYS = (
    2,
    3,
    4,
    5,
    6,
    7,
    14,
)  # class k = [LOS_BINS_DAYS[k], LOS_BINS_DAYS[k+1]); class 6 = [14, inf)
LOS_CLASS_NAMES = TASKS["los"].class_names  # the class names are part of the task (carebench.tasks)


# Feature specs for `prepare --meds` shipped with carebench, by the name `--feature-spec` accepts.
MEDS_FEATURE_SPECS = {"mimic-iv": "meds_mimic_iv.yaml"}


def meds_feature_spec(value: str | Path) -> Path:
    """The feature spec a `--feature-spec` value names: a shipped spec (MEDS_FEATURE_SPECS) or a file path."""
    if str(value) in MEDS_FEATURE_SPECS:
        return _definition_path(MEDS_FEATURE_SPECS[str(value)])
    return Path(value)
