"""The feature spec of `prepare --meds`: which MEDS codes become which hourly features, and which static codes
become the cohort's demographics and fairness attributes. A YAML file (docs/dataset.md, "MEDS"):

    version: 1
    hours: 48              # the EHR window: this many hours up to the prediction time
    step_hours: 1          # width of one grid step; hours / step_hours steps
    features:
      - name: heart_rate   # column of the feature axis, in this order
        unit: bpm          # recorded in the manifest
        codes:             # matchers: a plain string is an exact code
          - "HR"
          - {prefix: "VITALS//HR//"}
          - {regex: "^TEMP//F$", convert: fahrenheit_to_celsius}
        valid_range: [1, 300]   # optional; values outside (after conversion) are dropped and counted
        aggregation: mean       # mean | sum | min | max | last, over the events of one step
    age: {birth_code: MEDS_BIRTH}          # optional: cohort column `age`, whole years at the prediction time
    attributes:                            # optional: cohort columns from (static or latest) codes
      gender: {codes: {"GENDER//F": F, "GENDER//M": M}}
      ethnicity: {prefix: "ETHNICITY//"}   # the value is the rest of the code
    fairness: [gender, ethnicity]          # optional: the attributes the fairness analysis groups by

Why matchers: a MEDS code often carries its unit or a modifier (`LAB//<item>//mg/dL`), so one measurement is
several codes; a prefix or a regular expression (searched, as ACES does; anchor it with ^...$) names them all.
A code matched by two features is an error (the spec is ambiguous); a matcher that matches no code of the data is
a warning in the manifest (a spec written for a whole database may name codes a subset lacks).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carebench.errors import UserError

AGGREGATIONS = ("mean", "sum", "min", "max", "last")
NAMED_CONVERSIONS = {
    "fahrenheit_to_celsius": "(x - 32) * 5/9",
    "fraction_to_percent": "x * 100 when x <= 1, else x",
}
MATCH_KINDS = ("code", "prefix", "regex")


class SpecError(UserError, ValueError):
    """The feature spec is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class Conversion:
    """A unit conversion applied to a matched event's value before the range check: a named one
    (NAMED_CONVERSIONS) or the linear `x * multiply + add`."""

    name: str = "none"  # none | fahrenheit_to_celsius | fraction_to_percent | linear
    multiply: float = 1.0
    add: float = 0.0

    def describe(self) -> str:
        if self.name == "linear":
            return f"x * {self.multiply:g} + {self.add:g}"
        return self.name


NO_CONVERSION = Conversion()


@dataclass(frozen=True)
class Matcher:
    kind: str  # code | prefix | regex
    pattern: str
    conversion: Conversion = NO_CONVERSION

    def matches(self, code: str) -> bool:
        if self.kind == "code":
            return code == self.pattern
        if self.kind == "prefix":
            return code.startswith(self.pattern)
        return re.search(self.pattern, code) is not None

    def describe(self) -> str:
        return f"{self.kind} {self.pattern!r}"


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    unit: str
    matchers: tuple[Matcher, ...]
    aggregation: str
    valid_range: tuple[float, float] | None


@dataclass(frozen=True)
class AttributeSpec:
    """A cohort column read from codes: `codes` maps whole codes to values, or `prefix` keeps the rest of the
    code. The value of a row is the one of the subject's last matching event at or before the prediction time
    (static events, without a time, count as the earliest)."""

    name: str
    codes: dict[str, str] = field(default_factory=dict)
    prefix: str | None = None

    def value(self, code: str) -> str | None:
        if self.prefix is not None:
            return code[len(self.prefix) :] if code.startswith(self.prefix) else None
        return self.codes.get(code)


@dataclass(frozen=True)
class MedsSpec:
    source: str
    hours: int
    step_hours: int
    features: tuple[FeatureSpec, ...]
    birth_code: str | None
    attributes: tuple[AttributeSpec, ...]
    fairness: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def steps(self) -> int:
        return self.hours // self.step_hours


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _conversion(raw: Any, where: str) -> Conversion:
    if raw is None:
        return NO_CONVERSION
    if isinstance(raw, str):
        if raw not in NAMED_CONVERSIONS:
            raise SpecError(
                f"{where}: unknown conversion {raw!r}; expected one of {', '.join(NAMED_CONVERSIONS)} "
                f"or {{multiply: a, add: b}}"
            )
        return Conversion(raw)
    if isinstance(raw, dict) and raw and set(raw) <= {"multiply", "add"}:
        mul, add = raw.get("multiply", 1.0), raw.get("add", 0.0)
        if not (_number(mul) and _number(add)):
            raise SpecError(f"{where}: convert multiply/add must be finite numbers, got {raw!r}")
        return Conversion("linear", float(mul), float(add))
    raise SpecError(
        f"{where}: convert must be one of {', '.join(NAMED_CONVERSIONS)} or {{multiply: a, add: b}}, got {raw!r}"
    )


def _matcher(raw: Any, where: str) -> Matcher:
    if isinstance(raw, str) and raw:
        return Matcher("code", raw)
    if not isinstance(raw, dict):
        raise SpecError(
            f"{where}: expected a code string or a mapping with one of {MATCH_KINDS}, got {raw!r}"
        )
    kinds = [k for k in MATCH_KINDS if k in raw]
    extra = sorted(set(raw) - set(MATCH_KINDS) - {"convert"})
    if len(kinds) != 1 or extra:
        raise SpecError(
            f"{where}: expected exactly one of {', '.join(MATCH_KINDS)} (and optionally convert), got "
            f"keys {sorted(raw)}"
        )
    kind = kinds[0]
    pattern = raw[kind]
    if not isinstance(pattern, str) or not pattern:
        raise SpecError(f"{where}: {kind} must be a non-empty string, got {pattern!r}")
    if kind == "regex":
        try:
            re.compile(pattern)
        except re.error as e:
            raise SpecError(f"{where}: regex {pattern!r} does not compile ({e})") from e
    return Matcher(kind, pattern, _conversion(raw.get("convert"), where))


def _feature(entry: Any, i: int, path: Path) -> FeatureSpec:
    where = f"{path}: features[{i}]"
    if not isinstance(entry, dict):
        raise SpecError(f"{where}: expected a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"{where}: 'name' must be an identifier, got {name!r}")
    where = f"{path}: feature '{name}'"
    unknown = sorted(set(entry) - {"name", "unit", "codes", "aggregation", "valid_range"})
    if unknown:
        raise SpecError(
            f"{where}: unknown keys {unknown} (expected name, unit, codes, aggregation, valid_range)"
        )
    codes = entry.get("codes")
    if not isinstance(codes, list) or not codes:
        raise SpecError(f"{where}: 'codes' must be a non-empty list of matchers")
    matchers = tuple(_matcher(c, f"{where}: codes[{k}]") for k, c in enumerate(codes))
    agg = entry.get("aggregation", "mean")
    if agg not in AGGREGATIONS:
        raise SpecError(f"{where}: 'aggregation' must be one of {AGGREGATIONS}, got {agg!r}")
    rng = entry.get("valid_range")
    if rng is not None:
        if not (
            isinstance(rng, list) and len(rng) == 2 and all(_number(x) for x in rng) and rng[0] <= rng[1]
        ):
            raise SpecError(f"{where}: 'valid_range' must be [low, high] with low <= high, got {rng!r}")
        rng = (float(rng[0]), float(rng[1]))
    return FeatureSpec(name, str(entry.get("unit", "")), matchers, agg, rng)


def _attribute(name: Any, raw: Any, path: Path) -> AttributeSpec:
    where = f"{path}: attributes.{name}"
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"{path}: attribute names must be identifiers, got {name!r}")
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in ("codes", "prefix"):
        raise SpecError(f"{where}: expected {{codes: {{CODE: value, ...}}}} or {{prefix: 'PREFIX//'}}")
    if "prefix" in raw:
        if not isinstance(raw["prefix"], str) or not raw["prefix"]:
            raise SpecError(f"{where}: prefix must be a non-empty string")
        return AttributeSpec(name, prefix=raw["prefix"])
    codes = raw["codes"]
    if not isinstance(codes, dict) or not codes or not all(isinstance(k, str) for k in codes):
        raise SpecError(f"{where}: codes must map code strings to values")
    return AttributeSpec(name, codes={k: str(v) for k, v in codes.items()})


# cohort columns every dataset has (or the MEDS producer adds); an attribute may not take their name
RESERVED_COLUMNS = (
    "stay_id",
    "subject_id",
    "fold",
    "has_cxr",
    "cxr_index",
    "cxr_hours",
    "cxr_time",
    "cxr_path",
    "prediction_time",
    "age",
    "split",
)


def load_spec(path: str | Path) -> MedsSpec:
    """Read and validate a MEDS feature spec."""
    p = Path(path)
    try:
        with open(p) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as e:
        raise SpecError(f"--feature-spec {p}: file not found (expected a YAML feature spec)") from e
    except IsADirectoryError as e:
        raise SpecError(f"--feature-spec {p}: is a directory (expected a YAML feature spec)") from e
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise SpecError(f"{p}: expected a mapping at the top level")
    unknown = sorted(
        set(data) - {"version", "hours", "step_hours", "features", "age", "attributes", "fairness"}
    )
    if unknown:
        raise SpecError(
            f"{p}: unknown top-level keys {unknown} (expected version, hours, step_hours, features, age, "
            f"attributes, fairness)"
        )
    if data.get("version", 1) != 1:
        raise SpecError(f"{p}: version {data.get('version')!r}, this carebench reads version 1")
    hours, step = data.get("hours"), data.get("step_hours", 1)
    if not isinstance(hours, int) or isinstance(hours, bool) or hours <= 0:
        raise SpecError(f"{p}: 'hours' must be a positive integer, got {hours!r}")
    if not isinstance(step, int) or isinstance(step, bool) or step <= 0 or hours % step:
        raise SpecError(
            f"{p}: 'step_hours' must be a positive integer dividing hours ({hours}), got {step!r}"
        )
    raw = data.get("features")
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{p}: 'features' must be a non-empty list")
    features = tuple(_feature(e, i, p) for i, e in enumerate(raw))
    dup = sorted({f.name for f in features if [g.name for g in features].count(f.name) > 1})
    if dup:
        raise SpecError(f"{p}: duplicate feature names {dup}")
    birth = None
    if data.get("age") is not None:
        age = data["age"]
        if not isinstance(age, dict) or set(age) != {"birth_code"} or not isinstance(age["birth_code"], str):
            raise SpecError(f"{p}: 'age' must be {{birth_code: CODE}} (e.g. MEDS_BIRTH), got {age!r}")
        birth = age["birth_code"]
    raw_attrs = data.get("attributes") or {}
    if not isinstance(raw_attrs, dict):
        raise SpecError(f"{p}: 'attributes' must map attribute names to {{codes: ...}} or {{prefix: ...}}")
    attrs = tuple(_attribute(k, v, p) for k, v in raw_attrs.items())
    for a in attrs:
        if a.name in RESERVED_COLUMNS or a.name.startswith("label_"):
            raise SpecError(f"{p}: attribute name {a.name!r} is reserved for a cohort column of its own")
    fairness = data.get("fairness") or []
    if not isinstance(fairness, list) or not all(isinstance(x, str) for x in fairness):
        raise SpecError(f"{p}: 'fairness' must be a list of attribute names")
    known = {a.name for a in attrs}
    missing = [x for x in fairness if x not in known]
    if missing:
        raise SpecError(
            f"{p}: fairness names {missing}, which are not declared under attributes "
            f"(declared: {', '.join(sorted(known)) or 'none'})"
        )
    return MedsSpec(
        source=str(p.absolute()),
        hours=hours,
        step_hours=step,
        features=features,
        birth_code=birth,
        attributes=attrs,
        fairness=tuple(fairness),
    )
