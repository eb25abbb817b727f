"""carebench command line: one thin function per verb; the work lives in the library modules.

Verbs: synth, prepare, describe (data); train, evaluate, benchmark, analyze, report (later issues).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from carebench import __version__
from carebench.errors import UserError

app = typer.Typer(
    name="carebench",
    help="Benchmark multimodal fusion of ICU EHR (MIMIC-IV) and chest X-rays (MIMIC-CXR-JPG).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserError (or a missing/existing path) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, FileExistsError, FileNotFoundError) as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"carebench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """carebench: EHR + chest X-ray fusion benchmark."""


@app.command()
@user_errors
def prepare(
    mimic_iv: str = typer.Option(..., "--mimic-iv", help="MIMIC-IV root holding hosp/ and icu/ (.csv.gz, .csv or .parquet)."),
    out: str = typer.Option(..., "--out", help="Output directory for the processed dataset (written atomically)."),
    mimic_cxr: str | None = typer.Option(None, "--mimic-cxr", help="MIMIC-CXR-JPG root; without it no stay has an X-ray."),
    image_size: int = typer.Option(256, "--image-size", help="Side in pixels of the square grayscale X-ray cache."),
    threads: int = typer.Option(2, "--threads", help="DuckDB (and image decoding) threads."),
    memory_limit: str = typer.Option("8GB", "--memory-limit", help="DuckDB memory limit; it spills to disk above it."),
    cxr_lookback_hours: float = typer.Option(
        0.0, "--cxr-lookback-hours", help="Also accept X-rays taken up to this many hours before ICU admission."),
    seed: int = typer.Option(0, "--seed", help="Seed of the patient-disjoint fold assignment."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset at --out."),
) -> None:
    """Raw MIMIC-IV (+ MIMIC-CXR-JPG) -> processed benchmark dataset (cohort, labels, folds, EHR arrays, X-rays)."""
    from carebench.data.mimic.pipeline import prepare as run_prepare

    path = run_prepare(mimic_iv, out, mimic_cxr=mimic_cxr, image_size=image_size, threads=threads,
                       memory_limit=memory_limit, cxr_lookback_hours=cxr_lookback_hours, seed=seed,
                       overwrite=overwrite, console=err_console)
    print(path)


@app.command()
@user_errors
def describe(data: str = typer.Argument(..., help="A dataset directory written by `carebench prepare`.")) -> None:
    """Cohort steps, folds, label prevalences, X-ray availability and feature coverage of a processed dataset."""
    from carebench.data.describe import print_summary, summarize
    from carebench.data.store import open_dataset

    print_summary(summarize(open_dataset(data, mmap=True)), Console(), root=data)
