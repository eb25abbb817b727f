"""Cross-check `prepare --meds` against `prepare --mimic-iv` on the real MIMIC-IV demo (docs/dataset.md, "MEDS").

    python benchmarks/meds_crosscheck.py --demo ../shared/data/mimic-iv-demo-2.2 --out /tmp/meds-crosscheck

1. The MEDS ecosystem's own tools run in a separate virtual environment (--etl-venv, created from
   benchmarks/meds/requirements-etl.txt when missing): the MIMIC-IV MEDS ETL (`meds-extract-run spec=MIMIC-IV`,
   PyPI MIMIC-IV-MEDS) converts the demo to MEDS, then ACES writes in-ICU mortality labels at 48 h
   (benchmarks/meds/icu_mortality_48h.yaml).
   The ETL reads ten concept maps of MIT-LCP/mimic-code as code metadata; without internet they are replaced by
   header-only stand-ins unless --concept-maps names a directory holding the real files (their sha256 is checked
   against the ETL's pins). The stand-ins change metadata/codes.parquet only (descriptions, parent codes), never
   the events in data/ (verified byte for byte; docs/dataset.md).
2. `carebench prepare --meds` (shipped spec `mimic-iv`) and `carebench prepare --mimic-iv` on the same demo.
3. The same with the two documented differences removed, one at a time and both: the MEDS prediction time moved
   1 microsecond earlier (window_aligned: the MEDS window (pt - 48 h, pt] then equals MIMIC's [intime,
   intime + 48 h) on second-resolution data) and MIMIC labevents timed at storetime (lab_time_aligned: the ETL
   times lab results at storetime, carebench at charttime).
4. Comparison: stays matched by (subject_id, prediction_time = intime + 48 h), labels, age/gender, and per
   feature the cells observed by either side, by both, and those that agree (both empty, or both observed and
   equal within rtol 1e-5 / atol 1e-6: float32 values), with the largest absolute difference.

Prints a table and writes OUT/crosscheck.json. Exit status 0 even when figures differ: it measures, the test
(tests/test_meds_crosscheck.py) pins the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "meds"
DEFAULT_DEMO = REPO.parent / "shared" / "data" / "mimic-iv-demo-2.2"
TASK = "icu_mortality_48h"
# The concept maps the ETL spec reads as code metadata, with the columns it uses (header-only stand-ins).
CONCEPT_MAPS = (
    "d_labitems_to_loinc",
    "inputevents_to_rxnorm",
    "lab_itemid_to_loinc",
    "meas_chartevents_main",
    "meas_chartevents_value",
    "numerics-summary",
    "outputevents_to_loinc",
    "proc_datetimeevents",
    "proc_itemid",
    "waveforms-summary",
)
STANDIN_HEADER = "itemid (omop_source_code),label,omop_concept_name,omop_vocabulary_id,omop_concept_code\n"
RTOL, ATOL = 1e-5, 1e-6


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return round(time.perf_counter() - t0, 1)


def ensure_etl_venv(venv: Path) -> Path:
    """The ETL's own environment; created once from requirements-etl.txt (PyPI)."""
    bin_dir = venv / "bin"
    if not (bin_dir / "meds-extract-run").exists() or not (bin_dir / "aces-cli").exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(bin_dir / "pip"), "install", "--quiet", "-r", str(HERE / "requirements-etl.txt")], check=True
        )
    return bin_dir


def etl_versions(bin_dir: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
        "['MIMIC-IV-MEDS', 'MEDS-extract', 'MEDS-transforms', 'es-aces', 'meds', 'polars']}))"
    )
    out = subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def etl_spec_pins(bin_dir: Path) -> dict[str, str]:
    """rel_path -> sha256 of the concept maps, as pinned in the installed ETL spec."""
    code = (
        "import importlib.resources as r, json, yaml; "
        "s = yaml.safe_load(r.files('MIMIC_IV_MEDS').joinpath('event_configs.yaml').read_text()); "
        "print(json.dumps({u['rel_path']: u['sha256'] for e in s['sources']['common'] for u in e['urls']}))"
    )
    out = subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def raw_input(demo: Path, dest: Path, concept_maps: Path | None, pins: dict[str, str]) -> str:
    """ETL input: the demo's hosp/ and icu/ (symlinked, read-only) plus the concept maps."""
    dest.mkdir(parents=True)
    for module in ("hosp", "icu"):
        os.symlink(demo / module, dest / module)
    for name in CONCEPT_MAPS:
        target = dest / f"{name}.csv"
        if concept_maps is not None:
            src = concept_maps / f"{name}.csv"
            digest = hashlib.sha256(src.read_bytes()).hexdigest()
            if pins.get(target.name) != digest:
                raise SystemExit(f"{src}: sha256 {digest} differs from the ETL's pin {pins.get(target.name)}")
            shutil.copyfile(src, target)
        else:
            target.write_text(STANDIN_HEADER)
    return "real (sha256 checked)" if concept_maps is not None else "header-only stand-ins"


def storetime_root(demo: Path, dest: Path) -> None:
    """The demo with hosp/labevents' charttime replaced by its storetime (the time the ETL gives lab results)."""
    for module in ("hosp", "icu"):
        (dest / module).mkdir(parents=True)
        for f in (demo / module).iterdir():
            if f.name != "labevents.csv.gz":
                os.symlink(f, dest / module / f.name)
    src = str(demo / "hosp" / "labevents.csv.gz").replace("'", "''")
    out = str(dest / "hosp" / "labevents.csv.gz").replace("'", "''")
    duckdb.connect().execute(
        f"COPY (SELECT * REPLACE (storetime AS charttime) FROM read_csv('{src}', all_varchar = true)) "
        f"TO '{out}' (HEADER, COMPRESSION gzip)"
    )


def shift_labels(src: Path, dst: Path, microseconds: int) -> None:
    t = pq.read_table(src)
    pt = t.column("prediction_time").cast(pa.int64()).to_numpy() - microseconds
    t = t.set_column(
        t.schema.get_field_index("prediction_time"),
        "prediction_time",
        pa.array(pt, pa.int64()).cast(pa.timestamp("us")),
    )
    pq.write_table(t, dst)


def carebench(args: list[str], log: Path) -> float:
    code = "import sys; from carebench.cli import app; sys.argv = ['carebench', *sys.argv[1:]]; app()"
    return run([sys.executable, "-c", code, *args], log)


def compare(mimic_dir: Path, meds_dir: Path, shift_us: int) -> dict:
    from carebench.data.store import open_dataset

    m, s = open_dataset(mimic_dir, mmap=False), open_dataset(meds_dir, mmap=False)
    mc = m.cohort.reset_index(names="row")
    sc = s.cohort.reset_index(names="row")
    mc["pt"] = (mc["intime"] + pd.Timedelta(hours=48) - pd.Timedelta(microseconds=shift_us)).astype(
        "datetime64[us]"
    )
    sc["pt"] = sc["prediction_time"].astype("datetime64[us]")
    j = mc.merge(sc, on=["subject_id", "pt"], how="outer", suffixes=("_mimic", "_meds"), indicator=True)
    both = j[j["_merge"] == "both"]
    out: dict = {
        "stays_mimic": len(mc),
        "rows_meds": len(sc),
        "matched": len(both),
        "only_mimic": int((j["_merge"] == "left_only").sum()),
        "only_meds": int((j["_merge"] == "right_only").sum()),
        "labels_agree": int((both["label_mortality_mimic"] == both["label_mortality_meds"]).sum()),
        "deaths_mimic": int(both["label_mortality_mimic"].sum()),
        "deaths_meds": int(both["label_mortality_meds"].sum()),
        "age_agree": int((both["age_mimic"] == both["age_meds"]).sum()),
        "gender_agree": int((both["gender_mimic"] == both["gender_meds"]).sum()),
        "age_mismatches": [
            {
                "subject_id": int(r.subject_id),
                "intime": str(r.intime),
                "age_mimic": int(r.age_mimic),
                "age_meds": int(r.age_meds),
            }
            for r in both[both["age_mimic"] != both["age_meds"]].itertuples()
        ],
    }
    if list(m.manifest["features"]) != list(s.manifest["features"]):
        raise SystemExit("the two datasets have different feature lists")
    a_all = np.asarray(m.ehr)[both["row_mimic"].to_numpy()]
    b_all = np.asarray(s.ehr)[both["row_meds"].to_numpy()]
    feats, total = {}, {"cells": 0, "agree": 0, "observed_either": 0, "observed_agree": 0}
    for k, f in enumerate(m.manifest["features"]):
        a, b = a_all[:, :, k], b_all[:, :, k]
        oa, ob = ~np.isnan(a), ~np.isnan(b)
        ob_both = oa & ob
        close = np.isclose(np.nan_to_num(a), np.nan_to_num(b), rtol=RTOL, atol=ATOL)
        agree = (~oa & ~ob) | (ob_both & close)
        diff = np.abs(a[ob_both].astype(np.float64) - b[ob_both].astype(np.float64))
        either = oa | ob
        feats[f] = {
            "observed_mimic": int(oa.sum()),
            "observed_meds": int(ob.sum()),
            "observed_both": int(ob_both.sum()),
            "observed_either": int(either.sum()),
            "agree_observed": int((agree & either).sum()),
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        }
        total["cells"] += a.size
        total["agree"] += int(agree.sum())
        total["observed_either"] += int(either.sum())
        total["observed_agree"] += int((agree & either).sum())
    out["features"] = feats
    out["total"] = total
    return out


def table(res: dict) -> str:
    lines = [
        "| feature | observed MIMIC | observed MEDS | both | agree / either | max abs diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f, r in res["features"].items():
        lines.append(
            f"| {f} | {r['observed_mimic']} | {r['observed_meds']} | {r['observed_both']} | "
            f"{r['agree_observed']} / {r['observed_either']} | {r['max_abs_diff']:.3g} |"
        )
    t = res["total"]
    lines.append(f"| all | | | | {t['observed_agree']} / {t['observed_either']} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=DEFAULT_DEMO, help="MIMIC-IV demo root (hosp/, icu/)")
    ap.add_argument("--out", type=Path, required=True, help="working directory (must not exist)")
    ap.add_argument("--etl-venv", type=Path, default=REPO / ".venv-meds-etl", help="the ETL's virtualenv")
    ap.add_argument("--concept-maps", type=Path, default=None, help="directory with the real concept maps")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True)
    logs = out / "logs"
    logs.mkdir()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    bin_dir = ensure_etl_venv(args.etl_venv.absolute())
    timings["etl_venv"] = round(time.perf_counter() - t0, 1)
    versions = etl_versions(bin_dir)
    maps = raw_input(args.demo.absolute(), out / "raw-input", args.concept_maps, etl_spec_pins(bin_dir))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    meds_root = out / "meds"
    timings["etl"] = run(
        [
            str(bin_dir / "meds-extract-run"),
            "spec=MIMIC-IV",
            f"output_dir={meds_root}",
            "do_download=false",
            f"input_dir={out / 'raw-input'}",
            "dataset_key=demo",
        ],
        logs / "etl.log",
        env,
    )
    labels = out / "labels"
    labels.mkdir()
    timings["aces"] = run(
        [
            str(bin_dir / "aces-cli"),
            f"data.path={meds_root / 'data'}",
            "data.standard=meds",
            f"cohort_dir={HERE}",
            f"cohort_name={TASK}",
            f"output_filepath={labels / 'mortality.parquet'}",
            f"log_dir={logs / 'aces'}",
            f"hydra.run.dir={logs / 'aces'}",
        ],
        logs / "aces.log",
        env,
    )
    shift_labels(labels / "mortality.parquet", labels / "mortality_minus_1us.parquet", 1)
    storetime_root(args.demo.absolute(), out / "mimic-storetime")

    common = ["--threads", "2", "--memory-limit", "2GB"]
    timings["prepare_meds"] = carebench(
        [
            "prepare",
            "--meds",
            str(meds_root),
            "--labels",
            f"mortality={labels / 'mortality.parquet'}",
            "--feature-spec",
            "mimic-iv",
            "--out",
            str(out / "data-meds"),
            *common,
        ],
        logs / "prepare-meds.log",
    )
    timings["prepare_mimic"] = carebench(
        ["prepare", "--mimic-iv", str(args.demo.absolute()), "--out", str(out / "data-mimic"), *common],
        logs / "prepare-mimic.log",
    )
    carebench(
        [
            "prepare",
            "--meds",
            str(meds_root),
            "--labels",
            f"mortality={labels / 'mortality_minus_1us.parquet'}",
            "--feature-spec",
            "mimic-iv",
            "--out",
            str(out / "data-meds-minus-1us"),
            *common,
        ],
        logs / "prepare-meds-shifted.log",
    )
    carebench(
        [
            "prepare",
            "--mimic-iv",
            str(out / "mimic-storetime"),
            "--out",
            str(out / "data-mimic-storetime"),
            *common,
        ],
        logs / "prepare-mimic-storetime.log",
    )
    meds_files = sorted((meds_root / "data").rglob("*.parquet"))
    result = {
        "etl": {
            "versions": versions,
            "concept_maps": maps,
            "meds_dataset": json.loads((meds_root / "metadata" / "dataset.json").read_text()),
            "events": int(sum(pq.ParquetFile(f).metadata.num_rows for f in meds_files)),
            "data_sha256": {
                str(f.relative_to(meds_root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in meds_files
            },
        },
        "labels": {
            "rows": pq.ParquetFile(labels / "mortality.parquet").metadata.num_rows,
            "positive": int(
                pq.read_table(labels / "mortality.parquet").column("boolean_value").to_numpy().sum()
            ),
        },
        "as_is": compare(out / "data-mimic", out / "data-meds", 0),
        "window_aligned": compare(out / "data-mimic", out / "data-meds-minus-1us", 1),
        "lab_time_aligned": compare(out / "data-mimic-storetime", out / "data-meds", 0),
        "both_aligned": compare(out / "data-mimic-storetime", out / "data-meds-minus-1us", 1),
        "timings_s": timings,
    }
    (out / "crosscheck.json").write_text(json.dumps(result, indent=2) + "\n")
    for name in ("as_is", "window_aligned", "lab_time_aligned", "both_aligned"):
        r = result[name]
        print(
            f"\n## {name}: {r['matched']} stays matched of {r['stays_mimic']} (MIMIC) / {r['rows_meds']} (MEDS); "
            f"labels agree {r['labels_agree']}/{r['matched']}; age {r['age_agree']}, gender {r['gender_agree']}"
        )
        print(table(r))
    print(f"\n{out / 'crosscheck.json'}")


if __name__ == "__main__":
    main()
