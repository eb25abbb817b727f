"""`carebench synth`: write a synthetic MIMIC-IV + MIMIC-CXR-JPG raw tree with a planted ground truth.

Output (docs/synthetic.md):
  RAW/mimic-iv/hosp/{patients,admissions,diagnoses_icd,labevents,d_labitems}.csv.gz
  RAW/mimic-iv/icu/{icustays,chartevents,outputevents,d_items}.csv.gz
  RAW/mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz and files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg
  RAW/planted.json        the truth: kind and rule of every phenotype, subgroup, missingness, parameters
  RAW/planted_stays.csv.gz  the latent state of every ICU stay (for checking, never read by prepare)

Streaming and determinism: stays are generated in chunks of CHUNK_STAYS. Chunk c draws only from generators
seeded by (seed, c), renders its own images and returns its rows as compressed CSV members, which the parent
appends in chunk order; so the output is byte-identical for a seed whatever the number of workers, and memory
depends on the chunk size, not on the number of stays. Everything is built under a temporary sibling directory
and renamed into place at the end.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from carebench import __version__
from carebench.data.definitions import load_phenotypes
from carebench.data.store import atomic_output_dir
from carebench.data.synthetic import charting, codes, conditions, population, signals, studies, tables
from carebench.data.synthetic.options import SYNTH
from carebench.data.synthetic.writer import HEADERS, GzipCsvFiles, csv_member, dictionary_members
from carebench.errors import UserError

GENERATOR_VERSION = "1.0.0"
CHUNK_STAYS = 1000
MAX_STAYS = 1_000_000
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 2048
MIMIC_IV = "mimic-iv"
MIMIC_CXR = "mimic-cxr-jpg"
PLANTED = "planted.json"
PLANTED_STAYS = "planted_stays.csv.gz"


class SynthError(UserError, ValueError):
    """A bad `carebench synth` option; the message names the option and what was expected."""


@dataclass(frozen=True)
class SynthConfig:
    stays: int
    seed: int
    image_size: int = 512
    cxr_rate: float = 0.3
    chunk_stays: int = CHUNK_STAYS  # part of the output's identity (ids and streams derive from chunks)


@dataclass
class SynthResult:
    path: Path
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def validate(cfg: SynthConfig, workers: int) -> None:
    def bad(option: str, value: object, expected: str) -> SynthError:
        return SynthError(f"{option} {value!r}: expected {expected}")

    if (
        isinstance(cfg.stays, bool)
        or not isinstance(cfg.stays, int | np.integer)
        or not 1 <= cfg.stays <= MAX_STAYS
    ):
        raise bad("--stays", cfg.stays, f"an integer number of ICU stays in 1..{MAX_STAYS}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int | np.integer) or cfg.seed < 0:
        raise bad("--seed", cfg.seed, "an integer >= 0")
    if (
        isinstance(cfg.image_size, bool)
        or not isinstance(cfg.image_size, int | np.integer)
        or not MIN_IMAGE_SIZE <= cfg.image_size <= MAX_IMAGE_SIZE
    ):
        raise bad(
            "--image-size",
            cfg.image_size,
            f"an integer number of pixels in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}",
        )
    if not isinstance(cfg.cxr_rate, float | int) or not 0.01 <= float(cfg.cxr_rate) <= 0.95:
        raise bad("--cxr-rate", cfg.cxr_rate, "a share of stays with an X-ray in the window, in 0.01..0.95")
    if (
        isinstance(cfg.chunk_stays, bool)
        or not isinstance(cfg.chunk_stays, int)
        or not 1 <= cfg.chunk_stays <= 10_000
    ):
        raise bad("chunk_stays", cfg.chunk_stays, "an integer in 1..10000")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise bad("--workers", workers, "an integer >= 1")


@dataclass(frozen=True)
class _Task:
    cfg: SynthConfig
    chunk: int
    n_stays: int
    alpha: float
    pools: dict
    root: str


def _chunk_rngs(seed: int, chunk: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, chunk]).spawn(n)]


def generate_chunk(task: _Task) -> dict:
    """Simulate one chunk: returns {'members': {file: gzip member}, 'summary': counts}; writes its images."""
    cfg, chunk = task.cfg, task.chunk
    first = chunk * cfg.chunk_stays
    r_pop, r_sig, r_chart, r_lab, r_out, r_dx, r_cxr, r_tab = _chunk_rngs(cfg.seed, chunk, 8)
    pop = population.sample_population(r_pop, task.n_stays, first)
    sig = signals.build_signals(r_sig, pop)
    chart = charting.chart_events(r_chart, pop, sig)
    labs = charting.lab_events(r_lab, pop, sig)
    outputs = charting.output_events(r_out, pop, sig)
    del sig
    dx = codes.diagnoses(r_dx, pop.latent.labels, pop.icd_version, task.pools)

    findings = studies.admission_findings(r_cxr, pop)
    images = studies.plan_studies(r_cxr, pop, task.alpha, first)
    dicom = studies.dicom_ids(r_cxr, len(images.stay))
    study_id = population.scramble(images.study, 50_000_000, 5)
    subject = pop.stay_subject_id()[images.stay]
    root = Path(task.root) / MIMIC_CXR
    paths = [
        root / studies.image_relpath(s, st, d) for s, st, d in zip(subject, study_id, dicom, strict=True)
    ]
    studies.render_chunk(images, pop, findings, paths, cfg.seed, chunk, cfg.image_size, r_cxr)
    date, tod = studies.study_date_time(images.time_ms)
    frontal_in_window = (images.study % studies.MAX_STUDIES_PER_STAY == 0) & (images.view != "LATERAL")
    cxr_in_window = np.zeros(pop.n_stays, dtype=bool)
    cxr_in_window[images.stay[frontal_in_window]] = True

    built = {
        f"{MIMIC_IV}/hosp/patients.csv.gz": tables.patients(pop),
        f"{MIMIC_IV}/hosp/admissions.csv.gz": tables.admissions(r_tab, pop),
        f"{MIMIC_IV}/hosp/diagnoses_icd.csv.gz": tables.diagnoses(pop, dx),
        f"{MIMIC_IV}/hosp/labevents.csv.gz": tables.labevents(r_tab, pop, labs, first * 10_000 + 1),
        f"{MIMIC_IV}/icu/icustays.csv.gz": tables.icustays(pop),
        f"{MIMIC_IV}/icu/chartevents.csv.gz": tables.chartevents(r_tab, pop, chart),
        f"{MIMIC_IV}/icu/outputevents.csv.gz": tables.outputevents(r_tab, pop, outputs),
        f"{MIMIC_CXR}/mimic-cxr-2.0.0-metadata.csv.gz": tables.cxr_metadata(
            subject, study_id, dicom, images.view, date, tod, cfg.image_size
        ),
        PLANTED_STAYS: tables.planted_stays(pop, cxr_in_window),
    }
    members = {name: csv_member(t, HEADERS[name]) for name, t in built.items()}
    planted_cols = tuple(built[PLANTED_STAYS].column_names)

    age = built[PLANTED_STAYS].column("age").to_numpy()
    los_h = (pop.outtime - pop.intime) / population.HOUR
    cohort = (age >= 18) & (los_h >= 48)
    labels = pop.latent.labels[pop.stay_adm]
    summary = {
        "stays": pop.n_stays,
        "subjects": len(pop.subject_id),
        "admissions": len(pop.hadm_id),
        "minor_stays": int((age < 18).sum()),
        "short_stays": int((los_h < 48).sum()),
        "cohort_stays": int(cohort.sum()),
        "cohort_icu_deaths": int((cohort & pop.died_in_icu).sum()),
        "cohort_with_cxr": int((cohort & cxr_in_window).sum()),
        "images": len(images.stay),
        "icd10_admissions": int((pop.icd_version == 10).sum()),
        "cohort_subgroup": int((cohort & pop.subgroup[pop.stay_subject]).sum()),
        "chartevents_rows": built[f"{MIMIC_IV}/icu/chartevents.csv.gz"].num_rows,
        "labevents_rows": built[f"{MIMIC_IV}/hosp/labevents.csv.gz"].num_rows,
        "outputevents_rows": built[f"{MIMIC_IV}/icu/outputevents.csv.gz"].num_rows,
        "label_counts": labels[cohort].sum(axis=0).astype(int).tolist(),
    }
    return {"members": members, "summary": summary, "planted_columns": planted_cols}


def _tasks(cfg: SynthConfig, alpha: float, pools: dict, root: Path) -> Iterator[_Task]:
    n_chunks = -(-cfg.stays // cfg.chunk_stays)
    for c in range(n_chunks):
        yield _Task(cfg, c, min(cfg.chunk_stays, cfg.stays - c * cfg.chunk_stays), alpha, pools, str(root))


def synthesize(
    out: str | Path,
    *,
    stays: int,
    seed: int,
    image_size: int = SYNTH.image_size,
    cxr_rate: float = SYNTH.cxr_rate,
    workers: int = SYNTH.workers,
    overwrite: bool = False,
    chunk_stays: int = CHUNK_STAYS,
    progress: Callable[[int, int], None] | None = None,
) -> SynthResult:
    """Write the synthetic raw tree at `out` (atomically) and return its path and realised counts.

    The files depend on (stays, seed, image_size, cxr_rate, chunk_stays) only, never on `workers`.
    """
    cfg = SynthConfig(
        stays=stays,
        seed=seed,
        image_size=image_size,
        cxr_rate=float(cxr_rate) if isinstance(cxr_rate, int | float) else cxr_rate,
        chunk_stays=chunk_stays,
    )
    validate(cfg, workers)
    conditions.check_plan()
    started = time.perf_counter()
    pools = codes.code_pools()
    alpha = studies.solve_intercept(cfg.cxr_rate)
    n_chunks = -(-cfg.stays // cfg.chunk_stays)
    totals: dict[str, int] = {}
    label_counts = np.zeros(len(load_phenotypes()), dtype=np.int64)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        files = GzipCsvFiles(tmp)
        try:
            for name, member in dictionary_members().items():
                files.append(name, member, HEADERS[name])
            tasks = _tasks(cfg, alpha, pools, tmp)
            if workers == 1 or n_chunks == 1:
                results: Iterator[dict] = map(generate_chunk, tasks)
                pool = None
            else:
                pool = mp.get_context("spawn").Pool(min(workers, n_chunks))
                results = pool.imap(generate_chunk, tasks)
            try:
                for done, res in enumerate(results, start=1):
                    for name, member in res["members"].items():
                        files.append(name, member, HEADERS[name] or res["planted_columns"])
                    summary = res["summary"]
                    label_counts += np.asarray(summary.pop("label_counts"), dtype=np.int64)
                    for k, v in summary.items():
                        totals[k] = totals.get(k, 0) + int(v)
                    if progress is not None:
                        progress(done, n_chunks)
            finally:
                if pool is not None:
                    pool.close()
                    pool.join()
        finally:
            files.close()
        seconds = time.perf_counter() - started
        planted = planted_truth(cfg, alpha, totals, label_counts)
        (tmp / PLANTED).write_text(json.dumps(planted, indent=2) + "\n")
    return SynthResult(path=Path(out).absolute(), counts=totals, seconds=seconds)


def planted_truth(cfg: SynthConfig, alpha: float, totals: dict[str, int], label_counts: np.ndarray) -> dict:
    """planted.json: everything a reader needs to know what was planted (deterministic: no timings)."""
    phenos = load_phenotypes()
    cohort = max(totals.get("cohort_stays", 0), 1)
    rules = conditions.plan_for_planted()
    return {
        "generator": "carebench synth",
        "generator_version": GENERATOR_VERSION,
        "carebench_version": __version__,
        "seed": cfg.seed,
        "parameters": asdict(cfg),
        "phenotypes": {p.column: rules[p.column]["kind"] for p in phenos},
        "phenotype_rules": {p.column: {**rules[p.column], "ccs": p.ccs} for p in phenos},
        "kinds": {
            "ehr": "label drives only EHR signals (vitals, labs, urine); nothing on the X-ray depends on it",
            "cxr": "label drives only X-ray findings; nothing in the EHR depends on it",
            "both": "label is AND / AND-NOT / XOR of an EHR-visible marker and an X-ray finding",
            "none": "independent coin flip, unrelated to anything observable",
        },
        "latent_model": {
            "ehr_side": list(conditions.EHR_LATENTS),
            "cxr_side": list(conditions.CXR_LATENTS),
            "independence": "EHR-side and X-ray-side latent variables are drawn from independent generators "
            "with no shared parent; X-ray-side rates do not depend on demographics",
            "acuity": "per ICU stay, N(0,1), independent of all labels; drives generic derangement of vitals "
            "and labs, ventilation/ETT, central line, arterial line, X-ray availability, mortality "
            "and length of stay",
            "effects": signals.EFFECTS,
            "acuity_effects": signals.ACUITY,
        },
        "subgroup": {
            "attribute": "race_group",
            "value": population.SUBGROUP_RACE_GROUP,
            "degraded": "EHR only: condition and marker effects on every signal scaled by "
            f"{signals.SUBGROUP_EFFECT_SCALE}; laboratory and blood-gas draws at "
            f"{charting.SUBGROUP_DRAW_RATE}x the rate (under-recorded); SpO2 reads "
            f"+{charting.SUBGROUP_SPO2_BIAS} points (masks hypoxemia). Labels and X-rays unchanged.",
            "ehr_effect_scale": signals.SUBGROUP_EFFECT_SCALE,
            "lab_draw_rate": charting.SUBGROUP_DRAW_RATE,
            "spo2_bias": charting.SUBGROUP_SPO2_BIAS,
            "expected": "lower sensitivity (AUROC) of EHR-based models on 'ehr' and 'both' phenotypes in this "
            "group; X-ray-based predictions unaffected",
        },
        "missingness": {
            "mechanism": "missing not at random through acuity: P(frontal X-ray in [intime, intime+48h)) = "
            "sigmoid(alpha + slope * acuity); acuity also raises mortality",
            "alpha": round(alpha, 6),
            "slope": studies.CXR_ACUITY_SLOPE,
            "target_rate": cfg.cxr_rate,
            "other_studies": "earlier frontal in the window (15% of imaged stays), LATERAL with every PA, "
            "LATERAL-only in the window (3% of non-imaged stays), before ICU admission (8%), "
            "after the window while in the ICU (10% of stays > 48 h; 25% of them exactly at "
            "intime + 48 h)",
        },
        "outcomes": {
            "short_stay_share": population.SHORT_STAY_SHARE,
            "los": "2 days + lognormal(log 1.5 + 0.3 acuity + 0.25 [pneumonia or respiratory failure], 1.1)",
            "mortality_logit": f"{population.MORTALITY_INTERCEPT} + acuity + 0.35 (age-65)/10 + 0.8 shock "
            "+ 0.5 sepsis + 0.6 respiratory failure + 0.5 liver + 0.3 renal failure "
            "+ 0.5 heart failure + 0.4 pneumonia (only a subject's last stay)",
            "minor_share": population.MINOR_SHARE,
        },
        "realized": {
            **{k: int(v) for k, v in sorted(totals.items())},
            "cohort_prevalence": {
                p.column: round(float(c) / cohort, 4) for p, c in zip(phenos, label_counts, strict=True)
            },
        },
        "files": {"planted_stays": PLANTED_STAYS},
    }
