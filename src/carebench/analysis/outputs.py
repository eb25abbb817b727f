"""What `carebench analyze` writes and `carebench report` reads: RUNS/analysis/ (torch-free).

`RUNS/analysis/` holds every table of `TABLES` as `<name>.parquet` and `<name>.csv`, and `summary.json` (options,
groups, warnings, timings). It is written atomically (a temporary directory renamed into place), so a report never
reads a half-written analysis. docs/report.md lists every table and column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carebench.analysis.options import AnalysisError
from carebench.data.store import atomic_output_dir

ANALYSIS_DIR = "analysis"
SUMMARY = "summary.json"
TABLES = (
    "runs",
    "cohort_overview",
    "cohort_steps",
    "cohort_folds",
    "cohort_labels",
    "leaderboard",
    "comparisons",
    "fairness_groups",
    "fairness_summary",
    "fairness_thresholds",
    "missingness_natural",
    "missingness_test",
    "missingness_train",
    "dropout_runs",
    "ablation",
    "findings",
    "tuning",
)


def write_analysis(out: Path, tables: dict[str, pd.DataFrame], summary: dict[str, Any]) -> Path:
    """Every table as `<name>.parquet` and `<name>.csv`, and summary.json, into `out` (replaced atomically)."""
    with atomic_output_dir(out, overwrite=True) as tmp:
        for name, df in tables.items():
            df = df.copy()
            df.attrs = {}
            df.to_parquet(tmp / f"{name}.parquet", index=False)
            df.to_csv(tmp / f"{name}.csv", index=False)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def load_analysis(runs_dir: str | Path) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The tables and summary written by `analyze` (an error naming the command when they are missing)."""
    path = Path(runs_dir) / ANALYSIS_DIR
    if not (path / SUMMARY).is_file():
        raise AnalysisError(f"{path}: no analysis found; run `carebench analyze {runs_dir}` first")
    again = f"re-run `carebench analyze {runs_dir}`"
    try:
        summary = json.loads((path / SUMMARY).read_text())
    except (OSError, ValueError) as e:
        raise AnalysisError(f"{path / SUMMARY}: unreadable ({_first_line(e)}); {again}") from None
    if not isinstance(summary, dict):
        raise AnalysisError(f"{path / SUMMARY}: expected a JSON object; {again}")
    tables = {}
    for name in TABLES:
        f = path / f"{name}.parquet"
        if not f.is_file():
            raise AnalysisError(f"{f}: missing ({again})")
        try:
            tables[name] = pd.read_parquet(f)
        except Exception as e:  # a truncated or overwritten file (ArrowInvalid, OSError, ...)
            raise AnalysisError(f"{f}: unreadable ({_first_line(e)}); {again}") from None
    return tables, summary


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
