"""Training-step time per method: carebench beside the reference toolkit (jakeykj/CareBench), same batch, same device.

Needs your own checkout of the reference toolkit (https://github.com/jakeykj/CareBench; this repository contains none
of its code) and the Python packages its models import (einops, monai, dm-tree; fastmoe and torchxrayvision are
CUDA/optional: where one is not installed, an empty module stands in for the import only, so every method that does
not call it runs, and a method that does is reported as an error). Run it with an interpreter that has carebench's
dependencies plus those packages:

    python benchmarks/reference_steps.py --reference ~/src/CareBench --data DATA \\
        [--models latefusion,drfuse] [--availability 1.0,0.3] [--batch-size 16] [--steps 5] [--warmup 2] \\
        [--repeat 3] [--threads 2]

What is timed: the training step of each side's own Lightning module (forward, loss, backward, optimiser step, the
method's own hooks or manual optimisation), `--steps` steps after `--warmup` untimed ones, on one batch built
once from DATA's fold-1 training stays and given to both sides (carebench's batch layout, and the reference's:
`ehr_ts` = values + its 1 = missing mask channels, `cxr_imgs` the same image on 3 channels, UMSE's
(hour, feature, value) triplets of the masked entries as its loader builds them). Loading and augmentation are not
timed on either side (benchmarks/train.py reports carebench's loader share). A fraction `--availability` of the
batch's stays have an X-ray; the reference runs its CNN on blank images for the others, as its loader does.

Sides, each in a fresh process, interleaved over --repeat rounds (reference, ours fp32, ours default, reference,
...), medians reported:
- reference: its published phenotype configuration (`configs/train_configs/<method>_phenotype.yaml`, read by its
  own `arguments.get_args`; the model YAML `configs/<method>.yaml` where the train config cannot build the model,
  as for MedFuse), float32 (its trainer sets no precision), pretrained weights off (same cost, no download), its
  EHR input width set to carebench's 2 x features;
- ours fp32: `--preset full`, `precision=32-true channels_last=false` (the layout and precision the reference uses);
- ours default: `--preset full` with its defaults on this device (`precision: auto`, channels-last).
Both sides get the same batch: the reference's published batch size of the method (16; HEALNet 4, whose
raw-pixel tokens need tens of GB at 16) unless --batch-size is given. Encoders that load ImageNet weights whatever
their configuration says (ShaSpec, SMIL in the reference) get a random state of the same architecture instead of a
download. Each process is limited to --memory-cap-gb of address space.
"""

from __future__ import annotations

import os.path
import sys

# Run as a file, this script's folder is sys.path[0]: drop it so a sibling script cannot shadow a module.
if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
import types
from pathlib import Path

SIDES = ("reference", "ours fp32", "ours default")
OURS = {"ours fp32": {"precision": "32-true", "channels_last": False}, "ours default": {}}
# Modules the reference imports at start-up that only some of its methods use; absent ones get an empty stand-in.
OPTIONAL_IMPORTS = (
    "fmoe",
    "fmoe.transformer",
    "fmoe.layers",
    "fmoe.functions",
    "fmoe.gates",
    "torchxrayvision",
)


class StopTiming(Exception):
    """Raised after the last timed step (the untimed rest of the epoch is not run)."""


# ------------------------------------------------------------------------------------------------ batches
def choose_positions(has_cxr, batch_size: int, availability: float) -> list[int]:
    """Training positions: the first round(availability x batch) stays with an X-ray, then stays without one."""
    import numpy as np

    k = round(availability * batch_size)
    with_cxr, without = np.flatnonzero(has_cxr), np.flatnonzero(~has_cxr)
    if len(with_cxr) < k or len(without) < batch_size - k:
        raise SystemExit(
            f"fold 1 has {len(with_cxr)} training stays with an X-ray and {len(without)} without"
        )
    return [int(i) for i in np.concatenate([with_cxr[:k], without[: batch_size - k]])]


def our_batch(
    data: str, batch_size: int, availability: float, image_size: int
) -> tuple[dict, list[str], list[str]]:
    """The batch, the EHR features and the task's output names."""
    from carebench.data.loading import build_fold
    from carebench.data.store import open_dataset

    fold = build_fold(open_dataset(data, mmap=True), task="phenotype", fold=1, image_size=image_size)
    positions = choose_positions(fold.train.has_cxr, batch_size, availability)
    return fold.train.__getitems__(positions), list(fold.features), list(fold.outputs)


def reference_batch(ours: dict, triplets: bool, max_triplets: int = 500) -> dict:
    """The same stays in the reference's collated layout (its `pad_temporal_data` keys)."""
    import pandas as pd
    import torch

    b, t, _ = ours["ehr"].shape
    missing = 1.0 - ours["ehr_mask"]  # the reference's mask channels: 1 = missing / imputed
    ehr_ts = torch.cat([ours["ehr"], missing], dim=-1)
    seq_len = [t] * b
    if triplets:  # its UMSE loader: (hour, feature, value) of the entries whose mask channel is non-zero
        rows = []
        for i in range(b):
            hour, feat = torch.nonzero(missing[i], as_tuple=True)
            trip = torch.stack([hour.float(), feat.float(), ours["ehr"][i, hour, feat]], dim=1)
            rows.append(trip[trip[:, 0].argsort(stable=True)])
        seq_len = [len(r) for r in rows]
        ehr_ts = torch.zeros(b, max(seq_len), 3)
        for i, r in enumerate(rows):
            ehr_ts[i, : len(r)] = r
        ehr_ts = ehr_ts[:, : max(max_triplets, 1)]
    has = ours["has_cxr"].float()
    return {
        "stay_ids": ours["stay_id"].tolist(),
        "seq_len": seq_len,
        "ehr_ts": ehr_ts,
        "ehr_masks": missing,
        "cxr_imgs": ours["cxr"].expand(-1, 3, -1, -1).contiguous(),
        "has_cxr": has,
        "labels": ours["y"].float(),
        "meta_attrs": pd.DataFrame(
            {
                "age": [60.0] * b,
                "gender": ["M"] * b,
                "admission_type": ["EW EMER."] * b,
                "race": ["WHITE"] * b,
                "has_cxr": has.tolist(),
            }
        ),
        "idx": torch.arange(b)[:, None],
        "cxr_times": ours["cxr_hours"].float(),
    }


# ------------------------------------------------------------------------------------------------ modules
def stub_module(name: str) -> types.ModuleType:
    """An empty package whose every public attribute is an empty class: enough for `from x import Y`."""
    stub = types.ModuleType(name)
    stub.__path__ = []  # a package, so the import of its submodules reaches their own stand-ins

    def attribute(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {"__module__": name})

    stub.__getattr__ = attribute  # type: ignore[method-assign]
    return stub


def reference_module(root: Path, method: str, n_inputs: int, class_names: list[str], steps: int):
    """The reference's Lightning module for `method` at its published phenotype configuration."""
    import importlib

    import torch

    for name in OPTIONAL_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = stub_module(name)
    # torch removed ReduceLROnPlateau's `verbose` argument, which the reference passes.
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau

    class Plateau(plateau):
        def __init__(self, *a, verbose=None, **kw):
            super().__init__(*a, **kw)

    torch.optim.lr_scheduler.ReduceLROnPlateau = Plateau
    # Some of its encoders load ImageNet weights whatever the configuration says (ShaSpec, SMIL): give them a
    # randomly initialised state of the same torchvision architecture instead of a download (same cost).
    import torchvision

    def random_weights(url: str, *a, **kw) -> dict:
        arch = Path(url).name.split("-")[0]
        return getattr(torchvision.models, arch)(weights=None).state_dict()

    torch.hub.load_state_dict_from_url = random_weights
    torchvision.models._api.WeightsEnum.get_state_dict = lambda self, *a, **kw: random_weights(self.url)
    os.chdir(root)
    sys.path.insert(0, str(root))
    import yaml
    from arguments import get_args  # the reference's own modules, from --reference

    from models import get_model

    candidates = [
        root / "configs" / "train_configs" / f"{method}_phenotype.yaml",
        root / "configs" / f"{method}.yaml",
    ]
    errors = []
    for path in candidates:
        if not path.is_file():
            continue
        config = yaml.safe_load(path.read_text()) or {}
        sys.argv = ["main.py", "--model", method, "--config_path", str(path)]
        args = get_args()
        meta = {"tasks", "folds", "seeds", "experiment_name", "description", "checkpoint_paths"}
        for key, value in config.items():  # as its run_experiments_from_config applies a train config
            if key not in meta:
                setattr(args, key, value)
        args.task, args.fold, args.seed, args.mode = "phenotype", 1, 42, "train"
        hp = vars(args)
        for key in list(hp):
            if "pretrained" in key and isinstance(hp[key], bool | str):
                hp[key] = False if isinstance(hp[key], bool) else "none"
        hp.update(input_dim=n_inputs, num_classes=len(class_names), class_names=class_names,
                  steps_per_epoch=steps, compute_fairness=False, save_predictions=False, label_weights=None)  # fmt: skip
        try:
            return get_model(method, hp), path.relative_to(root), bool(hp.get("use_triplet"))
        except Exception as e:  # e.g. MedFuse with its train config: try the model YAML
            errors.append(f"{path.name}: {type(e).__name__}: {e}")
    raise RuntimeError("; ".join(errors) or f"no configuration for {method!r}")


def our_config(data: str, method: str, variant: dict, batch_size: int):
    from carebench.models import get_model_class
    from carebench.training.config import resolve_config

    cls = get_model_class(method)
    overrides = {"batch_size": batch_size, **variant}
    overrides |= {f"model.{k}": "none" for k in cls.default_hparams if k.endswith("pretrained")}
    cfg = resolve_config(data=data, model=method, task="phenotype", preset="full", overrides=overrides)
    return cfg


# ------------------------------------------------------------------------------------------------ worker
def published_batch_size(root: Path, method: str, default: int) -> int:
    """The batch size of the reference's published phenotype configuration (HEALNet: 4), else `default`."""
    import yaml

    path = root / "configs" / "train_configs" / f"{method}_phenotype.yaml"
    if not path.is_file():
        return default
    return int((yaml.safe_load(path.read_text()) or {}).get("batch_size", default))


def worker(spec: dict) -> None:
    import resource

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    cap = int(
        spec["memory_cap_gb"] * 2**30
    )  # a MemoryError in this process rather than the OOM killer's choice
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    warm, steps = spec["warmup"], spec["steps"]
    ours, features, outputs = our_batch(spec["data"], spec["batch_size"], spec["availability"], 224)
    precision, config = "32-true", ""
    if spec["side"] == "reference":
        module, config, triplets = reference_module(
            Path(spec["reference"]).expanduser().absolute(),
            spec["method"],
            2 * len(features),
            outputs,
            warm + steps,
        )
        batch = reference_batch(ours, triplets)
    else:
        from carebench.training.predict import build_model
        from carebench.training.run import build_module

        cfg = our_config(spec["data"], spec["method"], OURS[spec["side"]], spec["batch_size"])
        module, batch, precision = (
            build_module(cfg, build_model(cfg, len(features)), outputs),
            ours,
            cfg.precision,
        )
        config = f"preset full, {cfg.precision}, channels_last={cfg.channels_last}"
    times: list[tuple[float, float]] = []  # (wall, this process's CPU time)

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            if batch_idx == warm:
                times.append((time.perf_counter(), time.process_time()))

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            if batch_idx == warm + steps - 1:
                times.append((time.perf_counter(), time.process_time()))
                raise StopTiming

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=warm + steps,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
    )
    loader = DataLoader([dict(batch) for _ in range(warm + steps)], batch_size=None, collate_fn=lambda x: x)
    try:
        trainer.fit(module, train_dataloaders=loader)
    except StopTiming:
        pass
    if len(times) != 2:
        raise SystemExit("the timed steps did not complete")
    (w0, c0), (w1, c1) = times
    print(json.dumps({"step_s": (w1 - w0) / steps, "cpu_step_s": (c1 - c0) / steps, "config": str(config)}))


def run_side(args: argparse.Namespace, method: str, side: str, availability: float) -> dict:
    spec = {
        "side": side,
        "method": method,
        "availability": availability,
        "reference": str(args.reference),
        "data": str(args.data),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "memory_cap_gb": args.memory_cap_gb,
    }
    if args.batch_size == 0:
        spec["batch_size"] = published_batch_size(args.reference, method, 16)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(
        [sys.executable, os.path.realpath(__file__), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [x for x in proc.stderr.strip().splitlines() if x.strip()] or ["failed"]
        return {"error": err[-1][:160]}
    return json.loads(lines[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="your checkout of jakeykj/CareBench")
    ap.add_argument("--data", type=Path, required=True, help="a processed dataset (carebench prepare)")
    ap.add_argument("--models", default="", help="comma-separated (default: every registered method)")
    ap.add_argument("--availability", default="1.0,0.3", help="fractions of the batch with an X-ray")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="0: the reference's published one per method (16; HEALNet 4)",
    )
    ap.add_argument("--memory-cap-gb", type=float, default=10.0, help="address-space limit of each process")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeat", type=int, default=3, help="processes per side (interleaved); medians")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the medians here (for cost_model.py)")
    ap.add_argument(
        "--measure",
        choices=("step_s", "cpu_step_s"),
        default="step_s",
        help="wall time per step, or the process's CPU time per step (the fairer figure with --threads 1 on a "
        "machine shared with other jobs)",
    )
    args = ap.parse_args()
    if (
        not (args.reference / "main.py").is_file()
        or not (args.reference / "models" / "registry.py").is_file()
    ):
        ap.error(f"--reference {args.reference}: expected a checkout of jakeykj/CareBench (main.py, models/)")

    import torch

    from carebench.models import list_models

    models = [m for m in args.models.split(",") if m] or list_models()
    rates = [float(x) for x in args.availability.split(",")]
    print(
        f"\nTraining step ({'CPU' if args.measure == 'cpu_step_s' else 'wall'} seconds), phenotype, 224 px, "
        f"median over {args.repeat} process(es) per "
        f"side of {args.steps} steps after {args.warmup}; {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}, load average before "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    print(
        "| method | batch | X-rays | reference s/step | ours fp32 s/step | ours default s/step | "
        "reference / ours fp32 | reference / ours default | reference configuration |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    results: list[dict] = []
    for method in models:
        for rate in rates:
            got: dict[str, list[dict]] = {s: [] for s in SIDES}
            for _ in range(args.repeat):
                for side in SIDES:
                    got[side].append(run_side(args, method, side, rate))
            med, note = {}, ""
            for side, rs in got.items():
                ok = [r[args.measure] for r in rs if args.measure in r]
                med[side] = statistics.median(ok) if len(ok) == len(rs) else None
                if med[side] is None:
                    note += f" {side}: {next(r['error'] for r in rs if 'error' in r)}"
            conf = next((r.get("config", "") for r in got["reference"] if "config" in r), "")

            def cell(x: float | None) -> str:
                return f"{x:.3f}" if x is not None else "n/a"

            def ratio(a: float | None, b: float | None) -> str:
                return f"{a / b:.2f}x" if a is not None and b is not None else "n/a"

            ref, fp32, default = med["reference"], med["ours fp32"], med["ours default"]
            other = "cpu_step_s" if args.measure == "step_s" else "step_s"
            also = {
                side: statistics.median(r[other] for r in rs) if all(other in r for r in rs) else None
                for side, rs in got.items()
            }
            batch = args.batch_size or published_batch_size(args.reference, method, 16)
            results.append(
                {
                    "method": method,
                    "availability": rate,
                    "batch": batch,
                    "measure": args.measure,
                    **med,
                    other: also,
                }
            )
            if args.json:
                args.json.write_text(json.dumps(results, indent=1) + "\n")
            print(
                f"| {method} | {batch} | {rate:.0%} | {cell(ref)} | {cell(fp32)} | {cell(default)} | {ratio(ref, fp32)} | "
                f"{ratio(ref, default)} | {conf}{note} |",
                flush=True,
            )
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
