"""Discharge diagnoses (hosp/diagnoses_icd) that encode the planted phenotype labels.

Why through codes: `prepare` must derive the labels exactly as it does on MIMIC-IV (ICD code -> HCUP CCS
category -> phenotype), so the simulator writes codes, never labels. Each positive phenotype contributes one
code (sometimes two) drawn from the codes of its CCS category that map to that category *only*
(`codes_for_category(..., exclusive=True)` of the phenotype stage), so one code plants exactly one phenotype.
Every admission also gets filler codes from categories outside the 25 (anaemia, thyroid, mood disorders, ...),
as real admissions carry many codes that no phenotype uses. The ICD version follows the admission's real
(de-shifted) year: ICD-9-CM before 2016, ICD-10-CM after; codes are written without dots, as in MIMIC-IV.
"""

from __future__ import annotations

import numpy as np

from carebench.data.definitions import load_phenotypes

# CCS categories outside the 25 phenotypes used for filler codes: deficiency anaemia, thyroid, other
# nutritional/endocrine, anxiety, mood, screening/history of mental health and substance use, back problems,
# esophageal disorders, other nervous system disorders, other skin disorders.
FILLER_CCS = (59, 48, 58, 651, 657, 663, 205, 138, 95, 200)


def code_pools() -> dict[str, object]:
    """{"phenotypes": {column: {9: [...], 10: [...]}}, "filler": {9: [...], 10: [...]}} (codes without dots).

    Built once in the parent process and passed to the chunk workers (the ICD->CCS table takes a few seconds).
    """
    from carebench.data.mimic.phenotypes import codes_for_category

    pheno: dict[str, dict[int, list[str]]] = {}
    for p in load_phenotypes():
        pheno[p.column] = {v: codes_for_category(p.ccs, v, exclusive=True) for v in (9, 10)}
        for v, codes in pheno[p.column].items():
            if not codes:
                raise RuntimeError(f"no ICD-{v} code maps only to CCS {p.ccs} ({p.column})")
    phenotype_ccs = {p.ccs for p in load_phenotypes()}
    if phenotype_ccs & set(FILLER_CCS):
        raise RuntimeError("a filler CCS category is a phenotype category")
    filler = {
        v: sorted({c for ccs in FILLER_CCS for c in codes_for_category(ccs, v, exclusive=True)})
        for v in (9, 10)
    }
    return {"phenotypes": pheno, "filler": filler}


def diagnoses(
    rng: np.random.Generator, labels: np.ndarray, icd_version: np.ndarray, pools: dict[str, object]
) -> dict[str, np.ndarray]:
    """Rows (adm index, seq_num, icd_code, icd_version) for admissions with `labels` [n_adm, 25] (bool)."""
    columns = [p.column for p in load_phenotypes()]
    pheno_pools = pools["phenotypes"]
    filler = pools["filler"]
    adm_out: list[int] = []
    code_out: list[str] = []
    version_out: list[int] = []
    seq_out: list[int] = []
    n_filler = 1 + rng.poisson(5, len(labels))
    for i in range(len(labels)):
        v = int(icd_version[i])
        codes: list[str] = []
        for j in np.flatnonzero(labels[i]):
            pool = pheno_pools[columns[j]][v]
            k = 2 if (rng.random() < 0.15 and len(pool) > 1) else 1
            codes.extend(pool[t] for t in rng.choice(len(pool), size=k, replace=False))
        fp = filler[v]
        codes.extend(fp[t] for t in rng.choice(len(fp), size=int(n_filler[i]), replace=False))
        codes = list(dict.fromkeys(codes))
        order = rng.permutation(len(codes))
        for seq, t in enumerate(order, start=1):
            adm_out.append(i)
            code_out.append(codes[t])
            version_out.append(v)
            seq_out.append(seq)
    return {
        "adm": np.array(adm_out, dtype=np.int64),
        "seq_num": np.array(seq_out, dtype=np.int64),
        "icd_code": np.array(code_out, dtype=object),
        "icd_version": np.array(version_out, dtype=np.int64),
    }
