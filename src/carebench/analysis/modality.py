"""Modality contribution and missing-modality robustness of trained runs, as tidy tables.

Why: "does the X-ray help, and what happens when it is missing?" needs the same trained model evaluated on the
same test stays under controlled inputs. The reference toolkit (CareBench) only removed X-rays from
train/validation (its test set kept every image) and had no test-time ablation. Here:

- `RunPredictor` loads a finished run (`training.predict.LoadedRun`: config, checkpoint, fold) and predicts any
  split of its fold under an ablation and/or a test-time X-ray missing rate; predictions have the run record's
  columns (`runs.predictions_frame`), computed by the same code as the validation predictions a run records.
- Ablations (`CONDITIONS`): `full` (inputs as loaded); `drop_cxr`: every stay's X-ray removed exactly as a
  missing one is represented (zero pixels, `has_cxr` false, `cxr_hours` 0); `drop_ehr`: the normalised EHR and
  its observed-mask set to zero for every stay, i.e. every value equals the training median and nothing is marked
  observed: the model sees a stay about which the EHR says nothing beyond the training population's typical
  values. The labels and the stays are unchanged.
- Test-time missingness uses the folds' `cxr_dropout`: for a rate r the round(r x n) X-rays of the test
  stays with the smallest hash(seed, stay_id) are removed, so the choice is deterministic per stay and seed and
  the stays dropped at r are a subset of those dropped at any r' > r (nested curves).
- Evaluation runs in float32 with the model in eval mode (no dropout, batch-norm running statistics). Every
  condition and rate is computed by the same code, so deltas compare like with like.
- Unimodal heads (`p_<name>__<head>` columns, e.g. DrFuse's) are scored from the `full` predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from carebench import runs
from carebench.data.folds import SPLITS, cxr_dropout
from carebench.data.loading import StayDataset, make_loader
from carebench.errors import UserError
from carebench.evaluation.metrics import compute_metrics
from carebench.experiments.plan import DEFAULT_TEST_RATES
from carebench.runs import RunRecord
from carebench.training.predict import LoadedRun, predict_frame

CONDITIONS = ("full", "drop_cxr", "drop_ehr")
_NOT_METRICS = {"n", "n_labels_defined"}


class ModalityError(UserError, ValueError):
    """An unknown ablation condition, a missing-rate outside [0, 1], or a run that cannot be evaluated."""


# ------------------------------------------------------------------------------------------------ ablation
def ablate_batch(batch: dict[str, Tensor], condition: str) -> dict[str, Tensor]:
    """A copy of the batch with one modality removed (module docstring: what `drop_cxr`/`drop_ehr` mean)."""
    if condition not in CONDITIONS:
        raise ModalityError(f"condition: expected one of {CONDITIONS}, got {condition!r}")
    out = dict(batch)
    if condition == "drop_cxr":
        out["cxr"] = torch.zeros_like(batch["cxr"])
        out["has_cxr"] = torch.zeros_like(batch["has_cxr"])
        out["cxr_hours"] = torch.zeros_like(batch["cxr_hours"])
    elif condition == "drop_ehr":
        out["ehr"] = torch.zeros_like(batch["ehr"])
        out["ehr_mask"] = torch.zeros_like(batch["ehr_mask"])
    return out


def _check_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ModalityError(f"X-ray missing rate: expected a number in [0, 1], got {rate!r}")
    return float(rate)


class RunPredictor:
    """A finished run's model, ready to predict its fold's splits under ablations and test-time X-ray dropout.

    The dataset is the one in the run's config unless `data_root` is given; it must have the fingerprint the run
    was trained on. Training statistics (normalisation) and the train/val X-ray dropout are those of the run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        data_root: str | Path | None = None,
        *,
        device: str = "cpu",
        batch_size: int | None = None,
    ) -> None:
        run = LoadedRun(run_dir, data_root, device=device)
        self.run_dir = run.record.path
        self.cfg, self.data, self.fold, self.model = run.cfg, run.data, run.fold, run.model
        self.batch_size = batch_size or self.cfg.batch_size

    @property
    def method(self) -> str:
        return self.cfg.model

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def _split(self, split: str) -> StayDataset:
        if split not in SPLITS:
            raise ModalityError(f"split: expected one of {SPLITS}, got {split!r}")
        return getattr(self.fold, split)

    def dropped(self, rate: float, *, split: str = "test", seed: int | None = None) -> np.ndarray:
        """Boolean mask over the split's stays (dataset order): X-rays removed at missing rate `rate`."""
        ds = self._split(split)
        natural = ds.has_cxr | ds.dropped
        seed = self.cfg.cxr_dropout_seed if seed is None else int(seed)
        return cxr_dropout(ds.stay_ids, natural, _check_rate(rate), seed)

    def predict(
        self,
        *,
        split: str = "test",
        condition: str = "full",
        cxr_missing_rate: float | None = None,
        seed: int | None = None,
    ) -> pd.DataFrame:
        """Predictions of one split (predictions.parquet columns). `cxr_missing_rate` None = the run's own
        dropout rate for that split; a number = that rate of the split's X-rays removed (seeded, nested)."""
        if condition not in CONDITIONS:
            raise ModalityError(f"condition: expected one of {CONDITIONS}, got {condition!r}")
        ds = self._split(split)
        if cxr_missing_rate is not None:
            ds = StayDataset(
                self.data,
                ds.rows,
                self.cfg.task,
                self.fold.stats,
                ds.image_size,
                dropped=self.dropped(cxr_missing_rate, split=split, seed=seed),
                load_cxr=ds.load_cxr,
            )
        loader = make_loader(ds, self.batch_size, shuffle=False)
        return predict_frame(
            self.model,
            loader,
            self.cfg.task,
            names=self.fold.outputs,
            seed=self.cfg.seed,
            transform=lambda b: ablate_batch(b, condition),
        )


# ------------------------------------------------------------------------------------------------ metrics
def prediction_metrics(predictions: pd.DataFrame, task: str, head: str | None = None) -> dict[str, float]:
    """Overall metrics (`metrics.compute_metrics`, scalars only) of a predictions frame or one of its heads."""
    frame = predictions if head is None else runs.head_frame(predictions, head, task)
    y, p, names = runs.prediction_arrays(frame, task)
    out = compute_metrics(task, y, p, names)
    return {k: float(v) for k, v in out.items() if "/" not in k and k not in _NOT_METRICS}


def _long(rows: list[dict], metrics: dict[str, float], reference: dict[str, float] | None) -> None:
    base = rows.pop()
    for metric, value in metrics.items():
        ref = reference.get(metric, np.nan) if reference is not None else np.nan
        rows.append({**base, "metric": metric, "value": value, "delta": value - ref})


def ablation_table(
    predict: Callable[[str], pd.DataFrame],
    task: str,
    *,
    method: str,
    conditions: Sequence[str] = CONDITIONS,
    heads: bool = True,
) -> pd.DataFrame:
    """Test-time modality ablation: one row per (condition, metric) with `delta` = value - value under `full`.

    `predict(condition)` returns the test predictions under that condition (e.g. `RunPredictor.predict`).
    With `heads`, each per-modality head of the full predictions adds rows with condition `head:<name>`.
    Columns: method, condition, n, n_cxr_input (stays given an X-ray), metric, value, delta.
    """
    conditions = list(conditions)
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or "full" not in conditions:
        raise ModalityError(
            f"conditions: expected a subset of {CONDITIONS} that includes 'full', got {conditions}"
        )
    preds = {c: predict(c) for c in conditions}
    full = prediction_metrics(preds["full"], task)
    rows: list[dict] = []
    for c in conditions:
        frame = preds[c]
        if not frame["stay_id"].equals(preds["full"]["stay_id"]):
            raise ModalityError(f"condition {c!r}: predictions are not for the same stays as 'full'")
        rows.append(
            {
                "method": method,
                "condition": c,
                "n": len(frame),
                "n_cxr_input": int(frame["cxr_input"].sum()) if "cxr_input" in frame else -1,
            }
        )
        _long(rows, full if c == "full" else prediction_metrics(frame, task), full)
    for head in runs.prediction_heads(preds["full"]) if heads else []:
        frame = preds["full"]
        rows.append(
            {
                "method": method,
                "condition": f"head:{head}",
                "n": len(frame),
                "n_cxr_input": int(frame["cxr_input"].sum()) if "cxr_input" in frame else -1,
            }
        )
        _long(rows, prediction_metrics(frame, task, head=head), full)
    return pd.DataFrame(rows, columns=["method", "condition", "n", "n_cxr_input", "metric", "value", "delta"])


def missingness_curve(
    predict_at: Callable[[float], pd.DataFrame],
    task: str,
    *,
    method: str,
    rates: Iterable[float] = DEFAULT_TEST_RATES,
) -> pd.DataFrame:
    """Metrics of one trained model as the test-time X-ray missing rate grows.

    `predict_at(rate)` returns the test predictions with that share of the X-rays removed. One row per
    (rate, metric): method, rate, n, n_cxr_input, metric, value, delta (vs the first rate, normally 0).
    """
    rates = [_check_rate(r) for r in rates]
    if not rates or sorted(rates) != rates or len(set(rates)) != len(rates):
        raise ModalityError(f"rates: expected increasing distinct numbers in [0, 1], got {rates}")
    rows: list[dict] = []
    first = None
    for r in rates:
        frame = predict_at(r)
        m = prediction_metrics(frame, task)
        first = m if first is None else first
        rows.append(
            {
                "method": method,
                "rate": r,
                "n": len(frame),
                "n_cxr_input": int(frame["cxr_input"].sum()) if "cxr_input" in frame else -1,
            }
        )
        _long(rows, m, first)
    return pd.DataFrame(rows, columns=["method", "rate", "n", "n_cxr_input", "metric", "value", "delta"])


def natural_missingness(predictions: pd.DataFrame, task: str, *, method: str) -> pd.DataFrame:
    """Metrics of the base cohort's test predictions split by natural X-ray availability (`cxr_input`).

    Rows for subset all / with_cxr / without_cxr (a subset without stays is left out): method, subset, n,
    metric, value, delta (vs all).
    """
    if "cxr_input" not in predictions.columns:
        raise ModalityError("predictions: column 'cxr_input' (X-ray given to the model) is missing")
    has = predictions["cxr_input"].astype(bool)
    everything = prediction_metrics(predictions, task)
    rows: list[dict] = []
    for subset, frame in (
        ("all", predictions),
        ("with_cxr", predictions[has]),
        ("without_cxr", predictions[~has]),
    ):
        if len(frame) == 0:
            continue
        rows.append({"method": method, "subset": subset, "n": len(frame)})
        _long(rows, everything if subset == "all" else prediction_metrics(frame, task), everything)
    return pd.DataFrame(rows, columns=["method", "subset", "n", "metric", "value", "delta"])


# ------------------------------------------------------------------------------------------------ from runs
def run_ablation(
    run_dir: str | Path,
    data_root: str | Path | None = None,
    *,
    device: str = "cpu",
    conditions: Sequence[str] = CONDITIONS,
) -> pd.DataFrame:
    """`ablation_table` of a finished run (test split at the run's own test dropout), with its run_id."""
    pred = RunPredictor(run_dir, data_root, device=device)
    table = ablation_table(
        lambda c: pred.predict(condition=c), pred.cfg.task, method=pred.method, conditions=conditions
    )
    table.insert(1, "run_id", pred.run_id)
    return table


def run_missingness_curve(
    run_dir: str | Path,
    data_root: str | Path | None = None,
    *,
    rates: Iterable[float] = DEFAULT_TEST_RATES,
    seed: int | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """`missingness_curve` of a finished run: test X-rays removed at each rate (seed: the run's dropout seed)."""
    pred = RunPredictor(run_dir, data_root, device=device)
    table = missingness_curve(
        lambda r: pred.predict(cxr_missing_rate=r, seed=seed), pred.cfg.task, method=pred.method, rates=rates
    )
    table.insert(1, "run_id", pred.run_id)
    return table


def dropout_runs_table(records: Iterable[RunRecord]) -> pd.DataFrame:
    """Test metrics of finished runs with their train/val/test X-ray dropout rates, for curves over runs
    trained at different rates (the reference's protocol: train/validate with r% X-rays removed).

    One row per (run, metric): method, run_id, task, cohort, fold, seed, cxr_dropout_train, cxr_dropout_val,
    cxr_dropout_test, metric, value.
    """
    rows = []
    for r in records:
        test = runs.read_metrics(r).get("test", {})
        base = {"method": r.method, "run_id": r.run_id, "task": r.task, "cohort": r.cohort, "fold": r.fold,
                "seed": r.seed, **{f"cxr_dropout_{s}": rate for s, rate in zip(SPLITS, r.dropout, strict=True)}}  # fmt: skip
        for metric, value in test.items():
            if "/" in metric or metric in _NOT_METRICS or not isinstance(value, int | float | type(None)):
                continue
            rows.append({**base, "metric": metric, "value": np.nan if value is None else float(value)})
    cols = ["method", "run_id", "task", "cohort", "fold", "seed", "cxr_dropout_train", "cxr_dropout_val",
            "cxr_dropout_test", "metric", "value"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)
