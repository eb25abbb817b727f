"""carebench command line: one thin function per verb; the work lives in the library modules.

Verbs: synth, prepare, describe (data); train, evaluate (one run); benchmark (a plan of runs); analyze, report.
Every default shown in `--help` is read from the dataclass or function that owns it (`PREPARE`, `SYNTH`,
`TrainConfig`, `StatisticsOptions`, ...), so the command line cannot disagree with the Python entry points.
Help is plain text (no Rich markup), so option texts such as `carebench[ray]` print as written.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from carebench import __version__
from carebench.data.mimic.options import PREPARE
from carebench.data.synthetic.options import SYNTH
from carebench.errors import UserError
from carebench.evaluation.options import DEFAULTS as STATS
from carebench.tasks import TASK_NAMES
from carebench.training.config import PRESETS, TrainConfig

app = typer.Typer(
    name="carebench",
    help="Benchmark multimodal fusion of ICU EHR (MIMIC-IV) and chest X-rays (MIMIC-CXR-JPG).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err_console = Console(stderr=True)
FLAG = {"metavar": ""}  # a boolean flag takes no value: no "<bool>" in --help


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserError (or a missing/existing path) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, FileExistsError, FileNotFoundError) as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"carebench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit.", **FLAG
    ),
) -> None:
    """carebench: EHR + chest X-ray fusion benchmark."""


@app.command()
@user_errors
def synth(
    out: str = typer.Option(
        ...,
        "--out",
        help="Output directory (gets mimic-iv/, mimic-cxr-jpg/, planted.json), written atomically.",
    ),
    stays: int = typer.Option(
        ..., "--stays", help="Number of ICU stays to generate (about 80% pass the cohort rules)."
    ),
    seed: int = typer.Option(
        ..., "--seed", help="Random seed; the same seed and options give identical files."
    ),
    image_size: int = typer.Option(
        SYNTH.image_size, "--image-size", help="Side of the rendered radiographs, in pixels."
    ),
    cxr_rate: float = typer.Option(
        SYNTH.cxr_rate, "--cxr-rate", help="Share (0-1) of stays with a frontal X-ray in the first 48 h."
    ),
    workers: int = typer.Option(
        SYNTH.workers, "--workers", help="Worker processes (the output does not depend on them)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing directory at --out.", **FLAG
    ),
) -> None:
    """Synthetic MIMIC-IV + MIMIC-CXR-JPG raw files with a planted ground truth (docs/synthetic.md)."""
    from rich.progress import Progress

    from carebench.data.synthetic.simulator import synthesize

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("Simulating stays", total=None)
        result = synthesize(
            out,
            stays=stays,
            seed=seed,
            image_size=image_size,
            cxr_rate=cxr_rate,
            workers=workers,
            overwrite=overwrite,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    c = result.counts
    err_console.print(
        f"{c['stays']} ICU stays ({c['cohort_stays']} adult >= 48 h, {c['cohort_with_cxr']} of them "
        f"with an X-ray), {c['images']} images in {result.seconds:.1f} s",
        highlight=False,
    )
    print(result.path)


@app.command()
@user_errors
def prepare(
    mimic_iv: str = typer.Option(
        ..., "--mimic-iv", help="MIMIC-IV root holding hosp/ and icu/ (.csv.gz, .csv or .parquet)."
    ),
    out: str = typer.Option(
        ..., "--out", help="Output directory for the processed dataset (written atomically)."
    ),
    mimic_cxr: str | None = typer.Option(
        None, "--mimic-cxr", help="MIMIC-CXR-JPG root; without it no stay has an X-ray."
    ),
    image_size: int = typer.Option(
        PREPARE.image_size, "--image-size", help="Side of the square grayscale X-ray cache, in pixels."
    ),
    threads: int = typer.Option(PREPARE.threads, "--threads", help="DuckDB (and image decoding) threads."),
    memory_limit: str = typer.Option(
        PREPARE.memory_limit,
        "--memory-limit",
        help="DuckDB memory limit, with its unit (e.g. 8GB, 500MB); it spills to disk beyond it.",
    ),
    cxr_lookback_hours: float = typer.Option(
        PREPARE.cxr_lookback_hours,
        "--cxr-lookback-hours",
        help="Also accept X-rays taken up to this many hours before ICU admission.",
    ),
    seed: int = typer.Option(PREPARE.seed, "--seed", help="Seed of the patient-disjoint fold assignment."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing dataset at --out.", **FLAG
    ),
) -> None:
    """Raw MIMIC-IV (+ MIMIC-CXR-JPG) -> processed benchmark dataset (cohort, labels, folds, EHR arrays, X-rays)."""
    from carebench.data.mimic.pipeline import prepare as run_prepare

    path = run_prepare(
        mimic_iv,
        out,
        mimic_cxr=mimic_cxr,
        image_size=image_size,
        threads=threads,
        memory_limit=memory_limit,
        cxr_lookback_hours=cxr_lookback_hours,
        seed=seed,
        overwrite=overwrite,
        console=err_console,
    )
    print(path)


@app.command()
@user_errors
def describe(
    data: str = typer.Argument(..., help="A dataset directory written by `carebench prepare`."),
) -> None:
    """Cohort steps, folds, label prevalences, X-ray availability and feature coverage of a processed dataset."""
    from carebench.data.describe import print_summary, summarize
    from carebench.data.store import open_dataset

    print_summary(summarize(open_dataset(data, mmap=True)), Console(), root=data)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
@user_errors
def train(
    overrides: list[str] | None = typer.Argument(  # noqa: B008
        None,
        help="key=value overrides: training options (lr=1e-4, max_epochs=5) or model hyper-parameters "
        "(model.hidden=128).",
    ),
    data: str = typer.Option(..., "--data", help="Processed dataset directory (carebench prepare)."),
    model: str = typer.Option(
        ..., "--model", help="Registered model name (see `carebench.models.list_models()`)."
    ),
    task: str = typer.Option(..., "--task", help=" | ".join(TASK_NAMES) + "."),
    out: str = typer.Option(..., "--out", help="Runs directory; the run is written to OUT/<run_id>/."),
    cohort: str = typer.Option(
        TrainConfig.cohort, "--cohort", help="base (all stays) | matched (stays with an X-ray)."
    ),
    fold: int = typer.Option(
        TrainConfig.fold,
        "--fold",
        help="Test fold 1-5 (validation = the next fold, train = the other three).",
    ),
    seed: int = typer.Option(
        TrainConfig.seed, "--seed", help="Seed of initialisation, shuffling, augmentation and dropout."
    ),
    preset: str = typer.Option(
        TrainConfig.preset,
        "--preset",
        help=f"{' | '.join(PRESETS)} (quick: small, CPU; full: paper setting).",
    ),
    cxr_dropout_train: float = typer.Option(
        TrainConfig.cxr_dropout_train,
        "--cxr-dropout-train",
        help="Fraction (0-1) of training X-rays removed.",
    ),
    cxr_dropout_val: float = typer.Option(
        TrainConfig.cxr_dropout_val, "--cxr-dropout-val", help="Fraction (0-1) of validation X-rays removed."
    ),
    cxr_dropout_test: float = typer.Option(
        TrainConfig.cxr_dropout_test, "--cxr-dropout-test", help="Fraction (0-1) of test X-rays removed."
    ),
    cxr_dropout_seed: int | None = typer.Option(
        None, "--cxr-dropout-seed", help="Seed of the X-ray dropout [default: --seed]."
    ),
    accelerator: str = typer.Option(TrainConfig.accelerator, "--accelerator", help="cpu | gpu | auto."),
    devices: str = typer.Option(
        str(TrainConfig.devices), "--devices", help="Number of devices (>1 = DDP) or auto."
    ),
    precision: str | None = typer.Option(
        None,
        "--precision",
        help="32-true | bf16-mixed | 16-mixed | auto [default: the preset's: quick and test 32-true; full auto = "
        "bf16-mixed on a GPU or a CPU with bfloat16 units (AMX / AVX512-BF16), else 32-true].",
        show_default=False,
    ),
    num_workers: int | None = typer.Option(
        None,
        "--num-workers",
        help="DataLoader worker processes (0 = in the main process) [default: 0 on CPU, up to 4 on a GPU].",
        show_default=False,
    ),
    threads: int = typer.Option(
        TrainConfig.threads,
        "--threads",
        help="CPU threads of torch (0 = torch's default); use 1 when several runs share a machine.",
    ),
    progress: bool = typer.Option(
        TrainConfig.progress, "--progress/--no-progress", help="Show progress bars.", **FLAG
    ),
) -> None:
    """Train one model on one fold, select on validation, test the best checkpoint; write OUT/<run_id>/."""
    from carebench.training import parse_overrides, resolve_config, train_run

    options = {
        "cohort": cohort,
        "fold": fold,
        "seed": seed,
        "cxr_dropout_train": cxr_dropout_train,
        "cxr_dropout_val": cxr_dropout_val,
        "cxr_dropout_test": cxr_dropout_test,
        "cxr_dropout_seed": cxr_dropout_seed,
        "accelerator": accelerator,
        "devices": devices,
        "precision": precision,
        "num_workers": num_workers,
        "threads": threads,
        "progress": progress,
    }
    cfg = resolve_config(
        data=data,
        model=model,
        task=task,
        preset=preset,
        options=options,
        overrides=parse_overrides(overrides),
    )
    result = train_run(cfg, out)
    if not result.metrics:
        return  # a non-zero DDP rank
    sel = result.metrics["selection_metric"]
    state = "skipped (already finished)" if result.skipped else "done"
    print(f"{result.run_dir}  {state}  test {sel} = {result.metrics['test'].get(sel)}")


@app.command()
@user_errors
def evaluate(
    run_dir: str = typer.Argument(..., help="A run directory written by `carebench train`."),
    data: str | None = typer.Option(
        None, "--data", help="Dataset directory [default: the path in the run's config.yaml]."
    ),
    out: str | None = typer.Option(
        None, "--out", help="Also write the recomputed metrics to this JSON file."
    ),
) -> None:
    """Recompute a run's test metrics from its checkpoint and print the overall ones."""
    import json

    from carebench.training import evaluate_run

    metrics = evaluate_run(run_dir, data)
    if out:
        with open(out, "w") as fh:
            json.dump(metrics, fh, indent=2)
    for key, value in metrics.items():
        if "/" not in key and not isinstance(value, dict):
            print(f"{key}\t{value}")


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
@user_errors
def benchmark(
    overrides: list[str] | None = typer.Argument(  # noqa: B008
        None,
        help="key=value added to the plan's overrides of every run (e.g. accelerator=gpu precision=32-true).",
    ),
    plan: str = typer.Option(
        ..., "--plan", help="A built-in profile (quick, paper) or a plan YAML file (docs/benchmark.md)."
    ),
    data: str = typer.Option(..., "--data", help="Processed dataset directory (carebench prepare)."),
    out: str = typer.Option(..., "--out", help="Runs directory: OUT/<run_id>/, OUT/plan.yaml, OUT/runs.csv."),
    executor: str = typer.Option(
        "local", "--executor", help="local (worker processes) | ray (needs pip install 'carebench[ray]')."
    ),
    jobs: int | None = typer.Option(
        None, "--jobs", help="Runs at a time [default: local 1; ray: cluster CPUs / threads]."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="Torch CPU threads per run [default: CPU cores // jobs]."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Ray cluster to join [default: RAY_ADDRESS, else a local Ray instance]."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List the planned runs and whether they are done; run nothing.", **FLAG
    ),
) -> None:
    """Run a plan's grid of runs: skip finished ones, resume after a kill, in parallel; exit 1 if any run failed."""
    from carebench.experiments import load_plan, print_summary, run_benchmark
    from carebench.training import parse_overrides

    p = load_plan(plan, parse_overrides(overrides))
    if dry_run:
        from carebench import runs
        from carebench.experiments.plan import expand_plan

        for cfg in expand_plan(p, data):
            print(f"{cfg.run_id}\t{'done' if runs.is_done(out, cfg.run_id) else 'pending'}")
        return
    summary = run_benchmark(
        p, data, out, executor=executor, jobs=jobs, threads=threads, address=ray_address, console=err_console
    )
    print_summary(summary, Console())
    if summary.interrupted:
        raise typer.Exit(130)
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
@user_errors
def analyze(
    runs: str = typer.Argument(
        ..., help="Runs directory (carebench benchmark --out / carebench train --out)."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Dataset directory, if it moved since training [default: the path in the runs' config.yaml].",
    ),
    n_bootstrap: int | None = typer.Option(
        None,
        "--n-bootstrap",
        help=f"Bootstrap resamples per CI [default: the plan's statistics.n_bootstrap, else {STATS.n_bootstrap}].",
    ),
    n_permutations: int | None = typer.Option(
        None,
        "--n-permutations",
        help="Permutations per paired test [default: the plan's statistics.n_permutations, else "
        f"{STATS.n_permutations}].",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help=f"Seed of every resampling [default: the plan's, else {STATS.seed}]."
    ),
    confidence: float | None = typer.Option(
        None, "--confidence", help=f"CI level, 0-1 [default: the plan's, else {STATS.confidence}]."
    ),
    fairness: bool | None = typer.Option(
        None,
        "--fairness/--skip-fairness",
        help="Fairness tables [default: the plan's fairness.enabled, else on].",
        **FLAG,
    ),
    missingness: bool = typer.Option(
        True,
        "--missingness/--skip-missingness",
        help="Missing-X-ray tables (natural, test-time curves, train/val rates).",
        **FLAG,
    ),
    ablation: bool = typer.Option(
        True, "--ablation/--skip-ablation", help="Test-time modality ablation.", **FLAG
    ),
    label_groups: str | None = typer.Option(
        None,
        "--label-groups",
        help="Phenotype label groups for group-macro "
        "metrics and tests: a JSON/YAML file {group: [labels]}, or the "
        "planted.json of `carebench synth` (grouped by planted kind). "
        "[default: the plan's statistics.label_groups, else none]",
    ),
    device: str = typer.Option("cpu", "--device", help="Torch device for re-evaluating checkpoints."),
    jobs: int = typer.Option(
        0,
        "--jobs",
        help="Worker processes for the independent computations (method pairs, runs); the tables do not depend "
        "on it. 0 = every core this process may use.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars.", **FLAG),
) -> None:
    """Statistics, fairness, missing-modality and modality-contribution tables of every finished run, and the
    paper's four findings with a verdict each -> RUNS/analysis/ (parquet + csv, summary.json)."""
    from carebench.analysis.analyze import analyze as run_analysis

    result = run_analysis(
        runs,
        data=data,
        console=err_console if progress else None,
        n_bootstrap=n_bootstrap,
        n_permutations=n_permutations,
        seed=seed,
        confidence=confidence,
        fairness=fairness,
        missingness=missingness,
        ablation=ablation,
        device=device,
        label_groups=label_groups,
        jobs=jobs,
    )
    s = result.summary
    for w in s["warnings"]:
        err_console.print(f"[yellow]note:[/] {escape(w)}", highlight=False, soft_wrap=True)
    err_console.print(f"{s['n_runs']} runs analysed in {s['timings_s']['total']:.1f} s", highlight=False)
    print(result.path)


@app.command()
@user_errors
def report(
    runs: str = typer.Argument(..., help="Runs directory analysed by `carebench analyze`."),
    planted: str | None = typer.Option(
        None,
        "--planted",
        help="planted.json of `carebench synth`: adds a "
        "section comparing the conclusions with the planted truth.",
    ),
    out: str | None = typer.Option(None, "--out", help="Output directory [default: RUNS/report]."),
) -> None:
    """One self-contained HTML page (RUNS/report/index.html) and every analysis table as CSV."""
    from carebench.report import build_report

    print(build_report(runs, planted=planted, out=out))
