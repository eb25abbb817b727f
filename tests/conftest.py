"""Shared fixtures. The real MIMIC-IV demo and the open radiographs are read from ../shared (never copied)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEMO = SHARED / "data" / "mimic-iv-demo-2.2"
CXR_OPEN = SHARED / "data" / "cxr-open"


@pytest.fixture(scope="session")
def demo_root() -> Path:
    if not (DEMO / "icu" / "icustays.csv.gz").is_file():
        pytest.fail(f"the MIMIC-IV demo is expected at {DEMO} (../shared beside the checkout)")
    return DEMO


@pytest.fixture(scope="session")
def cxr_open_root() -> Path:
    if not (CXR_OPEN / "hannover" / "manifest.csv").is_file():
        pytest.fail(f"the open radiographs are expected at {CXR_OPEN}")
    return CXR_OPEN


@pytest.fixture(scope="session")
def prepared_demo(demo_root, tmp_path_factory) -> Path:
    """The real MIMIC-IV demo through `prepare` once per test session (no X-rays, seed 0); treat as read-only."""
    from rich.console import Console

    from carebench.data.mimic.pipeline import prepare

    out = tmp_path_factory.mktemp("prepared") / "demo"
    return prepare(demo_root, out, threads=2, memory_limit="2GB", seed=0, console=Console(quiet=True))
