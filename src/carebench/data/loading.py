"""Processed dataset -> batches of tensors (docs/architecture.md, "Batch"): folds, normalisation, X-ray handling, dropout.

Why each rule (docs/training.md has the full description):
- Normalisation statistics come from the training split of the fold only, so nothing about the validation or
  test stays leaks into the inputs. The raw hourly values are kept on disk; scaling happens here, per batch.
- Imputation follows the reference toolkit: forward fill within the stay, then the training median for hours
  before the first observation. Robust scaling (x - median) / IQR, with guards: IQR = 0 -> the standard
  deviation; that also 0 (or undefined) -> 1. A feature never observed in training gets median 0, scale 1.
- The observed-mask is returned as its own tensor (`ehr_mask`, 1 = observed) so every encoder can append it as
  extra input channels.
- Demographics (`static`: age z-scored with the training split's mean and std, gender_male 0/1) for methods that
  join them at the head (UMSE); the age statistics come from the training stays only, like the EHR statistics.
- X-rays are read from the uint8 cache, resized on the fly with one batched `F.interpolate` to the run's image
  size and normalised; a missing (or dropped) X-ray is all zeros with `has_cxr = False` and `cxr_hours = 0`.
- Train-time augmentation (`augment_cxr`) runs on the batched tensor of the present images, inside the loader
  (`StayDataset.augmented`), so with `num_workers > 0` worker processes augment the next batches while the
  training step runs. Each batch draws from its own generator, seeded by (seed, the batch's positions in order):
  the same batch gets the same augmentation whichever process builds it and however many workers there are.
- Controlled X-ray dropout removes an exact number of X-rays per split, chosen from a per-stay hash of
  (seed, stay_id), so it is deterministic per stay and nested across rates.
- Batches are built from index lists (`Dataset.__getitems__`) by slicing the memory-mapped arrays: no
  per-item Python loop and no DataFrame access in the hot path.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from carebench.data.folds import SPLITS, LoadingError, cxr_dropout, split_rows
from carebench.data.store import DatasetError, ProcessedDataset

# ImageNet statistics averaged over the three channels: our images are single-channel grayscale.
CXR_MEAN = (0.485 + 0.456 + 0.406) / 3
CXR_STD = (0.229 + 0.224 + 0.225) / 3
# Reference augmentation (torchvision RandomAffine(degrees=45, scale=(0.85, 1.15), translate=(0.15, 0.15))).
AUG_DEGREES = 45.0
AUG_SCALE = (0.85, 1.15)
AUG_TRANSLATE = 0.15


# -------------------------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class NormStats:
    """Per-feature statistics of the training split: the imputation value and the robust scaling."""

    median: np.ndarray  # [F] float64, fill value for hours before the first observation
    iqr: np.ndarray  # [F] q75 - q25 of the observed training values (NaN if never observed)
    std: np.ndarray  # [F] sample standard deviation (ddof=1)
    scale: np.ndarray  # [F] divisor actually used: IQR, else std, else 1
    n_observed: np.ndarray  # [F] int64, observed training values
    # Age of the training stays (for the `static` key); NaN until `build_fold` fills them (`compute_age_stats`).
    age_mean: float = math.nan
    age_std: float = math.nan  # sample std (ddof=1); 1 when it is 0 or undefined

    def to_dict(self, names: list[str]) -> dict[str, dict[str, float]]:
        return {
            n: {
                "median": float(self.median[i]),
                "iqr": float(self.iqr[i]),
                "std": float(self.std[i]),
                "scale": float(self.scale[i]),
                "n_observed": int(self.n_observed[i]),
            }
            for i, n in enumerate(names)
        }


def compute_norm_stats(ehr: np.ndarray, rows: np.ndarray, chunk: int = 2048) -> NormStats:
    """Median, IQR and std of every observed value (all hours) of the stays `rows`, per feature.

    Reads the (memory-mapped) array in chunks of stays so memory stays bounded by the observed values.
    Quantiles use linear interpolation (numpy's and pandas' default).
    """
    n_feat = ehr.shape[2]
    rows = np.sort(np.asarray(rows))
    parts: list[list[np.ndarray]] = [[] for _ in range(n_feat)]
    for start in range(0, len(rows), chunk):
        block = np.asarray(ehr[rows[start : start + chunk]], dtype=np.float64).reshape(-1, n_feat)
        for f in range(n_feat):
            col = block[:, f]
            parts[f].append(col[~np.isnan(col)])
    median = np.full(n_feat, np.nan)
    iqr = np.full(n_feat, np.nan)
    std = np.full(n_feat, np.nan)
    count = np.zeros(n_feat, dtype=np.int64)
    for f in range(n_feat):
        vals = np.concatenate(parts[f]) if parts[f] else np.empty(0)
        count[f] = len(vals)
        if len(vals):
            q25, q50, q75 = np.percentile(vals, [25, 50, 75])
            median[f], iqr[f] = q50, q75 - q25
            std[f] = vals.std(ddof=1) if len(vals) > 1 else np.nan
    scale = np.where(iqr > 0, iqr, np.where(np.isfinite(std) & (std > 0), std, 1.0))
    scale = np.where(np.isnan(iqr), 1.0, scale)
    return NormStats(
        median=np.where(np.isnan(median), 0.0, median), iqr=iqr, std=std, scale=scale, n_observed=count
    )


STATIC_COLUMNS = ("age", "gender")


def compute_age_stats(cohort: Any, rows: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of `age` over the stays `rows` (the training split).

    Guards as for the EHR scale: a std of 0 or undefined (fewer than two ages) becomes 1; no age at all gives mean 0.
    A cohort without an `age` column gives (NaN, NaN): its batches have no `static` key.
    """
    if "age" not in cohort.columns:
        return math.nan, math.nan
    age = cohort["age"].to_numpy().astype(np.float64)[np.asarray(rows, dtype=np.int64)]
    age = age[~np.isnan(age)]
    mean = float(age.mean()) if len(age) else 0.0
    std = float(age.std(ddof=1)) if len(age) > 1 else math.nan
    return mean, std if np.isfinite(std) and std > 0 else 1.0


def static_features(cohort: Any, rows: np.ndarray, stats: NormStats) -> np.ndarray | None:
    """``[len(rows), 2]`` float32: (age z-scored with the training statistics, gender_male 0/1), or None when the
    cohort has no `age` or `gender` column (a dataset without demographics; only a method that reads them fails,
    naming the columns).

    A missing age becomes 0 (the training mean). Gender must be "M" or "F" (MIMIC-IV's coding); anything else is
    an error rather than a silent guess.
    """
    if any(c not in cohort.columns for c in STATIC_COLUMNS):
        return None
    if not (np.isfinite(stats.age_mean) and np.isfinite(stats.age_std)):
        raise LoadingError(
            "normalisation statistics have no age mean/std: build the datasets with build_fold"
        )
    rows = np.asarray(rows, dtype=np.int64)
    age = cohort["age"].to_numpy().astype(np.float64)[rows]
    gender = cohort["gender"].to_numpy()[rows]
    bad = sorted({str(g) for g in gender if g not in ("M", "F")})
    if bad:
        raise LoadingError(f"cohort.parquet: column 'gender' must be 'M' or 'F', found {bad[:5]}")
    z = np.nan_to_num((age - stats.age_mean) / stats.age_std, nan=0.0)
    return np.stack([z, (gender == "M").astype(np.float64)], axis=1).astype(np.float32)


def forward_fill(x: np.ndarray) -> np.ndarray:
    """Carry the last observed value forward along axis 1 (hours) of [B, T, F]; leading NaNs stay NaN."""
    t = x.shape[1]
    idx = np.where(np.isnan(x), -1, np.arange(t)[None, :, None])
    np.maximum.accumulate(idx, axis=1, out=idx)
    filled = np.take_along_axis(x, np.maximum(idx, 0), axis=1)
    return np.where(idx >= 0, filled, np.nan)


def impute_and_scale(raw: np.ndarray, stats: NormStats) -> tuple[np.ndarray, np.ndarray]:
    """Raw [B, T, F] with NaN -> (normalised and imputed float32 values, observed mask float32)."""
    raw = np.asarray(raw, dtype=np.float64)
    mask = ~np.isnan(raw)
    filled = forward_fill(raw)
    filled = np.where(np.isnan(filled), stats.median[None, None, :], filled)
    values = (filled - stats.median[None, None, :]) / stats.scale[None, None, :]
    return values.astype(np.float32), mask.astype(np.float32)


# ------------------------------------------------------------------------------------------------- images
def resize_cxr(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 1, S, S] -> [B, 1, size, size]; bilinear with antialiasing when shrinking.

    Accepts uint8 (the cache's dtype: torch's uint8 kernel is about twice as fast as float and the result
    differs by at most one grey level) or float."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1]
    )


def normalise_cxr(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - CXR_MEAN) / CXR_STD


def augment_cxr(
    cxr: torch.Tensor,
    has_cxr: torch.Tensor,
    *,
    degrees: float = AUG_DEGREES,
    scale: tuple[float, float] = AUG_SCALE,
    translate: float = AUG_TRANSLATE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random affine transform of a normalised batch [B, 1, S, S], one draw per image, on its device.

    Rotation uniform in ±degrees, isotropic scale uniform in `scale`, translation uniform in ±translate of the
    image size along each axis (as torchvision's RandomAffine). Pixels moved in from outside are black (the
    normalised value of intensity 0, as the reference fills before normalising). Missing images stay zero.
    """
    b = cxr.shape[0]
    if b == 0:
        return cxr
    dev, dt = cxr.device, torch.float32
    u = torch.rand(b, 4, generator=generator, device=dev, dtype=dt)
    angle = (u[:, 0] * 2 - 1) * math.radians(degrees)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    t = (u[:, 2:] * 2 - 1) * translate * 2  # grid coordinates span [-1, 1]: a fraction f is 2f
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output = A @ input + t with A = s R; grid_sample needs the inverse map input = A^-1 (output - t).
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / s[:, None, None]
    theta = torch.cat([inv, -(inv @ t[:, :, None])], dim=2)
    grid = F.affine_grid(theta, list(cxr.shape), align_corners=False)
    black = normalise_cxr(torch.tensor(0.0))
    out = (
        F.grid_sample(cxr.float() - black, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        + black
    )
    keep = has_cxr.to(dev).bool()[:, None, None, None]
    return torch.where(keep, out, torch.zeros_like(out)).to(cxr.dtype)


# ------------------------------------------------------------------------------------------------ dataset
class StayDataset(Dataset):
    """The stays of one split. `__getitems__(positions)` returns a whole batch dict (docs/architecture.md, "Batch").

    Use with `make_loader` (or any DataLoader whose collate_fn is `collate_batch`): the loader's sampler hands a
    list of positions to `__getitems__`, which slices the memory-mapped arrays once per batch.
    """

    def __init__(
        self,
        data: ProcessedDataset,
        rows: np.ndarray,
        task: str,
        stats: NormStats,
        image_size: int,
        dropped: np.ndarray | None = None,
        load_cxr: bool = True,
    ) -> None:
        self.data = data
        self.rows = np.asarray(rows, dtype=np.int64)
        self.task = task
        self.stats = stats
        self.image_size = int(image_size)
        cohort = data.cohort
        self.stay_ids = cohort["stay_id"].to_numpy(dtype=np.int64)[self.rows]
        declared = _declared(data, task)
        spec = declared.spec
        labels = cohort[list(declared.labels)].to_numpy(dtype=np.float64)[self.rows]
        if spec.kind == "multiclass":
            k = spec.num_outputs
            if len(labels) and (np.isnan(labels).any() or labels.min() < 0 or labels.max() > k - 1):
                raise LoadingError(
                    f"cohort.parquet: column {declared.labels[0]!r} (task {task!r}) must be a class 0..{k - 1}"
                )
            self.labels = labels[:, 0].astype(np.int64)
        else:
            self.labels = labels.astype(np.float32)
        has = cohort["has_cxr"].to_numpy(dtype=bool)[self.rows]
        if data.cxr is None:
            has = np.zeros_like(has)
        self.dropped = np.zeros(len(self.rows), bool) if dropped is None else np.asarray(dropped, bool)
        self.has_cxr = has & ~self.dropped
        self.cxr_index = cohort["cxr_index"].to_numpy(dtype=np.int64)[self.rows]
        if data.cxr is not None and (self.cxr_index[has] < 0).any():
            raise LoadingError(f"{data.root}/cohort.parquet: stays with has_cxr = True need cxr_index >= 0")
        hours = cohort["cxr_hours"].to_numpy(dtype=np.float64)[self.rows]
        self.cxr_hours = np.where(self.has_cxr, np.nan_to_num(hours), 0.0).astype(np.float32)
        self.load_cxr = load_cxr and data.cxr is not None
        self.static = static_features(cohort, self.rows, stats)
        self.augment_seed: int | None = None  # set on the training split's copy by `augmented`

    def augmented(self, seed: int) -> StayDataset:
        """This split with train-time X-ray augmentation (`augment_cxr`) applied to every batch it builds.

        A shallow copy (the arrays are shared). The augmentation of a batch is drawn from a generator seeded by
        (`seed`, the batch's positions in order), so it does not depend on the process or worker that builds it.
        """
        out = copy.copy(self)
        out.augment_seed = int(seed)
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, pos: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([pos])

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        pos = np.asarray(positions, dtype=np.int64)
        rows = self.rows[pos]
        values, mask = impute_and_scale(self.data.ehr[rows], self.stats)
        has = self.has_cxr[pos]
        cxr = torch.zeros(len(pos), 1, self.image_size, self.image_size)
        if self.load_cxr and has.any():
            imgs = torch.from_numpy(np.asarray(self.data.cxr[self.cxr_index[pos[has]]]))
            imgs = normalise_cxr(resize_cxr(imgs[:, None], self.image_size).float() / 255.0)
            if self.augment_seed is not None:
                entropy = np.random.SeedSequence([self.augment_seed, *pos.tolist()]).generate_state(2)
                gen = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
                imgs = augment_cxr(imgs, torch.ones(len(imgs), dtype=torch.bool), generator=gen)
            cxr[torch.from_numpy(has)] = imgs
        batch = {
            "ehr": torch.from_numpy(values),
            "ehr_mask": torch.from_numpy(mask),
            "cxr": cxr,
            "has_cxr": torch.from_numpy(has.copy()),
            "cxr_hours": torch.from_numpy(self.cxr_hours[pos]),
            "y": torch.from_numpy(self.labels[pos]),
            "stay_id": torch.from_numpy(self.stay_ids[pos]),
        }
        if self.static is not None:  # a cohort without age/gender has no demographics
            batch["static"] = torch.from_numpy(self.static[pos])
        return batch


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dataset already returns the whole batch; collation is the identity (module level: picklable)."""
    return batch


def make_loader(
    ds: StayDataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over index lists; shuffling uses its own generator seeded from `seed`. `pin_memory` (for a GPU)
    puts batches in page-locked memory so the copy to the device is asynchronous."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last and len(ds) > batch_size,
        collate_fn=collate_batch,
        num_workers=num_workers,
        generator=gen,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


# ------------------------------------------------------------------------------------------------- a fold
def _declared(data: ProcessedDataset, task: str):
    """The dataset's declaration of `task` (a `LoadingError` naming the declared tasks otherwise)."""
    try:
        return data.task(task)
    except DatasetError as e:
        raise LoadingError(str(e)) from None


@dataclass
class FoldData:
    """The datasets of one fold plus what a run records about them.

    `test` is None when the fold was built without its test split (`build_fold(splits=("train", "val"))`, as a
    tuning study does): such a fold holds no test stay at all, and asking for it is an error (`split`).
    """

    train: StayDataset
    val: StayDataset | None
    test: StayDataset | None
    stats: NormStats
    features: list[str]
    outputs: list[str]  # the task's output names (prediction columns p_<name>)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this fold holds."""
        return tuple(s for s in SPLITS if getattr(self, s) is not None)

    def split(self, name: str) -> StayDataset:
        """The dataset of split `name`; an error when the fold was built without it."""
        ds = getattr(self, name, None) if name in SPLITS else None
        if ds is None:
            raise LoadingError(f"this fold was built without its {name!r} split (it holds {self.splits})")
        return ds

    def summary(self) -> dict[str, Any]:
        out = {}
        for name in self.splits:
            ds = self.split(name)
            out[name] = {
                "n_stays": len(ds),
                "n_with_cxr": int(ds.has_cxr.sum()),
                "n_cxr_dropped": int(ds.dropped.sum()),
            }
        return out


def build_fold(
    data: ProcessedDataset,
    *,
    task: str,
    fold: int,
    cohort: str = "base",
    image_size: int = 224,
    cxr_dropout_rates: dict[str, float] | None = None,
    cxr_dropout_seed: int = 0,
    load_cxr: bool = True,
    splits: tuple[str, ...] = SPLITS,
) -> FoldData:
    """Split a processed dataset for one fold, compute training statistics, and apply X-ray dropout.

    Only the `splits` asked for are built (a subset of train/val/test holding train): a tuning study builds
    train and val, so its fold, and every loader made from it, holds no stay of the test split.
    """
    if cohort == "matched" and data.cxr is None:
        raise LoadingError(f"{data.root}: the matched cohort needs the X-ray cache cxr.npy, which is missing")
    declared = _declared(data, task)
    rows = split_rows(data.cohort, declared.labels, fold, cohort, splits=splits)
    age_mean, age_std = compute_age_stats(data.cohort, rows["train"])
    stats = replace(compute_norm_stats(data.ehr, rows["train"]), age_mean=age_mean, age_std=age_std)
    rates = {s: 0.0 for s in SPLITS} | dict(cxr_dropout_rates or {})
    unknown = set(rates) - set(SPLITS)
    if unknown:
        raise LoadingError(
            f"X-ray dropout rates given for unknown splits {sorted(unknown)}; expected {SPLITS}"
        )
    stay_ids = data.cohort["stay_id"].to_numpy(dtype=np.int64)
    has = data.cohort["has_cxr"].to_numpy(dtype=bool) & (data.cxr is not None)
    sets: dict[str, StayDataset | None] = dict.fromkeys(SPLITS)
    for split in rows:
        r = rows[split]
        dropped = cxr_dropout(stay_ids[r], has[r], rates[split], cxr_dropout_seed)
        sets[split] = StayDataset(data, r, task, stats, image_size, dropped=dropped, load_cxr=load_cxr)
    return FoldData(
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        stats=stats,
        features=list(data.features),
        outputs=declared.output_names,
    )
