"""What the ETL dropped or repaired, counted by reason, and the checks that refuse a silently empty feature group.

Why: real MIMIC-IV copies are partial, re-exported or of another release. A rule that quietly drops rows (a stay
whose out-time precedes its in-time, a lab value without a number) or a table that quietly contributes nothing (a
chart-events file with a header only) yields a dataset that looks fine and is wrong. So:

- `data_issues` lists every row the ETL dropped or changed, one entry per (stage, table, reason) with its count,
  zero counts included (a zero says the check ran). It goes into the manifest (`data_issues`) and `describe`.
  Rows the ETL does not select by design (events of other patients, other itemids, outside the 48 h window) are
  not issues.
- `empty_groups` finds the feature groups (the features read from one source table, and the X-ray) that no cohort
  stay has any value of. `prepare` stops on them unless `--allow-empty-features`, which turns each into a loud
  warning recorded in the manifest.
"""

from __future__ import annotations

from typing import Any

from carebench.data.definitions import FeatureSet
from carebench.data.mimic.timeseries import TimeseriesResult

SOURCE_LABELS = {
    "chartevents": "icu/chartevents",
    "labevents": "hosp/labevents",
    "outputevents": "icu/outputevents",
}
GROUP_NAMES = {"chartevents": "charted vital signs and scores", "labevents": "laboratory values",
               "outputevents": "urine output"}  # fmt: skip


def _issue(stage: str, table: str, reason: str, action: str, rows: int, unit: str = "rows") -> dict[str, Any]:
    return {
        "stage": stage,
        "table": table,
        "reason": reason,
        "action": action,
        "count": int(rows),
        "unit": unit,
    }


def data_issues(
    exclusions: list[dict[str, Any]],
    ts: TimeseriesResult,
    features: FeatureSet,
    labels: dict[str, str],
    pheno_stats: dict[str, Any],
    cxr_stats: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Every dropped or repaired row by reason: cohort exclusions (stays), time-series events, diagnosis rows,
    X-ray metadata rows and images. `labels`: table -> where it was found (`hosp/patients`, `core/patients`)."""
    out = []
    for e in exclusions:
        action = "stay dropped (malformed)" if e["kind"] == "malformed" else "stay excluded (cohort rule)"
        out.append(_issue("cohort", labels.get("icustays", "icu/icustays"), f"{e['reason']}: {e['meaning']}",
                          action, e["stays"], "stays"))  # fmt: skip
    for src, c in ts.sources.items():
        table = labels.get(src, SOURCE_LABELS[src])
        out.append(
            _issue(
                "timeseries", table, "no numeric value (value column empty)", "event dropped", c["no_value"]
            )
        )
        out.append(_issue("timeseries", table, "value outside the feature's valid_range", "event dropped",
                          c["out_of_range"]))  # fmt: skip
    for f in features.features:
        if f.convert:
            tables = "+".join(labels.get(s, SOURCE_LABELS[s]) for s in f.itemids)
            kinds = ", ".join(sorted(set(f.convert.values())))
            out.append(_issue("timeseries", tables, f"{f.name}: {kinds}", "value converted",
                              ts.row_issues.get(f.name, {}).get("converted", 0)))  # fmt: skip
    dx = labels.get("diagnoses_icd", "hosp/diagnoses_icd")
    out.append(
        _issue("phenotypes", dx, "no icd_code", "row dropped", pheno_stats.get("rows_without_code", 0))
    )
    out.append(_issue("phenotypes", dx, "ICD code unknown to the code mapping", "row dropped",
                      pheno_stats.get("unmapped_rows", 0)))  # fmt: skip
    if cxr_stats:
        meta = "mimic-cxr metadata"
        out.append(_issue("cxr", meta, "StudyDate/StudyTime not a valid time", "row dropped",
                          cxr_stats.get("metadata_rows_invalid_time", 0)))  # fmt: skip
        for key, why in (("missing_files", "image file missing"), ("corrupt_files", "image file unreadable")):
            out.append(_issue("cxr", "files/", why, "image skipped (next-latest eligible image used)",
                              cxr_stats.get(key, 0), "images"))  # fmt: skip
    return out


def empty_groups(
    ts: TimeseriesResult,
    features: FeatureSet,
    empty_tables: list[str],
    labels: dict[str, str],
    n_stays: int,
) -> list[str]:
    """One message per source table of which no cohort stay has a single usable value, saying why."""
    messages = []
    for src, c in ts.sources.items():
        if c["kept"]:
            continue
        table = labels.get(src, SOURCE_LABELS[src])
        names = [f.name for f in features.features if src in f.itemids]
        ids = sorted({i for f in features.features for i in f.itemids.get(src, [])})
        shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
        if src in empty_tables:
            why = "the table has a header but no rows"
        elif c["rows_in_window"]:
            why = (f"all {c['rows_in_window']} values of its itemids in the cohort's windows are outside the "
                   "features' valid ranges (another unit?)")  # fmt: skip
        elif c["no_value"]:
            why = f"its {c['no_value']} events of the features' itemids in the cohort's windows have no numeric value"
        else:
            why = (f"no row has one of the features' itemids ({shown}) inside a cohort stay's first "
                   f"{features.hours} h (items renumbered by this release, or events of other patients/stays)")  # fmt: skip
        messages.append(
            f"{table}: feature group '{GROUP_NAMES.get(src, src)}' is empty: none of its {len(names)} features "
            f"({', '.join(names)}) has a value for any of the {n_stays} cohort stays, because {why}"
        )
    return messages


def empty_features(ts: TimeseriesResult, features: FeatureSet) -> list[str]:
    """Features (outside an empty group) that no cohort stay has a value of: a warning each."""
    return [
        f"feature {f.name}: no value in any cohort stay (itemids {f.itemids}); it will be all missing"
        for f in features.features
        if ts.stats[f.name]["stays_observed"] == 0
        and any(ts.sources.get(s, {}).get("kept") for s in f.itemids)
    ]
