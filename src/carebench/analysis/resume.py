"""Finished pieces of an `analyze` that was stopped, so that running it again redoes only the rest.

Why: at the paper's size the analysis is hours of arithmetic (docs/performance.md); a kill, a lost node or a full
disk should not cost the pieces already finished. Three kinds of piece are kept, the long ones: the statistics of
one (task, cohort) group (leaderboard, comparisons, natural missingness), the fairness of one run, and the
missing-X-ray curves and ablations of one group (its checkpoints' forward passes; kept as rows).

Each piece is stored under `RUNS/.analyze-pieces/<key>/` as parquet tables and a `meta.json`, written to a
temporary folder and renamed into place, so a piece is either whole or absent. Its key is a hash of everything its
result depends on: the carebench version, the dataset's fingerprint, the piece's options and, for each run it
reads, the run id, its finish marker (`runs.finish_stamp`) and the size and modification time of its prediction files. A changed
option or a retrained run therefore gives another key and the piece is computed again; nothing stale is reused.
The folder is removed once an analysis has been written completely. Tables are read back exactly (parquet keeps
dtypes and index; tested by comparing a resumed analysis with an uninterrupted one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from carebench import __version__, runs
from carebench.runs import RunRecord

WORK_DIR = ".analyze-pieces"
META = "meta.json"


def run_identity(r: RunRecord) -> list[Any]:
    """What identifies a run's results: its id, its finish marker and its prediction files' sizes and times."""
    ident: list[Any] = [r.run_id, runs.finish_stamp(r.path)]
    for name in (runs.PREDICTIONS, runs.VAL_PREDICTIONS):
        try:
            st = (r.path / name).stat()
            ident.append([name, st.st_size, st.st_mtime_ns])
        except OSError:
            ident.append([name, None])
    return ident


class WorkCache:
    """The finished pieces of analyses of one runs directory (`root` None: nothing is kept)."""

    def __init__(self, root: Path | None, context: Mapping[str, Any]) -> None:
        self.root = root
        self._salt = json.dumps({"carebench": __version__, **context}, sort_keys=True, default=str)
        self.reused = 0
        self.failed: str | None = (
            None  # why pieces could not be kept (e.g. a full disk); the analysis goes on
        )

    def key(self, kind: str, options: Mapping[str, Any], records: Iterable[RunRecord]) -> str:
        text = json.dumps(
            [self._salt, kind, options, [run_identity(r) for r in records]], sort_keys=True, default=str
        )
        return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"

    def get(self, key: str) -> tuple[dict[str, pd.DataFrame], dict[str, Any]] | None:
        """The tables and meta of a finished piece, or None."""
        if self.root is None:
            return None
        d = self.root / key
        try:
            meta = json.loads((d / META).read_text())
            tables = {name: pd.read_parquet(d / f"{name}.parquet") for name in meta["tables"]}
        except Exception:  # absent, or damaged by hand: computed again
            return None
        self.reused += 1
        return tables, meta["meta"]

    def put(self, key: str, tables: Mapping[str, pd.DataFrame], meta: Mapping[str, Any]) -> None:
        """Keep a finished piece (whole or not at all). A failed write only loses the piece, never the analysis."""
        if self.root is None or self.failed:
            return
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=self.root))
            for name, df in tables.items():
                df = df.copy()
                df.attrs = {}
                df.to_parquet(tmp / f"{name}.parquet")
            (tmp / META).write_text(json.dumps({"tables": list(tables), "meta": dict(meta)}))
            os.replace(tmp, self.root / key)
            tmp = None
        except OSError as e:
            if (self.root / key / META).is_file():  # another analysis of the same runs kept it first
                return
            self.failed = f"finished pieces are not kept for resuming ({self.root}: {e.strerror or e})"
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if self.failed:
                with contextlib.suppress(OSError):
                    self.root.rmdir()  # only when empty: nothing of a cache that could not be written

    def clear(self) -> None:
        """Remove every kept piece (after a complete analysis has been written)."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
