"""The shape of the code (docs/architecture.md): layers import one way, the leaves stay light, the run record has
one home, and no comment points outside the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "carebench"
TESTS = Path(__file__).resolve().parent

# data -> models -> training -> experiments / tuning -> analysis -> report -> cli; the leaves anyone may use.
# experiments and tuning are one layer: a plan runs studies, a study reuses the executors' process helpers.
LEAVES = {"errors", "atomic", "tasks", "runs", "evaluation", "__init__"}
RANK = {
    "data": 1,
    "models": 2,
    "training": 3,
    "experiments": 4,
    "tuning": 4,
    "analysis": 5,
    "report": 6,
    "cli": 7,
}


def _layer(module: str) -> str:
    """carebench.<top>... -> its layer name ("leaf" for the leaves)."""
    top = module.split(".")[1] if module.count(".") else "__init__"
    return "leaf" if top in LEAVES else top


def _rank(layer: str) -> int:
    return 0 if layer == "leaf" else RANK[layer]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        out.append((name, path))
    return out


def _imports(path: Path) -> set[str]:
    """Every carebench module imported anywhere in the file (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("carebench")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("carebench"):
            found.add(node.module)
            # `from carebench import runs` names a module of the package
            if node.module == "carebench":
                found.discard("carebench")
                found |= {f"carebench.{a.name}" for a in node.names if a.name != "__version__"}
    return found


def test_layers_point_one_way():
    wrong = []
    for name, path in _modules():
        mine = _layer(name)
        for imp in _imports(path):
            if imp == "carebench":
                continue
            theirs = _layer(imp)
            if mine == "leaf" and theirs != "leaf":
                wrong.append(f"{name} (a leaf) imports {imp}")
            elif _rank(theirs) > _rank(mine):
                wrong.append(f"{name} ({mine}) imports {imp} ({theirs})")
    assert wrong == []


def test_the_kernels_know_nothing_of_run_folders():
    for path in (SRC / "evaluation").glob("*.py"):
        imports = _imports(path)
        assert not any(i.startswith("carebench.runs") or i == "carebench.runs" for i in imports), path.name
        assert "read_parquet" not in path.read_text() and "glob(" not in path.read_text(), path.name


def _imported_modules(code: str) -> list[str]:
    """Modules Python imports for `code`, from `python -X importtime` in a fresh interpreter."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    return [
        line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")
    ]


def test_runs_data_and_kernels_do_not_import_lightning():
    mods = _imported_modules("import carebench.runs, carebench.data, carebench.evaluation")
    assert "carebench.runs" in mods and "carebench.evaluation" in mods  # the check sees what it should
    assert [m for m in mods if "lightning" in m] == []
    assert [m for m in mods if m.split(".")[0] == "torch"] == []  # not even torch


@pytest.mark.parametrize(
    "code",
    [
        "import carebench.tasks",
        "import carebench.training.config",  # read by the plan, the runner and the analysis
        "import carebench.experiments.plan",
        "import carebench.tuning, carebench.tuning.study, carebench.tuning.space",
        "import carebench.analysis.outputs, carebench.report",  # the report reads tables, never trains
        "import carebench.cli",  # `carebench --help` stays quick
    ],
)
def test_light_modules_do_not_import_lightning(code):
    assert [m for m in _imported_modules(code) if "lightning" in m] == []


def test_only_runs_py_names_the_finish_marker():
    """The run record has one definition: the marker's name appears in runs.py and nowhere else in src/."""
    assert 'DONE = "DONE"' in (SRC / "runs.py").read_text()
    others = [
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "runs.py" and "DONE" in p.read_text()
    ]
    assert others == [], "use runs.DONE / runs.is_done"


def test_no_comment_names_a_file_outside_the_repository():
    outside = ("DESIGN.md", "shared/reference", "reference notes", "carebench-notes", "missing-aware-methods")
    hits = []
    for root in (SRC, TESTS):
        for path in root.rglob("*.py"):
            if path == Path(__file__).resolve():
                continue
            text = path.read_text()
            hits += [f"{path.name}: {word}" for word in outside if word in text]
    assert hits == []


def test_fusion_modules_are_discovered_not_listed():
    from carebench.models import get_model_class, list_models

    files = {p.stem for p in (SRC / "models" / "fusion").glob("*.py") if not p.stem.startswith("_")}
    registered = {get_model_class(m).__module__.rsplit(".", 1)[1] for m in list_models()}
    assert files <= registered  # every file registers its method
    init = (SRC / "models" / "fusion" / "__init__.py").read_text()
    assert [f for f in files if f in init] == []  # and none is named by hand


# The MIMIC producer (data/mimic), the data files it reads (data/definitions) and the simulator that writes raw
# MIMIC-shaped tables (data/synthetic) may name MIMIC tables and columns; nothing else may, not even in a docstring
# or an example: everything after `prepare` reads only what a dataset's manifest declares (docs/dataset.md).
MIMIC_NAMES = (
    "hadm_id",
    "pheno_",
    "icustays",
    "chartevents",
    "labevents",
    "outputevents",
    "diagnoses_icd",
    "label_mortality",
    "label_los",
    "los_days",
    "race_group",
    "admission_type",
    "deathtime",
    "dischtime",
    "anchor_age",
    "itemid",
    "cxr_dicom_id",
    "cxr_view",
)
MIMIC_HOMES = ("data/mimic", "data/definitions", "data/synthetic")


def _generic_sources() -> list[Path]:
    files = [*SRC.rglob("*.py"), *SRC.rglob("*.j2"), *SRC.rglob("*.yaml")]
    return [p for p in files if not str(p.relative_to(SRC)).startswith(MIMIC_HOMES)]


def test_no_module_outside_the_mimic_producer_names_a_mimic_table_or_column():
    files = _generic_sources()
    assert any(p.name == "store.py" for p in files) and any(p.name == "analyze.py" for p in files)
    hits = [
        f"{p.relative_to(SRC)}:{i}: {name}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        for name in MIMIC_NAMES
        if name in line
    ]
    assert hits == []


def test_the_mimic_names_check_sees_what_it_should():
    """The list is real: the MIMIC producer names them (so the test above cannot pass by checking nothing)."""
    mimic = "\n".join(p.read_text() for p in (SRC / "data" / "mimic").rglob("*.py"))
    assert [n for n in MIMIC_NAMES if n not in mimic] == []
