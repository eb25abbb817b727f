"""`carebench report`: one self-contained HTML page (well formed, no scripts, no external URL, every image a
decodable PNG), every section, leaderboard cells equal to the analysis tables with the right significance marks,
CSV tables linked and identical, the planted-truth comparison, autoescaping, errors, and a headless Chromium
load without console errors, failed loads or broken images (Debian `chromium`; `make test` installs it)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from benchmark_fixture import train_runs, write_runs
from carebench.analysis import analyze as A
from carebench.analysis import outputs as O
from carebench.cli import app
from carebench.data.definitions import load_phenotypes
from carebench.report import browser, build_report
from carebench.report import figures as fg
from carebench.report import html as H
from carebench.report import tables as T
from carebench.tasks import get_task
from fake_dataset import make_fake_dataset
from html_tables import Tables as _Tables

torch.set_num_threads(2)
SECTIONS = [
    "cohort",
    "findings",
    "leaderboard",
    "fusion-gain",
    "missingness",
    "fairness",
    "modality",
    "planted",
    "tables",
]
VOID = {
    "meta",
    "img",
    "br",
    "hr",
    "link",
    "input",
    "col",
    "source",
    "wbr",
    "area",
    "base",
    "embed",
    "param",
    "track",
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = make_fake_dataset(root, n=150, image_size=16, n_features=4, seed=11)
    runs = root / "runs"
    write_runs(data, runs, folds=(1,), seeds=(0,))
    train_runs(data, runs, ["lstm", "latefusion"])
    kinds = ("ehr", "cxr", "both", "none")
    planted = {
        "phenotypes": {p.column: kinds[i % 4] for i, p in enumerate(load_phenotypes())},
        "subgroup": {
            "attribute": "race_group",
            "value": "WHITE",
            "degraded": "EHR effects scaled",
            "expected": "worse EHR models",
        },
    }
    (root / "planted.json").write_text(json.dumps(planted))
    A.analyze(
        runs, n_bootstrap=200, n_permutations=400, test_rates=[0.5], label_groups=str(root / "planted.json")
    )
    index = build_report(runs, planted=root / "planted.json")
    return runs, index, planted


class _Strict(HTMLParser):
    """Collects tags, attributes and text; fails on a close tag that does not match the open one."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def _parse(text: str) -> _Strict:
    p = _Strict()
    p.feed(text)
    p.close()
    return p


def test_files_and_csv_tables(bench):
    runs, index, _ = bench
    assert index == runs / "report" / "index.html" and index.is_file()
    html = index.read_text()
    links = re.findall(r'href="(tables/[^"]+)"', html)
    assert sorted(links) == sorted(f"tables/{n}.csv" for n in O.TABLES)
    for name in O.TABLES:
        assert (runs / "report" / "tables" / f"{name}.csv").read_bytes() == (
            runs / "analysis" / f"{name}.csv"
        ).read_bytes()
    assert not list(runs.glob(".report*"))


def test_html_is_well_formed_and_self_contained(bench):
    _, index, _ = bench
    html = index.read_text()
    p = _parse(html)
    assert not p.errors and p.stack == []
    tags = [t for t, _ in p.tags]
    assert "script" not in tags and "iframe" not in tags and "link" not in tags
    for _, attrs in p.tags:
        for key in ("src", "href"):
            v = attrs.get(key)
            if v is not None:
                assert not re.match(r"^(https?:)?//", v), v
                assert v.startswith(("#", "tables/", "data:image/png;base64,")), v
    assert "http://" not in html and "https://" not in html and "url(" not in html
    images = [a["src"] for t, a in p.tags if t == "img"]
    assert len(images) >= 5  # heatmap, curves, 2 fairness charts, ablation
    for src in images:
        png = base64.b64decode(src.split(",", 1)[1])
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
            assert im.format == "PNG"


def test_every_section_and_figure_is_there(bench):
    _, index, _ = bench
    html = index.read_text()
    ids = re.findall(r'<section id="([^"]+)"', html)
    assert [s for s in ids if s != "notes"] == SECTIONS
    tables = _Tables()
    tables.feed(html)
    for tid in (
        "cohort-overview",
        "cohort-folds",
        "cohort-labels",
        "leaderboard-mortality-base",
        "leaderboard-phenotype-base",
        "natural-mortality-base",
        "fairness-mortality-base",
        "ablation-mortality-base",
        "planted-table",
        "planted-subgroup",
        "degradation-mortality-base",
    ):
        assert tid in tables.tables and len(tables.tables[tid]) > 1, tid
    for alt in (
        "Fusion gain heatmap, Phenotype, base cohort",
        "Missingness curves, Mortality, base cohort",
        "Degradation per method, Mortality, base cohort",
        "Fairness gaps, Mortality, base cohort",
        "Modality ablation, Mortality, base cohort",
    ):
        assert f'alt="{alt}"' in html
    assert len(tables.tables["cohort-labels"]) == 1 + 1 + 7 + 25
    # the header states the sequential permutation tests the analysis made (default h = 50)
    assert re.search(r"up to 400 permutations per test \(sequential, stops after\s+50 as extreme\)", html)


def test_leaderboard_cells_equal_the_analysis_and_marks_follow_holm(bench):
    runs, index, _ = bench
    tables = _Tables()
    tables.feed(index.read_text())
    board = pd.read_parquet(runs / "analysis" / "leaderboard.parquet")
    comp = pd.read_parquet(runs / "analysis" / "comparisons.parquet")
    n_marks = 0
    for task in ("mortality", "phenotype"):
        rows = tables.tables[f"leaderboard-{task}-base"]
        header = [c for c, _ in rows[0]]
        metrics = get_task(task).reported  # the task's reported metrics, in order
        assert header == ["method", "modalities", "runs (seeds)", *[T.metric_name(m) for m in metrics]]
        b = board[(board.task == task) & (board.label == task)].set_index(["method", "metric"])
        assert len(rows) - 1 == b.index.get_level_values(0).nunique()
        ref = comp[(comp.task == task)].reference.iloc[0]
        for row in rows[1:]:
            method = row[0][0].replace(" (reference)", "")
            assert (row[0][0].endswith("(reference)")) == (method == ref)
            for (text, attrs), m in zip(row[3:], metrics, strict=True):
                r = b.loc[(method, m)]
                assert float(attrs["data-value"]) == pytest.approx(r.estimate, rel=1e-11, abs=1e-15)
                assert text.startswith(f"{r.estimate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
                c = comp[
                    (comp.task == task)
                    & (comp.comparison == "reference")
                    & (comp.label == task)
                    & (comp.metric == m)
                    & (comp.method_a == method)
                ]
                sig = len(c) == 1 and c.p_holm.item() < 0.05
                better = sig and (c.delta.item() > 0) != (m in T.LOWER_IS_BETTER)
                assert text.endswith(T.BETTER) == better and text.endswith(T.WORSE) == (sig and not better)
                n_marks += sig
    assert n_marks >= 1  # medfuse's planted advantage on phenotypes is significant


def test_planted_truth_comparison():
    labels = ["pheno_a", "pheno_b", "pheno_c", "pheno_d"]
    rows = []
    # per label: (EHR-only CI, X-ray-only CI)
    cis = {
        "pheno_a": ((0.7, 0.6, 0.8), (0.5, 0.4, 0.6)),
        "pheno_b": ((0.7, 0.6, 0.8), (0.7, 0.55, 0.8)),
        "pheno_c": ((0.52, 0.45, 0.6), (0.5, 0.4, 0.6)),
        "pheno_d": ((0.5, 0.4, 0.6), (0.49, 0.4, 0.6)),
    }
    for label in labels:
        for method, (est, lo, hi) in zip(("lstm", "resnet"), cis[label], strict=True):
            rows.append(
                {
                    "task": "phenotype",
                    "cohort": "base",
                    "label": label,
                    "metric": "auroc",
                    "method": method,
                    "estimate": est,
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    board = pd.DataFrame(rows)
    comp = pd.DataFrame(
        [
            {
                "task": "phenotype",
                "cohort": "base",
                "comparison": "reference",
                "metric": "auroc",
                "label": lab,
                "method_a": "medfuse",
                "method_b": "lstm",
                "delta": d,
                "p_holm": p,
            }
            for lab, d, p in (
                ("pheno_a", 0.01, 0.6),
                ("pheno_b", 0.0, 1.0),
                ("pheno_c", 0.2, 0.001),
                ("pheno_d", -0.01, 0.9),
            )
        ]
    )
    runs = pd.DataFrame({"model": ["lstm", "resnet", "medfuse"], "modalities": ["ehr", "cxr", "ehr+cxr"]})
    obs = T.planted_kinds(board, comp, runs).set_index("label")
    assert obs.observed.to_dict() == {
        "pheno_a": "ehr",
        "pheno_b": "both",
        "pheno_c": "both",
        "pheno_d": "none",
    }
    truth = {"phenotypes": {"pheno_a": "ehr", "pheno_b": "both", "pheno_c": "cxr", "pheno_d": "none"}}
    table, agree, compared = T.planted(truth, obs.reset_index())
    assert (agree, compared) == (3, 4)
    assert [r[-1].text for r in table.rows] == ["✓", "✓", "✗", "✓"]
    no_cxr = T.planted_kinds(board[board.method == "lstm"], comp, runs[runs.model != "resnet"])
    assert set(no_cxr.observed) == {"n/a"}


def test_planted_section_of_the_page(bench):
    _, index, planted = bench
    html = index.read_text()
    tables = _Tables()
    tables.feed(html)
    rows = tables.tables["planted-table"][1:]
    assert [r[0][0] for r in rows] == list(planted["phenotypes"])
    assert [r[1][0] for r in rows] == list(planted["phenotypes"].values())
    agree = sum(r[-1][0] == "✓" for r in rows)
    compared = sum(r[-1][0] in ("✓", "✗") for r in rows)
    assert f"{agree} of {compared}</strong> phenotypes" in html
    sub = tables.tables["planted-subgroup"][1:]
    assert {r[2][0] for r in sub} == {"lstm", "latefusion", "medfuse", "resnet"}
    # by planted kind: one row per group, label counts, and the significant fusion methods from the comparisons
    groups = tables.tables["planted-groups"][1:]
    assert [r[0][0] for r in groups] == ["ehr", "cxr", "both", "none"]
    assert [r[1][0] for r in groups] == ["7", "6", "6", "6"]
    comp = O.load_analysis(bench[0])[0]["comparisons"]
    fam = comp[comp.family == "phenotype:reference:auroc_macro:group"]
    for r in groups:
        rows = fam[fam.label == "group:" + r[0][0]]
        sig = rows[(rows.p_holm < 0.05) & (rows.delta > 0)]
        assert r[5][0] == ", ".join(sorted(set(rows.method_b)))
        assert (r[6][0] == "none") == sig.empty and all(m in r[6][0] for m in sig.method_a)
    # the fusion-gain section shows the same table for any label groups, planted or not
    assert tables.tables["label-groups-base"] == tables.tables["planted-groups"]


def test_findings_section_shows_the_findings_table(bench):
    runs, index, _ = bench
    html = index.read_text()
    tables = _Tables()
    tables.feed(html)
    f = O.load_analysis(runs)[0]["findings"]
    rows = tables.tables["findings-table"]
    assert [c[0] for c in rows[0]][:5] == ["#", "task", "cohort", "finding", "verdict"]
    assert [(r[0][0], r[1][0], r[4][0]) for r in rows[1:]] == [
        (str(n), t, v) for n, t, v in zip(f.finding, f.task, f.verdict, strict=True)
    ]
    assert [r[1][0] for r in rows[1:]] == ["mortality"] * 4 + ["phenotype"] * 4  # task order of the report
    for r, (_, row) in zip(rows[1:], f.iterrows(), strict=True):
        if pd.notna(row.effect):
            assert float(r[5][1]["data-value"]) == pytest.approx(row.effect, abs=1e-11)
        css = {"supported": "sig", "not supported": "worse"}.get(row.verdict)
        assert (r[4][1].get("class") == css) if css else "class" not in r[4][1]
    assert "stay_id" not in " ".join(c[0] + str(c[1]) for r in rows for c in r)  # aggregates only
    assert 'href="tables/findings.csv"' in html
    # the planted-truth part: only finding 1 on phenotypes is decided (kinds include "both")
    planted = tables.tables["planted-findings"][1:]
    assert len(planted) == len(f)
    decided = [r for r in planted if not r[3][0].startswith("not decided")]
    assert [(r[0][0], r[1][0]) for r in decided] == [("1", "phenotype")]


def _finding_rows(*rows):
    cols = {"finding": 1, "task": "phenotype", "cohort": "base", "verdict": "supported", "labels": ""}
    return pd.DataFrame([{**cols, **r} for r in rows])


def test_planted_findings_decides_finding_1_on_phenotypes_only():
    truth = {"phenotypes": {"pheno_a": "both", "pheno_b": "none", "pheno_c": "ehr"}}
    t = _finding_rows(
        {"labels": "pheno_a;pheno_c"},  # agrees
        {"labels": "pheno_a;pheno_b", "cohort": "matched"},  # a 'none' label: disagrees
        {"verdict": "not supported", "cohort": "x"},  # disagrees
        {"verdict": "undetermined (too few runs)", "cohort": "y"},  # not compared
        {"task": "mortality"},  # not decided
        {"finding": 2},  # not decided
    )
    table, agree, compared = T.planted_findings(truth, t, "phenotype")
    assert (agree, compared) == (1, 3)
    assert [r[-1].text for r in table.rows] == ["✓", "✗", "✗", "", "", ""]
    assert "'none' phenotypes: pheno_b" in table.rows[1][4].text
    assert table.rows[4][3].text.startswith("not decided") and table.rows[5][3].text == T.NOT_DECIDED[2]
    no_both = T.planted_findings({"phenotypes": {"pheno_a": "ehr"}}, t, "phenotype")
    assert no_both[1:] == (0, 0)


def test_autoescaping_of_data(bench):
    runs, _, _ = bench
    tables, summary = O.load_analysis(runs)
    evil = "<b onmouseover=x>lstm</b>"
    for name in O.TABLES:
        t = tables[name].copy()
        for col in ("method", "method_a", "method_b", "reference", "model"):
            if col in t:
                t[col] = t[col].replace("lstm", evil)
        tables[name] = t
    html = H.render(H.build_page(tables, summary))
    assert evil not in html and "&lt;b onmouseover=x&gt;lstm&lt;/b&gt;" in html
    assert not _parse(html).errors


def test_errors(tmp_path, bench):
    runs, _, _ = bench
    with pytest.raises(A.AnalysisError, match="carebench analyze"):
        build_report(tmp_path)
    bad = tmp_path / "planted.json"
    bad.write_text(json.dumps({"phenotypes": {"pheno_shock": "lungs"}}))
    with pytest.raises(H.ReportError, match="ehr, cxr, both or none"):
        build_report(runs, planted=bad, out=tmp_path / "r")
    bad.write_text("{not json")
    with pytest.raises(H.ReportError, match="--planted"):
        build_report(runs, planted=bad, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert (
        res.exit_code == 2 and "carebench analyze" in res.output and len(res.output.strip().splitlines()) == 1
    )
    ok = CliRunner().invoke(app, ["report", str(runs), "--out", str(tmp_path / "cli")])
    assert ok.exit_code == 0 and (tmp_path / "cli" / "index.html").is_file()


def test_headless_chromium_loads_the_page_without_errors(bench, tmp_path):
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "Debian package `chromium` is not installed: run `make test` (it installs it) or "
            "`apt-get install -y chromium`"
        )
    _, index, _ = bench
    # the detector works: a broken page is caught
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<html><body><img src="missing.png"><script>console.error("boom"); nope();</script></body></html>'
    )
    bad = browser.check_page(broken, chromium=exe)
    assert any("boom" in e for e in bad.errors) and any("nope" in e for e in bad.errors)
    assert any("failed load" in e for e in bad.errors) and bad.probe["broken_images"] == 1

    shot = tmp_path / "report.png"
    check = browser.check_page(index, screenshot=shot, chromium=exe)
    assert check.errors == []
    assert not [lvl for lvl, _ in check.console]  # the page logs nothing at all
    n_img = index.read_text().count("<img ")
    assert check.probe["images"] == n_img and check.probe["broken_images"] == 0
    assert check.probe["scripts"] == 0 and check.probe["title"].startswith("carebench report")
    assert [s for s in check.probe["sections"] if s != "notes"] == SECTIONS
    assert all(u.startswith(("file://", "data:image/png")) for u in check.requests)
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        assert np.asarray(im.convert("L")).std() > 10  # a rendered page, not a blank image


def test_a_stale_analysis_is_noted(bench):
    runs, _, _ = bench
    _, summary = O.load_analysis(runs)
    assert H.stale_notes(runs, summary) == []
    older = dict(summary, run_ids=[*summary["run_ids"][1:], "lstm_mortality_f9_s0_000000000000"])
    new, gone = H.stale_notes(runs, older)
    assert "1 run(s) finished after the analysis" in new and summary["run_ids"][0] in new
    assert "lstm_mortality_f9_s0_000000000000" in gone


def _curves_frame() -> pd.DataFrame:
    """Known test-time missingness curves: lstm (EHR only, flat), two X-ray methods at two train rates."""
    rows = []
    values = {
        ("lstm", 0.0): [0.70, 0.70, 0.70],
        ("zeta", 0.0): [0.80, 0.74, 0.68],  # missing-aware: degradation 0.80 - 0.71 = 0.09
        ("zeta", 0.5): [0.78, 0.76, 0.74],  # 0.78 - 0.75 = 0.03
        ("alpha", 0.0): [0.82, 0.70, 0.58],  # other: 0.82 - 0.64 = 0.18
    }
    for (method, tr), vs in values.items():
        for rate, v in zip((0.0, 0.5, 0.9), vs, strict=True):
            rows.append({"task": "phenotype", "cohort": "base", "method": method, "uses_cxr": method != "lstm",
                         "train_rate": tr, "rate": rate, "metric": "auroc_macro", "value": v,
                         "ci_low": v - 0.02, "ci_high": v + 0.02})  # fmt: skip
    return pd.DataFrame(rows)


def test_degradation_table_and_per_method_panels_mark_the_missing_aware_methods():
    curves = _curves_frame()
    # panel order: missing-aware first, then the others; EHR-only methods get no panel
    assert fg.method_panels(curves, ["zeta"]) == ["zeta", "alpha"]
    assert fg.method_panels(curves, []) == ["alpha", "zeta"]
    table = T.degradation(curves, "phenotype", "base", "auroc_macro", ["zeta"])
    cells = [[c.text for c in row] for row in table.rows]
    assert [row[:3] for row in cells] == [
        ["zeta", "yes", "0% missing"],
        ["alpha", "no", "0% missing"],
        ["zeta", "yes", "50% missing"],
    ]
    drops = [row[-1].value for row in table.rows]
    np.testing.assert_allclose(drops, [0.09, 0.18, 0.03], atol=1e-12)
    assert [row[4].value for row in table.rows] == [0.68, 0.58, 0.74]  # at the largest test rate (90 %)
    png = fg.method_missingness_curves(curves, "phenotype", "base", "auroc_macro", ["zeta"])
    img = Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1])))
    assert img.format == "PNG" and img.size[0] > img.size[1]
    only_ehr = curves[curves["method"] == "lstm"]
    assert fg.method_missingness_curves(only_ehr, "phenotype", "base", "auroc_macro", []) is None
    assert T.degradation(only_ehr, "phenotype", "base", "auroc_macro").rows == []
