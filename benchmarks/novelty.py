"""Novelty benchmark: leave one experiment out, and leave one cell type out of the reference.

Scenarios, on every dataset in ``../shared/data`` (and on the simulated PBMC-like atlas with
subtypes and a condition effect, ``--synthetic``):

- ``none``: each experiment ``E`` in turn is held out unannotated, nothing removed;
- ``T``: for each held-out ``E`` and each type ``T`` with at least 10 cells in ``E``, every
  cell of ``T`` is dropped from the annotated experiments (``E`` keeps them). An annotated
  experiment left with no cells is dropped; one left with a single type is kept (the report
  says so in ``single_type_reference``).

``K`` is the number of true types in ``E`` (the reference protocol). Each scenario trains MARS
once per seed; the trained run is cached (``--workdir``) as the embedding of every cell, the
landmarks and the baselines' inputs, so the scoring of the novelty call can be repeated
without retraining (``--score-only``). Scoring goes through :func:`mars_scale.naming.name_clusters`,
the function ``annotate`` uses.

Per run: ARI of ``E``; share of known-type cells called novel; naming accuracy of known cells
(``cell_type`` equal to the truth); share of ``T``'s cells called novel; per-cell AUROC of the
novelty score (``T`` against known); Jaccard of ``T``'s best cluster; integration, the accuracy
of a 15-nearest-neighbour label transfer from the annotated cells to ``E``'s known cells in
the MARS embedding; per-cell outputs: the share of known cells whose closest type (the most
probable name per cell) is right, and the AUROC of the per-cell confidence for right calls (a
known cell named its type, a removed type's cell called novel) against wrong ones. Baselines on
the same runs: K-means on PCA (ARI, Jaccard of ``T``), and a
logistic regression on the annotated cells' scaled log-expression with "unassigned" below a
probability of 0.5 (the CellTypist approach).

Examples::

    python benchmarks/novelty.py --workdir /work/scratch/novelty                 # all, seed 0
    python benchmarks/novelty.py --datasets mesc_kolodziejczyk2015_mini --seeds 0 1
    python benchmarks/novelty.py --workdir /work/scratch/novelty --score-only    # rescore caches
    python benchmarks/novelty.py --datasets /data/pbmc.h5ad --experiment-key donor --label-key cell \
        --workdir /tmp/novelty --key pbmc                                       # a file of your own

Results go to ``benchmarks/results/novelty.json`` (``runs[<selection>-<N>seeds]``) with every
row and the markdown summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, peak_rss_mb, write_result  # noqa: E402

logger = logging.getLogger("benchmarks.novelty")

# the shared data (tests/conftest.py): $MARS_SCALE_DATA, else ../shared/data beside the checkout
DATA = Path(os.environ.get("MARS_SCALE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
DATASETS = (
    "mesc_kolodziejczyk2015_mini",
    "pancreas_3studies_beta_ductal_mini",
    "cellbench_3cl_3protocols_panel",
    "cellbench_celseq2_dropseq",
)
SYNTHETIC = "synthetic_pbmc_like"
# The same atlas with deeper cells (about 600 genes detected and 4,600 counts per cell, like
# 10x blood data, against 320 and 1,200): there the subtypes can be found without labels at all
# (K-means on the PCA of a subtype and its parent alone: ARI 0.42 against 0.04), so discovering
# a removed subtype is possible in principle. SYNTHETIC's subtypes are below that limit.
SYNTHETIC_DEEP = "synthetic_pbmc_like_deep"
# At 800 genes per cell the subtypes are trivial without labels (pair-only K-means ARI 1.00):
# the scenario where a method that keeps the held-out experiment's own structure must find them.
SYNTHETIC_DEEPER = "synthetic_pbmc_like_800"
# The 600-gene atlas with a stronger condition that also raises genes of each lineage's own
# (interferon raises CXCL10 in monocytes, not in T cells): the condition's direction differs
# between clusters, so no one direction removes it from all of them.
SYNTHETIC_IFN = "synthetic_pbmc_like_ifn"
SYNTHETIC_SETS = {SYNTHETIC: {}, SYNTHETIC_DEEP: {"mean_nnz_per_cell": 600.0},
                  SYNTHETIC_DEEPER: {"mean_nnz_per_cell": 800.0},
                  SYNTHETIC_IFN: {"mean_nnz_per_cell": 600.0, "condition_strength": 1.5,
                                  "condition_specificity": 1.0}}
MIN_TYPE_CELLS = 10
MIN_CLUSTER_CELLS = 10  # annotate's default
KNN = 15
LR_THRESHOLD = 0.5
TARGETS = {
    "known_called_novel": ("<=", 0.10),
    "known_name_accuracy": (">=", 0.85),
    "removed_called_novel": (">=", 0.70),
    "novelty_auroc": (">=", 0.90),
}


# ---------------------------------------------------------------------------------------------
# scenarios and stores


def _source(dataset: str, workdir: Path) -> Path:
    if dataset.endswith(".h5ad"):  # a file of the user's: its stem names it in the results
        if not Path(dataset).is_file():
            raise SystemExit(f"novelty.py: {dataset}: no such file")
        return Path(dataset)
    if dataset not in SYNTHETIC_SETS:
        return DATA / f"{dataset}.h5ad"
    path = workdir / f"{dataset}.h5ad"
    if not path.exists():
        import dataclasses

        from mars_scale.simulate import pbmc_like_config, simulate_anndata

        adata = simulate_anndata(dataclasses.replace(pbmc_like_config(seed=0), **SYNTHETIC_SETS[dataset]))
        adata.obs["cell_type"] = adata.obs["cell_type"].astype("category")
        adata.write_h5ad(path)
    return path


def _labelled_obs(obs: Any, columns: tuple[str, str]) -> Any:
    """``obs``'s experiment and cell-type columns (``columns``, renamed ``experiment`` and
    ``cell_type``) as strings, for the cells with a label."""
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise SystemExit(f"novelty.py: obs has no column {missing[0]!r} (columns: {', '.join(map(str, obs.columns))}); "
                         "pass --experiment-key / --label-key")
    out = obs[list(columns)].copy()
    out.columns = ["experiment", "cell_type"]
    labelled = out["cell_type"].notna() & (out["cell_type"].astype(str).str.strip() != "")
    return out[labelled].astype(str)


def scenarios(source: Path, columns: tuple[str, str] = ("experiment", "cell_type")) -> list[dict[str, Any]]:
    """Every (held-out experiment, removed type or None) of one h5ad (``columns``: its
    experiment and cell-type obs columns)."""
    import anndata as ad

    adata = ad.read_h5ad(source, backed="r")
    obs = _labelled_obs(adata.obs, columns)
    adata.file.close()
    out = []
    for held in sorted(obs["experiment"].unique()):
        mine = obs[obs["experiment"] == held]
        counts = mine["cell_type"].value_counts()
        out.append({"held_out": held, "removed": None, "k": int(counts.size)})
        for t in sorted(counts.index[counts >= MIN_TYPE_CELLS]):
            out.append({"held_out": held, "removed": str(t), "k": int(counts.size)})
    return out


def _build_store(source: Path, directory: Path, held_out: str, removed: str | None,
                 columns: tuple[str, str] = ("experiment", "cell_type")) -> tuple[Path, list[str]]:
    import anndata as ad

    from mars_scale.ingest import IngestConfig, ingest

    directory.mkdir(parents=True, exist_ok=True)
    store = directory / "atlas.zarr"
    adata = ad.read_h5ad(source)
    obs = _labelled_obs(adata.obs, columns)  # unlabelled cells cannot be scored: left out
    adata = adata[adata.obs_names.isin(obs.index)].copy()
    adata.obs = obs.loc[adata.obs_names]
    keep = np.ones(adata.n_obs, dtype=bool)
    if removed is not None:
        keep &= ~((adata.obs["cell_type"] == removed) & (adata.obs["experiment"] != held_out)).to_numpy()
    sub = adata[keep].copy()
    sub.obs = sub.obs[["experiment", "cell_type"]].copy()
    for col in ("experiment", "cell_type"):
        sub.obs[col] = sub.obs[col].astype(str).astype("category")
    single = []
    for exp, frame in sub.obs.groupby("experiment", observed=True):
        if exp != held_out and frame["cell_type"].nunique() == 1:
            single.append(str(exp))
    h5ad = directory / "cells.h5ad"
    sub.write_h5ad(h5ad)
    if store.exists():
        import shutil

        shutil.rmtree(store)
    config = IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=5, min_counts=1.0, min_genes=1)
    ingest([h5ad], store, config=config)
    h5ad.unlink()
    return store, single


def scenario_tag(held_out: str, removed: str | None) -> str:
    """The scenario's name in file paths: ``<held out>__<removed or none>``, each part with any
    character other than letters, digits and ``._+-`` replaced by ``_`` and then, if that
    changed it, a short hash of the original (labels such as "CD4/CD8 T" or "NK cells")."""
    import hashlib
    import re

    def safe(name: str) -> str:
        cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
        if cleaned == name:
            return name
        return f"{cleaned}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"

    return f"{safe(held_out)}__{safe(removed) if removed is not None else 'none'}"


def _cache_path(workdir: Path, dataset: str, tag: str, seed: int, options: dict[str, Any] | None,
                extra_k: int = 0, auto_k: bool = False) -> Path:
    """Cached runs live under cache/<options>/...: one folder per set of training options."""
    name = "defaults" if not options else "-".join(f"{k}={v}" for k, v in sorted(options.items()))
    if extra_k:
        name += f"-k+{extra_k}"
    if auto_k:
        name += "-auto-k"
    return workdir / "cache" / name / dataset / f"{tag}__s{seed}.npz"


def train_scenario(source: Path, scenario: dict[str, Any], seed: int, workdir: Path,
                   options: dict[str, Any] | None = None, extra_k: int = 0, auto_k: bool = False,
                   columns: tuple[str, str] = ("experiment", "cell_type")) -> Path:
    """Train MARS on one scenario and cache what scoring needs; returns the cache file."""
    import dataclasses

    from sklearn.linear_model import LogisticRegression

    from mars_scale.config import RunConfig
    from mars_scale.evaluate import _pca_of_experiment, scaled_rows
    from mars_scale.landmarks import kmeans, nearest
    from mars_scale.model import Mars
    from mars_scale.store import open_store

    held, removed, k = scenario["held_out"], scenario["removed"], scenario["k"] + extra_k
    tag = scenario_tag(held, removed)
    cache = _cache_path(workdir, source.stem, tag, seed, options, extra_k, auto_k)
    if cache.exists():
        return cache
    directory = workdir / "stores" / source.stem / tag
    meta_path = directory / "meta.json"
    if meta_path.exists() and (directory / "atlas.zarr").exists():
        store_path, single = directory / "atlas.zarr", json.loads(meta_path.read_text())["single"]
    else:
        store_path, single = _build_store(source, directory, held, removed, columns)
        meta_path.write_text(json.dumps({"single": single}))
    store = open_store(store_path)
    config = RunConfig()
    cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed, **(options or {})))
    t0 = time.perf_counter()
    model = Mars(store, unannotated=held, n_clusters="auto" if auto_k else k, config=cfg).train()
    k_truth, k = k, model.plan.n_clusters  # the baselines below get the K MARS had
    train_s = time.perf_counter() - t0
    index, z = model.embed(store)
    order = np.argsort(index, kind="stable")
    z = z[order].astype(np.float32)
    experiments = np.asarray(store.obs_column("experiment"), dtype=object).astype(str)
    truth = np.asarray(store.obs_column("cell_type"), dtype=object).astype(str)
    values, lm_exps, lm_types = model.annotated_landmarks
    a, b = store.experiment_ranges[held]
    rows, scores = _pca_of_experiment(store, held, n_components=50, max_cells=50_000, seed=seed)
    km = kmeans(scores, k, seed=seed)
    pca_assign = np.full(b - a, -1, dtype=np.int64)
    pca_assign[rows - a] = nearest(scores, km.centroids)[0]
    # CellTypist-style baseline: logistic regression on the annotated cells' expression
    annotated = np.flatnonzero(experiments != held)
    x_train = scaled_rows(store, annotated)
    x_test = scaled_rows(store, np.arange(a, b))
    classes = np.unique(truth[annotated])
    if classes.size > 1:
        lr = LogisticRegression(max_iter=1000, C=1.0).fit(x_train, truth[annotated])
        proba, classes = lr.predict_proba(x_test), lr.classes_
    else:  # a one-type reference: the classifier can only say that type, with certainty
        proba = np.ones((b - a, 1))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.stem}.tmp.npz")
    np.savez_compressed(
        tmp, z=z, experiments=experiments, truth=truth, held_out=held, removed=removed or "",
        k=k, k_truth=k_truth, seed=seed, single=np.asarray(single, dtype=str),
        landmarks_annotated=np.asarray(values, dtype=np.float32),
        landmark_experiments=np.asarray(lm_exps, dtype=str), landmark_types=np.asarray(lm_types, dtype=str),
        landmarks_unannotated=np.asarray(model.unannotated_landmarks, dtype=np.float32),
        pca_assign=pca_assign, lr_proba=proba.astype(np.float32), lr_classes=np.asarray(classes, dtype=str),
        train_seconds=train_s,
    )
    os.replace(tmp, cache)
    logger.info("trained %s %s seed %d in %.1f s", source.stem, tag, seed, train_s)
    return cache


# ---------------------------------------------------------------------------------------------
# scoring


def score_cache(cache: Path, *, method: str = "default", split_test: bool = True, siblings: bool = True) -> dict[str, Any]:
    """Score one cached run with the package's naming and metrics (``annotate``'s code path:
    landmarks with fewer than 10 cells merged, names matched with landmark weights)."""
    from mars_scale.annotate import merge_small_clusters
    from mars_scale.evaluate import best_jaccard, integration_knn, naming_metrics, novelty_auroc
    from mars_scale.landmarks import nearest
    from mars_scale.metrics import ari
    from mars_scale.naming import name_clusters, name_confusion
    from mars_scale.store import open_store
    from mars_scale.subpopulations import name_with_parts

    d = np.load(cache, allow_pickle=False)
    held, removed = str(d["held_out"]), str(d["removed"]) or None
    z, exps, truth = d["z"], d["experiments"], d["truth"]
    mine = exps == held
    z_e, truth_e = z[mine], truth[mine]
    ref = ~mine
    assign, _ = nearest(z_e, d["landmarks_unannotated"])
    assign, _ = merge_small_clusters(z_e, assign, d["landmarks_unannotated"], min_cells=MIN_CLUSTER_CELLS)
    # annotated cells per landmark, as annotate counts them
    pairs = np.char.add(np.char.add(exps[ref].astype(str), "\x00"), truth[ref].astype(str))
    keys = np.char.add(np.char.add(d["landmark_experiments"].astype(str), "\x00"), d["landmark_types"].astype(str))
    names, counts = np.unique(pairs, return_counts=True)
    weights = np.array([counts[names == k][0] if (names == k).any() else 0 for k in keys], dtype=float)
    extra: dict[str, Any] = {}
    if method == "margin":  # as annotate passed it: each landmark's radius over its own cells
        lookup = {k: i for i, k in enumerate(keys)}
        index = np.array([lookup.get(k, -1) for k in pairs])
        sq = ((z[ref] - d["landmarks_annotated"][np.maximum(index, 0)]) ** 2).sum(1)
        ok = index >= 0
        total = np.bincount(index[ok], weights=sq[ok], minlength=len(keys))
        extra = {"novelty_method": "margin", "landmark_radius": np.sqrt(total / np.maximum(weights, 1))}
    def name(clusters: np.ndarray, decided: dict | None):
        return name_clusters(z_e, clusters, d["landmarks_annotated"], d["landmark_types"], landmark_weights=weights,
                             decided=decided, rng=0, **extra)

    parts = []
    if split_test and method != "margin":
        store = open_store(cache.parents[3] / "stores" / cache.parent.name / cache.stem.rsplit("__s", 1)[0] / "atlas.zarr")
        a, b = store.experiment_ranges[held]
        confusion = None
        if siblings:  # how the embedding tells the names apart on the annotated cells, as annotate counts it
            names, lm_codes = np.unique(d["landmark_types"], return_inverse=True)
            lookup = {n: i for i, n in enumerate(names)}
            own = np.array([lookup.get(t, -1) for t in truth[ref]])
            confusion = name_confusion(z[ref], own, d["landmarks_annotated"], lm_codes, len(names))
        naming, assign, parts = name_with_parts(name, store, np.arange(a, b), assign, z_e,
                                                annotated=sorted(set(d["landmark_experiments"].tolist())),
                                                confusion=confusion, seed=0)
    else:
        naming = name(assign, None)
    known_types = sorted(set(d["landmark_types"].tolist()))
    known = np.isin(truth_e, known_types)
    is_removed = truth_e == removed if removed else np.zeros(len(truth_e), dtype=bool)
    m = naming_metrics(truth_e, assign, naming.cell_type, naming.cell_novelty, naming.cell_is_novel, known_types,
                       closest_type=naming.cell_closest, confidence=naming.confidence)
    row: dict[str, Any] = {
        "n_cells": int(mine.sum()),
        "k": int(d["k"]),
        **({"k_truth": int(d["k_truth"])} if "k_truth" in d.files else {}),
        "ari": m["ari"],
        "known_called_novel": m["known_called_novel"],
        "known_name_accuracy": m["known_name_accuracy"],
        "removed_called_novel": m["new_called_novel"] if removed else None,
        "novelty_auroc": m["novelty_auroc"] if removed else None,
        "removed_jaccard": m["new_jaccard"].get(removed) if removed else None,
        "integration_knn": integration_knn(z[ref], truth[ref], z_e[known], truth_e[known]),
        "known_closest_accuracy": m["known_closest_accuracy"],
        "confidence_auroc": m["confidence_auroc"],
        "clusters": [
            {"cluster": int(c), "n_cells": int(n), "label": str(lab), "novelty": round(float(v), 4),
             "truth": _majority(truth_e[assign == c])}
            | ({"part_of": int(naming.clusters[p])} if p >= 0 else {})
            for c, n, lab, v, p in zip(naming.clusters, naming.n_cells, naming.label, naming.novelty,
                                       naming.part_of)
        ],
    }
    # baselines
    pca = d["pca_assign"]
    proba, classes = d["lr_proba"], d["lr_classes"]
    lr_best = classes[np.argmax(proba, axis=1)]
    lr_novel = proba.max(axis=1) < LR_THRESHOLD
    lr_pred = np.where(lr_novel, "unassigned", lr_best)
    row["baselines"] = {
        "kmeans_pca_ari": float(ari(truth_e[pca >= 0], pca[pca >= 0])),
        "kmeans_pca_removed_jaccard": best_jaccard(pca, is_removed) if removed else None,
        "lr_known_called_novel": float(lr_novel[known].mean()) if known.any() else None,
        "lr_known_name_accuracy": float(np.mean(lr_pred[known] == truth_e[known])) if known.any() else None,
        "lr_removed_called_novel": float(lr_novel[is_removed].mean()) if removed else None,
        "lr_novelty_auroc": novelty_auroc(1 - proba.max(axis=1)[is_removed | known], is_removed[is_removed | known]) if removed else None,
        # the classifier's most probable type, and its top probability (or, "unassigned", one
        # minus it) as its confidence, scored as MARS's closest type and confidence are
        "lr_known_closest_accuracy": float(np.mean(lr_best[known] == truth_e[known])) if known.any() else None,
        "lr_confidence_auroc": novelty_auroc(
            np.where(lr_novel, 1 - proba.max(axis=1), proba.max(axis=1))[is_removed | known],
            ((lr_pred == truth_e) & known | lr_novel & is_removed)[is_removed | known]),
    }
    return row


def _majority(values: np.ndarray) -> str:
    if values.size == 0:
        return ""
    names, counts = np.unique(values, return_counts=True)
    return f"{names[np.argmax(counts)]} ({counts.max()}/{values.size})"


def _mean(rows: list[dict], key: str, sub: str | None = None) -> float | None:
    vals = [(r[sub] if sub else r).get(key) for r in rows]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Means over runs, per dataset, over the shared (real) datasets and overall, and the
    targets of issue 16 (checked on all runs)."""
    out: dict[str, Any] = {}
    datasets = sorted({r["dataset"] for r in rows})
    real = [d for d in datasets if d not in SYNTHETIC_SETS]
    scopes = datasets + (["real"] if real and len(real) < len(datasets) else []) + ["all"]
    for scope in scopes:
        mine = [r for r in rows if scope == "all" or r["dataset"] == scope
                or (scope == "real" and r["dataset"] not in SYNTHETIC_SETS)]
        none = [r for r in mine if r["removed"] is None]
        removed = [r for r in mine if r["removed"] is not None]
        s = {
            "n_runs": len(mine),
            "ari_nothing_removed": _mean(none, "ari"),
            "ari_type_removed": _mean(removed, "ari"),
            "known_called_novel": _mean(mine, "known_called_novel"),
            "known_name_accuracy": _mean(mine, "known_name_accuracy"),
            "removed_called_novel": _mean(removed, "removed_called_novel"),
            "novelty_auroc": _mean(removed, "novelty_auroc"),
            "removed_jaccard": _mean(removed, "removed_jaccard"),
            "integration_knn": _mean(mine, "integration_knn"),
            "known_closest_accuracy": _mean(mine, "known_closest_accuracy"),
            "confidence_auroc": _mean(mine, "confidence_auroc"),
        }
        for key in ("kmeans_pca_ari", "lr_known_called_novel", "lr_known_name_accuracy",
                    "lr_removed_called_novel", "lr_novelty_auroc", "kmeans_pca_removed_jaccard"):
            s[key] = _mean(mine if "removed" not in key and "auroc" not in key else removed, key, "baselines")
        for key in ("lr_known_closest_accuracy", "lr_confidence_auroc"):
            s[key] = _mean(mine, key, "baselines")
        out[scope] = s
    out["checks"] = _checks(out["all"])
    if "real" in out:
        out["checks_real"] = _checks(out["real"])
    return out


def _checks(a: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's targets on one scope's means."""
    checks: dict[str, bool | None] = {}
    for key, (op, bound) in TARGETS.items():
        v = a[key]
        checks[key] = None if v is None else (v <= bound if op == "<=" else v >= bound)
    if a["ari_type_removed"] is not None and a["ari_nothing_removed"] is not None:
        checks["ari_removed_within_0.05"] = a["ari_type_removed"] >= a["ari_nothing_removed"] - 0.05
    return checks


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def markdown(rows: list[dict], summary: dict[str, Any]) -> str:
    lines = [
        "| dataset | held out | removed | seed | ARI | known called novel | known named right | removed called novel | AUROC | Jaccard removed | kNN transfer | LR: known novel / named / removed novel / AUROC | K-means PCA ARI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bl = r["baselines"]
        lines.append(
            f"| {r['dataset']} | {r['held_out']} | {r['removed'] or '–'} | {r['seed']} | {_f(r['ari'])} | "
            f"{_f(r['known_called_novel'])} | {_f(r['known_name_accuracy'])} | {_f(r['removed_called_novel'])} | "
            f"{_f(r['novelty_auroc'])} | {_f(r['removed_jaccard'])} | {_f(r['integration_knn'])} | "
            f"{_f(bl['lr_known_called_novel'])} / {_f(bl['lr_known_name_accuracy'])} / "
            f"{_f(bl['lr_removed_called_novel'])} / {_f(bl['lr_novelty_auroc'])} | {_f(bl['kmeans_pca_ari'])} |"
        )
    lines += ["", "| scope | runs | ARI none / removed | known called novel | known named right | removed called novel | AUROC | Jaccard | kNN | LR known novel | LR named | LR removed novel | LR AUROC | closest type right (LR) | confidence AUROC (LR) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scope, s in summary.items():
        if scope.startswith("checks"):
            continue
        lines.append(
            f"| {scope} | {s['n_runs']} | {_f(s['ari_nothing_removed'])} / {_f(s['ari_type_removed'])} | "
            f"{_f(s['known_called_novel'])} | {_f(s['known_name_accuracy'])} | {_f(s['removed_called_novel'])} | "
            f"{_f(s['novelty_auroc'])} | {_f(s['removed_jaccard'])} | {_f(s['integration_knn'])} | "
            f"{_f(s['lr_known_called_novel'])} | {_f(s['lr_known_name_accuracy'])} | "
            f"{_f(s['lr_removed_called_novel'])} | {_f(s['lr_novelty_auroc'])} | "
            f"{_f(s['known_closest_accuracy'])} ({_f(s.get('lr_known_closest_accuracy'))}) | "
            f"{_f(s['confidence_auroc'])} ({_f(s.get('lr_confidence_auroc'))}) |"
        )
    for key, title in (("checks_real", "shared (real) datasets"), ("checks", "all runs")):
        if key in summary:
            lines += ["", f"Checks ({title}): " + ", ".join(
                f"{k} {'n/a' if v is None else 'pass' if v else 'FAIL'}" for k, v in summary[key].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS) + [SYNTHETIC],
                        help="Shared datasets by name, the simulated ones, or paths to .h5ad files of raw "
                             "counts (named by their stem).")
    parser.add_argument("--experiment-key", default="experiment",
                        help="obs column of the experiments, in .h5ad files given by path.")
    parser.add_argument("--label-key", default="cell_type",
                        help="obs column of the cell types, in .h5ad files given by path (unlabelled cells "
                             "are left out).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--held-out", nargs="+", default=None,
                        help="Only these held-out experiments (default: every experiment in turn).")
    parser.add_argument("--nothing-removed", action="store_true", help="Only the scenarios with no type removed.")
    parser.add_argument("--workdir", type=Path, default=Path("/work/scratch/novelty"))
    parser.add_argument("--score-only", action="store_true", help="Score the cached runs; train nothing.")
    parser.add_argument("--extra-k", type=int, default=0,
                        help="Over-guess K by this many landmarks (nothing-removed scenarios only).")
    parser.add_argument("--auto-k", action="store_true",
                        help='Train with n_clusters="auto" (K chosen by MARS; the baselines get the same K).')
    parser.add_argument("--train-only", action="store_true", help="Train and cache; write no result.")
    parser.add_argument("--method", default="default", help="Novelty method passed to name_clusters.")
    parser.add_argument("--no-split-test", action="store_true",
                        help="Score without annotate's split test (mars_scale.subpopulations).")
    parser.add_argument("--no-siblings", action="store_true",
                        help="Score without resolving known siblings on expression (subpopulations.resolve_siblings).")
    parser.add_argument("--options", type=json.loads, default=None,
                        help='Training options as JSON, e.g. \'{"annotated_contrast": 1.0}\' (cached apart).')
    parser.add_argument("--key", default=None, help="Result key (default: <selection>-<N>seeds[-method]).")
    parser.add_argument("--dry-run", action="store_true", help="Write no result file; print the table.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("mars_scale",):
        logging.getLogger(name).setLevel(logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    single_type: dict[str, list[str]] = {}
    for dataset in args.datasets:
        source = _source(dataset, args.workdir)
        columns = (args.experiment_key, args.label_key) if dataset.endswith(".h5ad") else ("experiment", "cell_type")
        dataset = source.stem
        for sc in scenarios(source, columns):
            if ((args.extra_k or args.nothing_removed) and sc["removed"] is not None) or (
                    args.held_out and sc["held_out"] not in args.held_out):
                continue
            for seed in args.seeds:
                tag = scenario_tag(sc["held_out"], sc["removed"])
                cache = _cache_path(args.workdir, source.stem, tag, seed, args.options, args.extra_k, args.auto_k)
                if not args.score_only:
                    cache = train_scenario(source, sc, seed, args.workdir, args.options, args.extra_k, args.auto_k,
                                           columns)
                if args.train_only or not cache.exists():
                    continue
                row = {"dataset": dataset, "held_out": sc["held_out"], "removed": sc["removed"], "seed": seed,
                       **score_cache(cache, method=args.method, split_test=not args.no_split_test,
                                   siblings=not args.no_siblings)}
                single = [str(s) for s in np.load(cache)["single"]]
                if single:
                    row["single_type_reference"] = single
                    single_type[f"{dataset}/{tag}"] = single
                rows.append(row)
                logger.info("%s %s seed %d: ARI %.3f known novel %s named %s removed novel %s AUROC %s",
                            dataset, tag, seed, row["ari"], _f(row["known_called_novel"]),
                            _f(row["known_name_accuracy"]), _f(row["removed_called_novel"]), _f(row["novelty_auroc"]))
    if args.train_only or not rows:
        return
    summary = summarise(rows)
    table = markdown(rows, summary)
    print(table)
    if args.dry_run:
        return
    selection = "all" if set(args.datasets) == set(DATASETS) | {SYNTHETIC} else "+".join(
        Path(d).stem for d in args.datasets)
    key = args.key or f"{selection}-{len(args.seeds)}seeds" + ("" if args.method == "default" else f"-{args.method}") + (
        "" if not (args.options or args.extra_k or args.auto_k) else
        "-" + _cache_path(args.workdir, "", "", 0, args.options, args.extra_k, args.auto_k).parent.parent.name)
    write_result("novelty", {
        "parameters": {"datasets": args.datasets, "seeds": args.seeds, "method": args.method, "options": args.options,
                       "extra_k": args.extra_k, "auto_k": args.auto_k, "split_test": not args.no_split_test,
                       "siblings": not args.no_siblings, "score_only": args.score_only,
                       "min_type_cells": MIN_TYPE_CELLS, "knn": KNN, "lr_threshold": LR_THRESHOLD},
        "single_type_reference": single_type,
        "rows": rows, "summary": summary, "table_markdown": table,
        "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "load_average_end": load_average(),
    }, key=key)


if __name__ == "__main__":
    main()
