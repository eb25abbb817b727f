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
