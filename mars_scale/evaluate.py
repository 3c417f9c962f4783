"""Leave-one-experiment-out evaluation of MARS against two K-means baselines, and naming checks.

Protocol (:func:`leave_one_out`), as in the paper and the reference benchmark:

- Each annotated experiment in turn is the unannotated one. Its labels are never given to
  training: MARS sees only the other experiments' labels. The held-out labels enter in two
  places only, both fixed by the protocol and neither a choice made by looking at results:
  the number of landmarks ``K`` is the number of true types in the held-out experiment
  (``k="truth"``, the reference protocol; pass an integer to fix it instead), and the metrics.
- One MARS training per (held-out experiment, seed). MARS's assignment is the nearest
  unannotated landmark of each held-out cell's final embedding.
- Baselines in the same run, with the same ``K`` and seed:

  * ``kmeans_ae``: K-means on the *pretrained* autoencoder embedding of the held-out cells
    (the paper's Extended Data Fig. 2f): ``state["kmeans_pretrained"]`` of the checkpoint when
    a supervised warm-up ran, else the landmark initialisation ``state["kmeans_init"]``, which
    is then the same thing. Missing from checkpoints that do not record it (reported as
    ``None``).
  * ``kmeans_pca``: :func:`mars_scale.landmarks.kmeans` on the first 50 principal components
    of the held-out cells, preprocessed as the model sees them (normalised to the store's
    target sum, log1p, scaled with the store's joint gene means and standard deviations,
    clipped at the store's ``max_value``). The scaled matrix is never densified: centring
    removes the constant value of the zeros, so the principal components of the scaled data
    are those of its sparse part, computed by ARPACK on the sparse matrix with implicit
    centring. At most ``pca_max_cells`` (default 50,000) cells enter, a uniform random subsample
    drawn with the first seed beyond that; the PCA is computed once per held-out experiment
    (ARPACK, seeded with the first seed) and K-means runs once per seed.

Metrics are those of :func:`mars_scale.metrics.clustering_metrics`; the summary gives, per
held-out experiment and method, the mean and the sample standard deviation (``ddof=1``) over
seeds, and per method the mean of those means over experiments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from mars_scale.config import RunConfig, config_to_dict
from mars_scale.errors import InputError
from mars_scale.landmarks import kmeans, nearest
from mars_scale.metrics import clustering_metrics
from mars_scale.model import Mars
from mars_scale.preprocess import fold_scaling, normalize_log1p, scaled_nonzero_values
from mars_scale.store import Atlas, open_store

__all__ = [
    "METHODS",
    "leave_one_out",
    "markdown_table",
    "naming_report",
    "write_report",
]

logger = logging.getLogger(__name__)

METHODS = ("mars", "kmeans_ae", "kmeans_pca")
_METRICS = ("accuracy", "precision", "recall", "f1", "nmi", "ami", "ari")
_METHOD_TITLES = {"mars": "MARS", "kmeans_ae": "K-means on AE", "kmeans_pca": "K-means on PCA"}


def _as_store(store: Atlas | str | os.PathLike) -> Atlas:
    return store if isinstance(store, Atlas) else open_store(store)


def _labels(codes: np.ndarray, categories: list[str]) -> np.ndarray:
    """Label names as an object array, ``None`` where the code is -1 (missing)."""
    names = np.asarray(categories + [None], dtype=object)
    return names[np.where(codes >= 0, codes, len(categories))]


def _held_out_truth(store: Atlas, experiment: str) -> tuple[np.ndarray, int]:
    a, b = store.experiment_ranges[experiment]
    codes, categories = store.categorical_codes("cell_type", a, b)
    return _labels(np.asarray(codes), categories), int(np.unique(codes[codes >= 0]).size)


def _resolve_experiments(store: Atlas, experiments: Sequence[str] | None) -> list[str]:
    labelled = []
    for name, (a, b) in store.experiment_ranges.items():
        codes, _ = store.categorical_codes("cell_type", a, b)
        if b > a and (codes >= 0).any():
            labelled.append(name)
    if experiments is None:
        chosen = labelled
    else:
        chosen = [str(e) for e in experiments]
        for name in chosen:
            if name not in store.experiment_ranges:
                raise InputError(
                    f"{store.path}: unknown experiment {name!r} (known: {', '.join(store.experiments)})"
                )
            if name not in labelled:
                raise InputError(
                    f"{store.path}: experiment {name!r} has no cell-type labels, so it cannot be scored"
                )
    if len(labelled) < 2:
        raise InputError(
            f"{store.path}: leave-one-out needs at least two experiments with cell-type labels "
            f"(found {len(labelled)})"
        )
    if not chosen:
        raise InputError(f"{store.path}: no experiment to hold out")
    return chosen


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise InputError("seeds is empty (pass at least one seed)")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise InputError(f"seeds must be non-negative integers (got {s!r})")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"seeds must be distinct (got {seeds})")
    return [int(s) for s in seeds]


# ---------------------------------------------------------------------------------------------
# the PCA baseline


def _pca_of_experiment(store: Atlas, experiment: str, *, n_components: int, max_cells: int,
                       seed: int, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the preprocessed cells of one experiment (rows, scores)."""
    from sklearn.decomposition import PCA

    a, b = store.experiment_ranges[experiment]
    n = b - a
    rng = np.random.default_rng(seed)
    if n > max_cells:
        rows = a + np.sort(rng.choice(n, size=max_cells, replace=False))
        logger.info("PCA baseline: %d of the %d cells of %r (uniform subsample)", max_cells, n, experiment)
    else:
        rows = np.arange(a, b)
    prep = store.meta.get("preprocessing", {})
    target_sum = float(prep.get("target_sum", 1e4))
    max_value = prep.get("max_value", 10.0)
    params = fold_scaling(store.var_column("mean"), store.var_column("std"),
                          max_value=None if max_value is None else float(max_value))
    blocks = []
    for lo in range(a, b, block_rows):
        hi = min(b, lo + block_rows)
        take = rows[(rows >= lo) & (rows < hi)] - lo
        if take.size == 0:
            continue
        block = store.read_rows(lo, hi)[take]
        data = normalize_log1p(block.indptr, block.indices, block.data, target_sum=target_sum,
                               kind=store.input_kind, dtype=np.float64)
        # The scaled matrix is c (one constant row, the value of a zero) + this sparse part;
        # centring removes c, so the principal components are those of the sparse part.
        values = scaled_nonzero_values(block.indices, data, params, dtype=np.float64)
        blocks.append(sp.csr_matrix((values, block.indices, block.indptr), shape=block.shape))
    matrix = sp.vstack(blocks, format="csr")
    k = int(min(n_components, matrix.shape[0] - 1, matrix.shape[1] - 1))
    if k < 1:
        raise InputError(f"{store.path}: experiment {experiment!r} is too small for PCA ({matrix.shape})")
    scores = PCA(n_components=k, svd_solver="arpack", random_state=seed).fit_transform(matrix)
    return rows, np.ascontiguousarray(scores, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# one run


def kmeans_on_pretrained(state: dict[str, Any]) -> dict[str, Any] | None:
    """The K-means of the held-out cells on the pretrained embedding recorded in a checkpoint
    (``{"index", "cluster"}``), or ``None``."""
    pretrained = state.get("kmeans_pretrained")
    return pretrained if pretrained is not None else state.get("kmeans_init")


def _kmeans_ae(state: dict[str, Any], a: int, b: int) -> tuple[np.ndarray, np.ndarray] | None:
    init = kmeans_on_pretrained(state)
    if not init:
        return None
    index = np.asarray(init["index"], dtype=np.int64).reshape(-1)
    cluster = np.asarray(init["cluster"], dtype=np.int64).reshape(-1)
    if index.size and (index.min() < a or index.max() >= b):  # positions within the experiment
        index = index + a
    return index, cluster


def _scored(truth_all: np.ndarray, a: int, index: np.ndarray, cluster: np.ndarray) -> dict[str, Any]:
    truth = truth_all[index - a]
    return {
        "metrics": clustering_metrics(truth, cluster),
        "assignment": {"index": index, "truth": truth, "cluster": cluster},
    }


def _one_run(store: Atlas, experiment: str, seed: int, k: int, config: RunConfig, truth: np.ndarray,
             pca: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    a, b = store.experiment_ranges[experiment]
    t0 = time.perf_counter()
    cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    model = Mars(store, unannotated=experiment, n_clusters=k, config=cfg).train()
    train_s = time.perf_counter() - t0
    index, z = model.embed(experiments=[experiment], device=cfg.train.device)
    order = np.argsort(index, kind="stable")
    index, z = index[order], z[order]
    assign, _ = nearest(z, model.unannotated_landmarks)
    results = {"mars": _scored(truth, a, index.astype(np.int64), assign.astype(np.int64))}
    ae = _kmeans_ae(model.state, a, b)
    results["kmeans_ae"] = None if ae is None else _scored(truth, a, *ae)
    rows, scores = pca
    km = kmeans(scores, k, seed=seed)
    pca_assign, _ = nearest(scores, km.centroids)
    results["kmeans_pca"] = _scored(truth, a, rows, pca_assign.astype(np.int64))
    usage = np.bincount(assign, minlength=k)
    return {
        "experiment": experiment,
        "seed": seed,
        "k": k,
        "n_cells": b - a,
        "n_labelled": int(sum(t is not None for t in truth)),
        "train_seconds": round(train_s, 3),
        "seconds": round(time.perf_counter() - t0, 3),
        "n_unused_landmarks": int((usage == 0).sum()),
        "metrics": {m: (None if r is None else r["metrics"]) for m, r in results.items()},
        "assignments": {m: (None if r is None else r["assignment"]) for m, r in results.items()},
    }


# ---------------------------------------------------------------------------------------------
# the runner


def _mean_sd(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(arr.size),
    }


def _summarise(runs: list[dict[str, Any]]) -> tuple[dict, dict]:
    summary: dict[str, dict] = {}
    for exp in dict.fromkeys(r["experiment"] for r in runs):
        mine = [r for r in runs if r["experiment"] == exp]
        per_method = {}
        for method in METHODS:
            scored = [r["metrics"][method] for r in mine if r["metrics"][method] is not None]
            if scored:
                per_method[method] = {m: _mean_sd([s[m] for s in scored]) for m in _METRICS}
        summary[exp] = {"k": mine[0]["k"], "n_cells": mine[0]["n_cells"], "methods": per_method}
    overall = {}
    for method in METHODS:
        exps = [s["methods"][method] for s in summary.values() if method in s["methods"]]
        if exps:
            overall[method] = {m: float(np.mean([e[m]["mean"] for e in exps])) for m in _METRICS}
            overall[method]["n_experiments"] = len(exps)
    return summary, overall


def leave_one_out(
    store: Atlas | str | os.PathLike,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    config: RunConfig | None = None,
    experiments: Sequence[str] | None = None,
    k: str | int = "truth",
    pca_components: int = 50,
    pca_max_cells: int = 50_000,
) -> dict[str, Any]:
    """Hold out every annotated experiment in turn; score MARS and two K-means baselines.

    See the module docstring for the protocol. Nothing learnt from the held-out labels
    influences training, model selection or the baselines.

    Parameters
    ----------
    store
        An atlas store (opened or a path) with cell-type labels in at least two experiments.
    seeds
        One MARS training (and one run of each baseline's K-means) per seed and experiment.
    config
        Model and training options; ``train.seed`` is replaced by each seed.
    experiments
        Experiments to hold out (default: every experiment with labels).
    k
        ``"truth"``: K is the number of cell types in the held-out experiment (the reference
        protocol); an integer fixes K for every experiment.
    pca_components
        Principal components of the PCA baseline.
    pca_max_cells
        Most cells of a held-out experiment in the PCA baseline (uniform subsample beyond).

    Returns
    -------
    dict
        ``runs``: one dict per (experiment, seed) with ``experiment``, ``seed``, ``k``,
        ``n_cells``, ``n_labelled``, ``train_seconds``, ``seconds``, ``n_unused_landmarks``,
        ``metrics`` (per method in :data:`METHODS`: the dict of
        :func:`~mars_scale.metrics.clustering_metrics`, or ``None`` if unavailable) and
        ``assignments`` (per method: ``index`` (store rows), ``truth`` (labels, ``None`` when
        missing) and ``cluster``, numpy arrays, from which ``metrics`` were computed);
        ``summary``: per experiment, ``k``, ``n_cells`` and per method and metric ``mean``,
        ``sd`` (``ddof=1``), ``min``, ``max``, ``n``; ``overall``: per method, the mean over
        experiments of each metric's mean; ``protocol``: the settings; ``store``.

    Raises
    ------
    InputError
        For unknown or unlabelled experiments, fewer than two labelled experiments, bad seeds
        or a bad ``k``.
    """
    store = _as_store(store)
    config = config or RunConfig()
    seeds = _check_seeds(seeds)
    if not (k == "truth" or (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1)):
        raise InputError(f"k must be 'truth' or a positive integer (got {k!r})")
    for name, value in (("pca_components", pca_components), ("pca_max_cells", pca_max_cells)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
            raise InputError(f"{name} must be an integer of at least 2 (got {value!r})")
    chosen = _resolve_experiments(store, experiments)
    started = time.perf_counter()
    runs = []
    for experiment in chosen:
        truth, n_types = _held_out_truth(store, experiment)
        k_exp = n_types if k == "truth" else int(k)
        a, b = store.experiment_ranges[experiment]
        if k_exp > b - a:
            raise InputError(f"k={k_exp} is larger than the {b - a} cells of experiment {experiment!r}")
        logger.info("holding out %r (%d cells, K=%d)", experiment, b - a, k_exp)
        pca = _pca_of_experiment(store, experiment, n_components=pca_components, max_cells=pca_max_cells,
                                 seed=seeds[0])
        for seed in seeds:
            run = _one_run(store, experiment, seed, k_exp, config, truth, pca)
            m = run["metrics"]
            logger.info(
                "held out %r, seed %d: ARI MARS %.3f, K-means on AE %s, K-means on PCA %.3f (%.1f s)",
                experiment, seed, m["mars"]["ari"],
                "n/a" if m["kmeans_ae"] is None else f"{m['kmeans_ae']['ari']:.3f}",
                m["kmeans_pca"]["ari"], run["seconds"],
            )
            runs.append(run)
    summary, overall = _summarise(runs)
    return {
        "store": str(store.path),
        "protocol": {
            "kind": "leave-one-experiment-out",
            "seeds": seeds,
            "k": k if k == "truth" else int(k),
            "experiments": chosen,
            "methods": list(METHODS),
            "pca_components": int(pca_components),
            "pca_max_cells": int(pca_max_cells),
            "sd_ddof": 1,
            "config": config_to_dict(config),
        },
        "runs": runs,
        "summary": summary,
        "overall": overall,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---------------------------------------------------------------------------------------------
# reports


def _fmt(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def markdown_table(result: dict[str, Any]) -> str:
    """A markdown report of :func:`leave_one_out`: ARI per held-out experiment, then all metrics.

    Parameters
    ----------
    result
        The dict returned by :func:`leave_one_out`.

    Returns
    -------
    str
        Two tables: ARI mean ± sd over seeds per held-out experiment and method (with a row of
        means over experiments), and every metric's mean per method.
    """
    seeds = result["protocol"]["seeds"]
    lines = [
        f"Leave-one-experiment-out, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
        "ARI mean ± sd over seeds.",
        "",
        "| held-out experiment | cells | K | " + " | ".join(_METHOD_TITLES[m] for m in METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    for exp, s in result["summary"].items():
        cells = [_fmt(s["methods"].get(m, {}).get("ari")) for m in METHODS]
        lines.append(f"| {exp} | {s['n_cells']} | {s['k']} | " + " | ".join(cells) + " |")
    means = [
        f"{result['overall'][m]['ari']:.3f}" if m in result["overall"] else "n/a" for m in METHODS
    ]
    lines.append("| **mean** | | | " + " | ".join(means) + " |")
    lines += ["", "| method | " + " | ".join(_METRICS) + " |", "|---|" + "---|" * len(_METRICS)]
    for m in METHODS:
        if m in result["overall"]:
            vals = " | ".join(f"{result['overall'][m][k]:.3f}" for k in _METRICS)
            lines.append(f"| {_METHOD_TITLES[m]} | {vals} |")
    return "\n".join(lines) + "\n"


def _json_ready(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    out["runs"] = [{k: v for k, v in run.items() if k != "assignments"} for run in result["runs"]]
    return out


def write_report(result: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``evaluation.json``, ``evaluation.md`` and ``assignments.npz`` into ``output_dir``.

    Parameters
    ----------
    result
        The dict returned by :func:`leave_one_out`.
    output_dir
        Created if missing; files in it are replaced atomically.

    Returns
    -------
    dict
        Paths under ``json``, ``markdown`` and ``assignments``. The npz holds, per run and
        method, ``<experiment>/<seed>/<method>/{index,cluster,truth}`` (truth as strings, ``""``
        when missing).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json", "markdown": out / "evaluation.md", "assignments": out / "assignments.npz"}

    def atomic(path: Path, write) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        write(tmp)
        os.replace(tmp, path)

    atomic(paths["json"], lambda p: p.write_text(json.dumps(_json_ready(result), indent=2) + "\n"))
    atomic(paths["markdown"], lambda p: p.write_text(markdown_table(result)))
    arrays = {}
    for run in result["runs"]:
        for method, a in run["assignments"].items():
            if a is None:
                continue
            key = f"{run['experiment']}/{run['seed']}/{method}"
            arrays[f"{key}/index"] = a["index"]
            arrays[f"{key}/cluster"] = a["cluster"]
            arrays[f"{key}/truth"] = np.array(["" if t is None else str(t) for t in a["truth"]])

    def save_npz(path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic(paths["assignments"], save_npz)
    return paths


# ---------------------------------------------------------------------------------------------
# naming on a held-out experiment


def naming_report(
    store_path: str | os.PathLike,
    *,
    unannotated: str,
    config: RunConfig | None = None,
    n_clusters: str | int = "truth",
    seed: int = 0,
    key_added: str = "mars",
    novelty_threshold: float = 0.5,
    run_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train with one experiment held out, annotate it, and score the names against its labels.

    The labels of ``unannotated`` are used for ``K`` (``n_clusters="truth"``) and for scoring
    only. Results are written into the store (replacing earlier ones under ``key_added``).

    Parameters
    ----------
    store_path
        The store (written in place).
    unannotated
        The experiment to hold out.
    config
        Model and training options (``train.seed`` is replaced by ``seed``).
    n_clusters
        ``"truth"`` (number of true types in the held-out experiment) or an integer.
    seed
        Training and naming seed.
    key_added
        Prefix of the result elements in the store.
    novelty_threshold
        Passed to :func:`~mars_scale.annotate.annotate`.
    run_dir
        Where to save the model (default: not saved).

    Returns
    -------
    dict
        ``name_accuracy``: fraction of the held-out cells whose true type is an annotated type
        and whose predicted name equals it (cells called ``"novel"`` count as wrong);
        ``best_name_accuracy``: the same with each cluster's most probable annotated name,
        whether or not it is called novel (the paper's naming, without the novelty call);
        ``novel_types``: true types of the held-out experiment absent from the annotated
        experiments; ``per_type``: per true type, ``n_cells``, ``annotated`` (whether it is a
        known type), ``majority_cluster``, that cluster's ``label``, ``novelty`` and
        ``is_novel``, ``fraction_novel`` (of the type's cells called novel) and
        ``fraction_correct`` (called by their own name); ``clusters``: the per-cluster table;
        ``ari`` of the clusters; ``k``, ``seed``.
    """
    from mars_scale.annotate import annotate

    store = open_store(store_path)
    config = config or RunConfig()
    truth, n_types = _held_out_truth(store, unannotated)
    k = n_types if n_clusters == "truth" else int(n_clusters)
    cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    model = Mars(store, unannotated=unannotated, n_clusters=k, config=cfg).train()
    if run_dir is not None:
        model.save(run_dir, overwrite=True)
    result = annotate(store_path, model, key_added=key_added, overwrite=True, seed=seed,
                      novelty_threshold=novelty_threshold, device=cfg.train.device)
    naming = result.naming
    store = open_store(store_path)
    cluster_codes, cluster_cats = store.categorical_codes(f"{key_added}_cluster", *store.experiment_ranges[unannotated])
    clusters = np.asarray(cluster_cats, dtype=object)[cluster_codes].astype(int)
    predicted = np.asarray(naming.cell_type, dtype=object)
    annotated_types = set(model.annotated_landmarks[2])
    labelled = np.array([t is not None for t in truth])
    known = np.array([t is not None and t in annotated_types for t in truth])
    per_type = {}
    table = {int(r["cluster"]): r for r in result.cluster_table()}
    for t in sorted({t for t in truth if t is not None}):
        mine = np.array([x == t for x in truth])
        values, counts = np.unique(clusters[mine], return_counts=True)
        major = int(values[np.argmax(counts)])
        per_type[t] = {
            "n_cells": int(mine.sum()),
            "annotated": t in annotated_types,
            "majority_cluster": major,
            "majority_fraction": float(counts.max() / mine.sum()),
            "label": table[major]["name"],
            "novelty": table[major]["novelty"],
            "is_novel": table[major]["is_novel"],
            "fraction_novel": float(np.mean(predicted[mine] == naming.novel_label)),
            "fraction_correct": float(np.mean(predicted[mine] == t)),
        }
    accuracy = float(np.mean(predicted[known] == truth[known])) if known.any() else float("nan")
    best = np.asarray(naming.best_name, dtype=object)[np.searchsorted(naming.clusters, clusters)]
    best_accuracy = float(np.mean(best[known] == truth[known])) if known.any() else float("nan")
    return {
        "unannotated": unannotated,
        "k": k,
        "seed": seed,
        "name_accuracy": accuracy,
        "best_name_accuracy": best_accuracy,
        "n_scored": int(known.sum()),
        "novel_types": sorted({t for t in truth[labelled] if t not in annotated_types}),
        "ari": clustering_metrics(truth, clusters)["ari"],
        "per_type": per_type,
        "clusters": result.cluster_table(),
    }
