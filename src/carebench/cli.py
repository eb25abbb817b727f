"""carebench command line: one thin function per verb; the work lives in the library modules.

Verbs: synth, prepare, describe (data); train, evaluate (one run); tune (a study of one model); benchmark (a plan
of runs); analyze, report.
Every default shown in `--help` is read from the dataclass or function that owns it (`PREPARE`, `SYNTH`,
`TrainConfig`, `StatisticsOptions`, ...), so the command line cannot disagree with the Python entry points.
Help is plain text (no Rich markup), so option texts such as `carebench[ray]` print as written.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:  # recent typer vendors click; its exceptions are those the command line raises
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - typer that uses click itself
    from click import exceptions as click_exc

from carebench import __version__
from carebench.data.meds.options import MEDS as MEDS_OPTIONS
from carebench.data.mimic.options import PREPARE
from carebench.data.synthetic.options import SYNTH
from carebench.errors import UserError
from carebench.evaluation.options import DEFAULTS as STATS
from carebench.tasks import TASK_NAMES
from carebench.training.config import PRESETS, TrainConfig

DEBUG = {"on": False}  # set by `carebench --debug`: errors also print their traceback


class _Group(TyperGroup):
    """The command group: a usage error (unknown verb or option, missing or ill-typed value) is one line
    `error: ...` naming the command and the option, exit status 2, like every other bad input."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exc.NoArgsIsHelpError as e:
            e.show()
            sys.exit(0)
        except click_exc.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "carebench"
            _error(f"{where}: {e.format_message()} (see `{where} --help`)")
            sys.exit(e.exit_code)
        except click_exc.ClickException as e:
            _error(e.format_message())
            sys.exit(e.exit_code)
        except typer.Abort:
            _error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="carebench",
    help="Benchmark multimodal fusion of ICU EHR (MIMIC-IV) and chest X-rays (MIMIC-CXR-JPG).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=_Group,
)
err_console = Console(stderr=True)
FLAG = {"metavar": ""}  # a boolean flag takes no value: no "<bool>" in --help


def _error(message: str) -> None:
    err_console.print(
        f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True
    )


def _failure(e: Exception) -> tuple[int, str]:
    """(exit status, one-line message) of an exception that ended a verb (see `user_errors`)."""
    if isinstance(e, UserError | FileExistsError | FileNotFoundError | NotADirectoryError):
        return getattr(e, "exit_code", 2), str(e)
    if isinstance(e, OSError):
        return 1, (f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {e}")
    first = (str(e).strip().splitlines() or [""])[0]
    return 1, (
        f"internal error ({type(e).__name__}: {first}); nothing was kept of this command's output. "
        "Re-run with `carebench --debug ...` for the traceback and report it"
    )


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure of a verb is one line `error: ...` on stderr (docs/troubleshooting.md), never a traceback
    (unless `carebench --debug`):

    - exit 2: bad input, a `UserError` (the message names the file, column or option and what was expected), or an
      existing/missing path;
    - exit 1: the environment failed: a write that found the disk full (`atomic.OutputError`), any other error of
      the operating system (it names the file), or an unexpected internal error (a bug: re-run with --debug).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:  # a verb's own exit code (e.g. 130 after an interrupt, 1 when runs failed)
            raise
        except Exception as e:
            code, message = _failure(e)
            if DEBUG["on"]:
                sys.stderr.write(traceback.format_exc())
        _error(message)
        sys.exit(code)

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
    debug: bool = typer.Option(
        False, "--debug", help="On an error, also print the Python traceback (for bug reports).", **FLAG
    ),
) -> None:
    """carebench: EHR + chest X-ray fusion benchmark."""
    DEBUG["on"] = debug


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
    mimic_iv: str | None = typer.Option(
        None,
        "--mimic-iv",
        help="MIMIC-IV release folder holding hosp/ and icu/ (v2.x, v3.x) or core/, hosp/, icu/ (v1.0); tables as "
        ".csv.gz, .csv or .parquet.",
    ),
    meds: str | None = typer.Option(
        None,
        "--meds",
        help="Instead of --mimic-iv: a MEDS root (data/**/*.parquet, metadata/); needs --labels and "
        "--feature-spec (docs/dataset.md, MEDS).",
    ),
    out: str = typer.Option(
        ..., "--out", help="Output directory for the processed dataset (written atomically)."
    ),
    mimic_cxr: str | None = typer.Option(
        None, "--mimic-cxr", help="MIMIC-CXR-JPG root; without it no stay has an X-ray. MIMIC only."
    ),
    labels: list[str] | None = typer.Option(  # noqa: B008
        None,
        "--labels",
        help="MEDS only, repeatable: NAME=PATH, a task and its MEDS label file or directory (subject_id, "
        "prediction_time, one of boolean/integer/categorical_value; what ACES writes). Each labelled "
        "(subject, prediction_time) is one row; NAME:LABEL=PATH files sharing NAME form a multilabel task.",
    ),
    feature_spec: str | None = typer.Option(
        None,
        "--feature-spec",
        help="MEDS only: YAML mapping codes (exact, prefix or regex) to features with unit, range and "
        "aggregation, plus the window hours, age and fairness attributes; 'mimic-iv' names the shipped spec "
        "for MIMIC-IV converted by the MEDS ETL.",
    ),
    images: str | None = typer.Option(
        None,
        "--images",
        help="MEDS only: image table (.parquet or .csv: subject_id, time, path); a row gets the last image "
        "before its prediction time within --image-lookback-hours. Without it no row has an X-ray.",
    ),
    image_lookback_hours: float | None = typer.Option(
        MEDS_OPTIONS.image_lookback_hours,
        "--image-lookback-hours",
        help="MEDS only: how far before the prediction time an image may be taken (default: the spec's "
        "window hours).",
    ),
    folds: str = typer.Option(
        MEDS_OPTIONS.folds,
        "--folds",
        help="MEDS only: auto | splits (held_out = fold 1, tuning = fold 2, train dealt to folds 3-5) | hash "
        "(5 subject-disjoint folds from --seed); auto = splits when metadata/subject_splits.parquet exists.",
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
        help="MIMIC only: also accept X-rays taken up to this many hours before ICU admission.",
    ),
    seed: int = typer.Option(PREPARE.seed, "--seed", help="Seed of the patient-disjoint fold assignment."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing dataset at --out.", **FLAG
    ),
    allow_empty_features: bool = typer.Option(
        False,
        "--allow-empty-features",
        help="Build the dataset even if a whole feature group (vital signs, labs, urine output, X-rays) has no "
        "value for any stay: a loud warning, recorded in the manifest, instead of an error.",
        **FLAG,
    ),
) -> None:
    """Raw MIMIC-IV (+ MIMIC-CXR-JPG), or a MEDS dataset with label files, -> processed benchmark dataset
    (cohort, labels, folds, EHR arrays, X-rays)."""
    if (mimic_iv is None) == (meds is None):
        raise UserError("prepare: give exactly one of --mimic-iv ROOT or --meds ROOT")
    if meds is not None:
        given = [
            name
            for name, v, default in (
                ("--mimic-cxr", mimic_cxr, None),
                ("--cxr-lookback-hours", cxr_lookback_hours, PREPARE.cxr_lookback_hours),
            )
            if v != default
        ]
        if given:
            raise UserError(f"{given[0]}: a MIMIC option; with --meds use --images / --image-lookback-hours")
        if feature_spec is None:
            raise UserError("--feature-spec: required with --meds (a YAML spec, or 'mimic-iv')")
        from carebench.data.meds.pipeline import prepare_meds

        path = prepare_meds(
            meds,
            out,
            labels=list(labels or []),
            feature_spec=feature_spec,
            images=images,
            image_size=image_size,
            image_lookback_hours=image_lookback_hours,
            folds=folds,
            seed=seed,
            threads=threads,
            memory_limit=memory_limit,
            overwrite=overwrite,
        )
        from carebench.data.store import read_manifest

        m = read_manifest(path)
        c = m["counts"]
        err_console.print(
            f"{c['rows']} rows of {c['subjects']} subjects, {len(m['features'])} features x "
            f"{m['time_grid']['steps']} steps, {c['rows_with_image']} with an image, "
            f"{len(m['warnings'])} warning(s) ({m['timings_s']['total']:.1f} s)",
            highlight=False,
        )
        print(path)
        return
    given = [
        name
        for name, v, default in (
            ("--labels", labels, None),
            ("--feature-spec", feature_spec, None),
            ("--images", images, None),
            ("--image-lookback-hours", image_lookback_hours, MEDS_OPTIONS.image_lookback_hours),
            ("--folds", folds, MEDS_OPTIONS.folds),
        )
        if v not in (default, [])
    ]
    if given:
        raise UserError(f"{given[0]}: a MEDS option; it needs --meds ROOT instead of --mimic-iv")
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
        allow_empty_features=allow_empty_features,
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
    task: str = typer.Option(
        ...,
        "--task",
        help="A task the dataset declares (its manifest): the built-in "
        + ", ".join(TASK_NAMES)
        + " or its own.",
    ),
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
    from pathlib import Path

    from carebench.training import parse_overrides, resolve_config, train_run

    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out}: exists and is not a directory (expected a runs directory)")
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
    run_dir: str = typer.Argument(
        ...,
        help="A run directory written by `carebench train`, or a tuning trial's (tested here, after its study).",
    ),
    data: str | None = typer.Option(
        None, "--data", help="Dataset directory [default: the path in the run's config.yaml]."
    ),
    out: str | None = typer.Option(
        None, "--out", help="Also write the recomputed metrics to this JSON file."
    ),
) -> None:
    """Recompute a run's test metrics from its checkpoint and print the overall ones."""
    import json
    from pathlib import Path

    from carebench import atomic
    from carebench.training import evaluate_run

    if out and not Path(out).absolute().parent.is_dir():
        raise UserError(f"--out {out}: its folder {Path(out).absolute().parent} does not exist")
    metrics = evaluate_run(run_dir, data)
    if out:
        atomic.write_text(out, json.dumps(metrics, indent=2))
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
        False,
        "--dry-run",
        help="List the planned runs and whether they are done (and a tuned plan's studies); run nothing.",
        **FLAG,
    ),
) -> None:
    """Run a plan's grid of runs: skip finished ones, resume after a kill, in parallel; exit 1 if any run failed."""
    from carebench.experiments import load_plan, print_summary, run_benchmark
    from carebench.training import parse_overrides
    from carebench.training.config import data_fingerprint

    p = load_plan(plan, parse_overrides(overrides))
    if dry_run:
        data_fingerprint(data)
        from carebench import runs
        from carebench.experiments.plan import expand_plan

        hparams = None
        if p.tuning is not None:
            from carebench.experiments.tuned import studies_status

            lines, hparams = studies_status(p, data, out)
            print("\n".join(lines))
            if hparams is None:
                print(
                    "runs: known once every study is finished (their hyper-parameters come from the studies)"
                )
                return
        for cfg in expand_plan(p, data, hparams):
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


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
@user_errors
def tune(
    overrides: list[str] | None = typer.Argument(  # noqa: B008
        None,
        help="key=value settings fixed in every trial (as for train: lr=1e-4, accelerator=gpu, model.hidden=128); "
        "a fixed setting is not searched.",
    ),
    data: str = typer.Option(..., "--data", help="Processed dataset directory (carebench prepare)."),
    model: str = typer.Option(
        ..., "--model", help="Registered model name; its declared search space is tuned."
    ),
    task: str = typer.Option(
        ...,
        "--task",
        help="A task the dataset declares (its manifest): the built-in "
        + ", ".join(TASK_NAMES)
        + " or its own.",
    ),
    trials: int = typer.Option(
        ...,
        "--trials",
        help="Complete trials the study should hold in total (pruned and failed trials do not count); "
        "re-running with a larger number continues the study.",
    ),
    out: str = typer.Option(
        ...,
        "--out",
        help="Study directory: OUT/study.yaml, OUT/study.db (default storage), OUT/trials/<run_id>/.",
    ),
    fold: int = typer.Option(
        TrainConfig.fold,
        "--fold",
        help="Fold whose VALIDATION split is optimised (its test split is never built).",
    ),
    cohort: str = typer.Option(
        TrainConfig.cohort, "--cohort", help="base (all stays) | matched (stays with an X-ray)."
    ),
    preset: str = typer.Option(TrainConfig.preset, "--preset", help=f"{' | '.join(PRESETS)}."),
    seed: int = typer.Option(
        TrainConfig.seed,
        "--seed",
        help="Seed of the sampler (trial n draws with (seed, n)) and of every trial.",
    ),
    storage: str | None = typer.Option(
        None,
        "--storage",
        help="Optuna RDB URL shared by all workers (e.g. postgresql://user@host/db) [default: sqlite in OUT/study.db].",
    ),
    space: str | None = typer.Option(
        None,
        "--space",
        help="YAML file {setting: spec} replacing the model's declared search space (docs/tuning.md); may also "
        "tune lr, weight_decay, batch_size.",
    ),
    pruning: bool = typer.Option(
        True, "--pruning/--no-pruning", help="Stop unpromising trials early (median rule).", **FLAG
    ),
    jobs: int = typer.Option(
        1, "--jobs", help="Workers on the study at once (local processes or Ray tasks)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="Torch CPU threads per worker [default: CPU cores // jobs]."
    ),
    executor: str = typer.Option(
        "local", "--executor", help="local (worker processes) | ray (needs pip install 'carebench[ray]')."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Ray cluster to join [default: RAY_ADDRESS, else a local Ray instance]."
    ),
) -> None:
    """Tune a model's hyper-parameters on the validation split of one fold (Optuna); resumable, parallel."""
    from carebench.training import parse_overrides
    from carebench.tuning.runner import print_summary
    from carebench.tuning.runner import tune as run_tune

    summary = run_tune(
        data=data,
        model=model,
        task=task,
        out=out,
        trials=trials,
        fold=fold,
        cohort=cohort,
        preset=preset,
        seed=seed,
        storage=storage,
        space_file=space,
        overrides=parse_overrides(overrides),
        pruning=pruning,
        jobs=jobs,
        threads=threads,
        executor=executor,
        address=ray_address,
        echo=lambda line: err_console.print(line, highlight=False),
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
    sequential_h: int | None = typer.Option(
        None,
        "--sequential-h",
        help="A permutation test stops once this many permuted differences were as extreme as the observed one "
        "(Besag-Clifford sequential p = h / permutations used; 0 = always --n-permutations) [default: the plan's "
        f"statistics.sequential_h, else {STATS.sequential_h}].",
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
        help="Label groups of a multilabel task for group-macro "
        "metrics and tests: a JSON/YAML file {group: [labels]}, or the "
        "planted.json of `carebench synth` (grouped by planted kind). "
        "[default: the plan's statistics.label_groups, else none]",
    ),
    pairs: str | None = typer.Option(
        None,
        "--pairs",
        help="Method pairs compared besides each fusion method vs the best unimodal one: findings (each method "
        "vs latefusion, what the findings read), all (every pair: work grows with the square of the methods), "
        f"reference (none) [default: the plan's statistics.pairs, else {STATS.pairs}].",
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
    paper's four findings with a verdict each -> RUNS/analysis/ (parquet + csv, summary.json). Killed, it resumes:
    the same command reuses the statistics, fairness and checkpoint passes it had finished (RUNS/.analyze-pieces/)."""
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
        pairs=pairs,
        sequential_h=sequential_h,
        jobs=jobs,
    )
    s = result.summary
    for w in s["warnings"]:
        err_console.print(f"[yellow]note:[/] {escape(w)}", highlight=False, soft_wrap=True)
    resumed = f" (resumed: {s['resumed_pieces']} finished pieces reused)" if s["resumed_pieces"] else ""
    err_console.print(
        f"{s['n_runs']} runs analysed in {s['timings_s']['total']:.1f} s{resumed}", highlight=False
    )
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
