"""Accuracy benchmark: leave-one-experiment-out ARI of MARS beside the reference and two baselines.

For every dataset in ``../shared/data`` (and, as a separate row, ``cellbench_celseq2_dropseq``
restricted to its demuxlet ``singlet`` cells), each experiment in turn is held out unannotated
and MARS is trained once per seed with K = the number of true types in the held-out experiment
(:func:`mars_scale.evaluate.leave_one_out`, the reference protocol). The table puts MARS's ARI
(mean ± sd over seeds) beside the reference MARS figures of ``../shared/REFERENCE.md`` and
the two baselines of the same run (K-means on the pretrained autoencoder embedding, K-means on
PCA of the preprocessed data), and checks the acceptance criteria of the issue:

- mean ARI over seeds at or above the reference mean on every dataset;
- standard deviation of ARI over seeds at most 0.05 on every held-out experiment;
- MARS at or above both baselines on average.

Preprocessing is the paper's, as in the reference figures: genes in fewer than 5 cells are
dropped, every cell is kept, the model normalises to 10,000, takes log1p, scales jointly and
clips at 10. Nothing from a held-out experiment's labels enters training or any choice.

It also measures the two naming figures on ``cellbench_3cl_3protocols_panel`` with CEL-seq2
held out: the accuracy of the names when every held-out type is annotated elsewhere, and, with
one type removed from every annotated experiment (each type in turn), whether that type's
cluster is called novel while the others keep their names.

Examples::

    python benchmarks/accuracy.py                                   # everything, 5 seeds
    python benchmarks/accuracy.py --datasets mesc_kolodziejczyk2015_mini --seeds 2 --no-naming
    python benchmarks/accuracy.py --config tuned.toml --workdir /work/scratch/acc
    # gene selection: all genes against 2,000 highly variable genes, one process each (peak RSS)
    python benchmarks/accuracy.py --datasets cellbench_celseq2_dropseq --seeds 1 --no-naming --key genes-all-1seed
    python benchmarks/accuracy.py --datasets cellbench_celseq2_dropseq --seeds 1 --no-naming \
        --n-top-genes 2000 --key genes-2000-1seed

Results go to ``benchmarks/results/accuracy.json`` under ``runs["<selection>-<N>seeds"]``
(the full run is ``runs["all-5seeds"]``); the markdown table is printed and stored with them.
After each dataset the rows done so far are written there with ``"complete": false``, so a run
cut short (a time-limited GPU lease) keeps them; the last write sets ``"complete": true``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, peak_rss_mb, write_result  # noqa: E402

logger = logging.getLogger("benchmarks.accuracy")

# the shared data (tests/conftest.py): $MARS_SCALE_DATA, else ../shared/data beside the checkout
DATA = Path(os.environ.get("MARS_SCALE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SINGLET_SOURCE = "cellbench_celseq2_dropseq"
SINGLET_ROW = "cellbench_celseq2_dropseq_singlets"
NAMING_DATASET = "cellbench_3cl_3protocols_panel"
NAMING_HELD_OUT = "CELseq2"

# ../shared/REFERENCE.md: reference MARS (snap-stanford/mars f6f03ba), seeds 0-4, all cells.
REFERENCE: dict[str, dict[str, Any]] = {
    "cellbench_3cl_3protocols_panel": {
        "experiments": {"10x": (1.000, 0.000), "CELseq2": (0.998, 0.005), "Dropseq": (0.915, 0.007)},
        "mean": 0.971,
        "kmeans_ae": 0.970,
    },
    "cellbench_celseq2_dropseq": {
        "experiments": {
            "CELseq2_3cl": (1.000, 0.000), "CELseq2_5cl_p1": (0.916, 0.008), "CELseq2_5cl_p2": (0.926, 0.003),
            "CELseq2_5cl_p3": (0.969, 0.004), "Dropseq_3cl": (0.956, 0.011),
        },
        "mean": 0.954,
        "kmeans_ae": 0.942,
    },
    "mesc_kolodziejczyk2015_mini": {
        "experiments": {"batch2": (1.000, 0.000), "batch3": (0.858, 0.056)},
        "mean": 0.929,
        "kmeans_ae": 0.886,
    },
    "pancreas_3studies_beta_ductal_mini": {
        "experiments": {"batch_1": (0.980, 0.000), "batch_4": (1.000, 0.000), "batch_5": (0.965, 0.000)},
        "mean": 0.982,
        "kmeans_ae": 0.968,
    },
}
MAX_SD = 0.05


# ---------------------------------------------------------------------------------------------
# stores


def _build_store(source: Path, workdir: Path, name: str, *, singlets: bool = False,
                 hold_out: str | None = None, remove_type: str | None = None) -> Path:
    """Ingest one h5ad (optionally filtered) into a fresh store under ``workdir``."""
    import anndata as ad

    from mars_scale.ingest import IngestConfig, ingest

    directory = workdir / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    h5ad = source
    if singlets or remove_type is not None:
        adata = ad.read_h5ad(source)
        keep = np.ones(adata.n_obs, dtype=bool)
        if singlets:
            keep &= adata.obs["singlet"].astype(bool).to_numpy()
        if remove_type is not None:
            keep &= ~((adata.obs["cell_type"] == remove_type) & (adata.obs["experiment"] != hold_out)).to_numpy()
        h5ad = directory / "cells.h5ad"
        adata[keep].copy().write_h5ad(h5ad)
    config = IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=5, min_counts=1.0, min_genes=1)
    return ingest([h5ad], directory / "atlas.zarr", config=config)


# ---------------------------------------------------------------------------------------------
# the two parts


def _accuracy(row: str, store: Path, seeds: list[int], config, experiments: list[str] | None = None) -> dict[str, Any]:
    from mars_scale.evaluate import leave_one_out
    from mars_scale.store import open_store

    t0, cpu0 = time.perf_counter(), time.process_time()
    result = leave_one_out(store, seeds=seeds, config=config, experiments=experiments)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    reference = REFERENCE.get(row)  # the singlet row has no reference figures (all cells were used)
    experiments = {}
    for exp, s in result["summary"].items():
        methods = s["methods"]
        ref = reference["experiments"].get(exp) if reference else None
        experiments[exp] = {
            "n_cells": s["n_cells"],
            "k": s["k"],
            "mars_ari": methods["mars"]["ari"],
            "kmeans_ae_ari": methods.get("kmeans_ae", {}).get("ari"),
            "kmeans_pca_ari": methods["kmeans_pca"]["ari"],
            "mars_all_metrics": {m: v["mean"] for m, v in methods["mars"].items()},
            "reference_ari": None if ref is None else {"mean": ref[0], "sd": ref[1]},
            "per_seed_ari": [r["metrics"]["mars"]["ari"] for r in result["runs"] if r["experiment"] == exp],
            "unused_landmarks_per_seed": [r["n_unused_landmarks"] for r in result["runs"] if r["experiment"] == exp],
            "train_seconds_per_seed": [r["train_seconds"] for r in result["runs"] if r["experiment"] == exp],
        }
    overall = result["overall"]
    mars_mean = overall["mars"]["ari"]
    checks = {
        "max_sd": max(e["mars_ari"]["sd"] for e in experiments.values()),
        "sd_at_most_0.05": all(e["mars_ari"]["sd"] <= MAX_SD for e in experiments.values()),
        "above_kmeans_ae": None if "kmeans_ae" not in overall else mars_mean >= overall["kmeans_ae"]["ari"],
        "above_kmeans_pca": mars_mean >= overall["kmeans_pca"]["ari"],
    }
    if reference and experiments is None:
        # at the precision REFERENCE.md gives (3 decimals): its means are rounded figures
        checks["at_or_above_reference_mean"] = round(mars_mean, 3) >= reference["mean"]
    return {
        "store": str(store),
        "n_genes_store": open_store(store).n_genes,
        "n_top_genes": config.train.n_top_genes,
        "experiments": experiments,
        "mean_ari": {m: overall[m]["ari"] for m in overall},
        "mean_metrics": overall,
        "reference_mean_ari": None if reference is None else reference["mean"],
        "reference_kmeans_ae_mean_ari": None if reference is None else reference["kmeans_ae"],
        "checks": checks,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # this process's CPU time: robust to other load
    }


def _naming(source: Path, workdir: Path, seeds: list[int], config) -> dict[str, Any]:
    import anndata as ad

    from mars_scale.evaluate import naming_report

    adata = ad.read_h5ad(source, backed="r")
    held = adata.obs["experiment"] == NAMING_HELD_OUT
    types = sorted(adata.obs["cell_type"][held].astype(str).unique())
    adata.file.close()
    shared, novel = [], {}
    store = _build_store(source, workdir, "naming-shared")
    for seed in seeds:
        r = naming_report(store, unannotated=NAMING_HELD_OUT, config=config, seed=seed)
        shared.append({k: r[k] for k in ("seed", "name_accuracy", "best_name_accuracy", "ari", "per_type", "clusters")})
        logger.info("naming, shared types, seed %d: name accuracy %.3f (most probable names %.3f)",
                    seed, r["name_accuracy"], r["best_name_accuracy"])
    for removed in types:
        store = _build_store(source, workdir, f"naming-without-{removed}", hold_out=NAMING_HELD_OUT, remove_type=removed)
        runs = []
        for seed in seeds:
            r = naming_report(store, unannotated=NAMING_HELD_OUT, config=config, seed=seed)
            known = [t for t in r["per_type"] if t != removed]
            runs.append({
                "seed": seed,
                "removed_flagged_novel": bool(r["per_type"][removed]["is_novel"]),
                "removed_novelty": r["per_type"][removed]["novelty"],
                "known_called_novel": [t for t in known if r["per_type"][t]["is_novel"]],
                "known_correct": [t for t in known if r["per_type"][t]["label"] == t],
                "ari": r["ari"],
                "per_type": r["per_type"],
            })
            logger.info("naming without %s, seed %d: flagged novel %s (novelty %.3f); known types called novel: %s",
                        removed, seed, runs[-1]["removed_flagged_novel"], runs[-1]["removed_novelty"],
                        runs[-1]["known_called_novel"])
        novel[removed] = runs
    accuracies = [s["name_accuracy"] for s in shared]
    return {
        "dataset": NAMING_DATASET,
        "held_out": NAMING_HELD_OUT,
        "shared_types": {
            "name_accuracy_mean": float(np.mean(accuracies)),
            "name_accuracy_per_seed": accuracies,
            "best_name_accuracy_mean": float(np.mean([s["best_name_accuracy"] for s in shared])),
            "runs": shared,
        },
        "removed_type": {
            "flagged_novel_fraction": float(np.mean([r["removed_flagged_novel"] for runs in novel.values() for r in runs])),
            "known_types_called_novel_fraction": float(np.mean(
                [len(r["known_called_novel"]) / max(len(r["known_called_novel"]) + len(r["known_correct"]), 1)
                 for runs in novel.values() for r in runs])),
            "runs": novel,
        },
    }


# ---------------------------------------------------------------------------------------------
# report


def _ms(stat: dict[str, float] | None) -> str:
    return "n/a" if stat is None else f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def markdown(rows: dict[str, Any], naming: dict[str, Any] | None, n_seeds: int) -> str:
    lines = [
        f"Leave-one-experiment-out ARI, mean ± sd over {n_seeds} seeds; reference: ../shared/REFERENCE.md.",
        "",
        "| dataset | held-out experiment | cells | K | MARS (ours) | reference MARS | K-means on AE | K-means on PCA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, r in rows.items():
        for exp, e in r["experiments"].items():
            lines.append(f"| {row} | {exp} | {e['n_cells']} | {e['k']} | {_ms(e['mars_ari'])} | "
                         f"{_ms(e['reference_ari'])} | {_ms(e['kmeans_ae_ari'])} | {_ms(e['kmeans_pca_ari'])} |")
    lines += [
        "",
        "| dataset | MARS mean | reference mean | ref. K-means on AE | K-means on AE | K-means on PCA | max sd | checks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, r in rows.items():
        m = r["mean_ari"]
        ref = "n/a" if r["reference_mean_ari"] is None else f"{r['reference_mean_ari']:.3f}"
        ref_ae = "n/a" if r["reference_kmeans_ae_mean_ari"] is None else f"{r['reference_kmeans_ae_mean_ari']:.3f}"
        failed = [k for k, v in r["checks"].items() if v is False]
        ae = f"{m['kmeans_ae']:.3f}" if "kmeans_ae" in m else "n/a"
        verdict = "pass" if not failed else "FAIL: " + ", ".join(failed)
        lines.append(f"| {row} | {m['mars']:.3f} | {ref} | {ref_ae} | {ae} | {m['kmeans_pca']:.3f} | "
                     f"{r['checks']['max_sd']:.3f} | {verdict} |")
    if naming:
        s, n = naming["shared_types"], naming["removed_type"]
        lines += [
            "",
            f"Naming ({naming['dataset']}, {naming['held_out']} held out): name accuracy with all types shared "
            f"{s['name_accuracy_mean']:.3f} (most probable names {s['best_name_accuracy_mean']:.3f}); "
            f"a type removed from the annotated experiments is flagged novel in "
            f"{100 * n['flagged_novel_fraction']:.0f}% of runs, known types called novel in "
            f"{100 * n['known_types_called_novel_fraction']:.0f}% of cases.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="Directory of the h5ad files.")
    parser.add_argument("--datasets", default=None, help="Comma-separated dataset stems (default: all), "
                        f"plus {SINGLET_ROW} for the singlet row.")
    parser.add_argument("--seeds", type=int, default=5, help="Seeds 0..N-1.")
    parser.add_argument("--config", type=Path, default=None, help="TOML run configuration (default: the package defaults).")
    parser.add_argument("--device", default="cpu", help="Training device (default cpu).")
    parser.add_argument("--experiments", default=None,
                        help="Comma-separated experiments to hold out (default: each in turn).")
    parser.add_argument("--n-top-genes", type=int, default=None,
                        help="Train on this many highly variable genes (train.n_top_genes; default: all genes).")
    parser.add_argument("--no-naming", action="store_true", help="Skip the naming figures.")
    parser.add_argument("--workdir", type=Path, default=None, help="Scratch directory for the stores (default: a temporary one).")
    parser.add_argument("--key", default=None, help="Key under runs[] in accuracy.json (default: <selection>-<N>seeds).")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    from mars_scale.config import RunConfig, config_to_dict, load_config, override

    config = load_config(args.config) if args.config else RunConfig()
    config = override(config, device=args.device, n_top_genes=args.n_top_genes)
    available = sorted(p.stem for p in args.data.glob("*.h5ad"))
    rows_all = available + ([SINGLET_ROW] if SINGLET_SOURCE in available else [])
    selected = rows_all if args.datasets is None else [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(selected) - set(rows_all))
    if unknown:
        parser.error(f"unknown datasets {unknown} (available: {rows_all})")
    seeds = list(range(args.seeds))
    key = args.key or f"{'all' if selected == rows_all else '+'.join(selected)}-{args.seeds}seeds"

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mars-accuracy-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def payload(rows: dict, naming, table: str | None, *, complete: bool) -> dict:
        return {
            "complete": complete,
            "parameters": {"datasets": selected, "seeds": seeds, "config": config_to_dict(config),
                           "experiments": args.experiments, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                           "config_file": None if args.config is None else str(args.config),
                           "preprocessing": {"min_cells": 5, "min_counts": 1, "min_genes": 1, "target_sum": 1e4,
                                             "log1p": True, "max_value": 10}},
            "datasets": rows,
            "naming": naming,
            "checks": {row: r["checks"] for row, r in rows.items()},
            "table_markdown": table,
            "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "load_average_end": load_average(),
        }

    try:
        rows = {}
        for row in selected:
            singlets = row == SINGLET_ROW
            source = args.data / f"{SINGLET_SOURCE if singlets else row}.h5ad"
            store = _build_store(source, workdir, row, singlets=singlets)
            logger.info("%s: leave-one-out over %d seeds", row, len(seeds))
            held = None if args.experiments is None else [e.strip() for e in args.experiments.split(",") if e.strip()]
            rows[row] = _accuracy(row, store, seeds, config, held)
            logger.info("%s: mean ARI %s in %.0f s", row, {m: round(v, 3) for m, v in rows[row]["mean_ari"].items()},
                        rows[row]["seconds"])
            if len(selected) > 1 or not args.no_naming:  # keep what is done if a later step dies
                write_result("accuracy", payload(rows, None, None, complete=False), key=key)
        naming = None
        if not args.no_naming and (args.data / f"{NAMING_DATASET}.h5ad").exists():
            naming = _naming(args.data / f"{NAMING_DATASET}.h5ad", workdir, seeds, config)
        table = markdown(rows, naming, len(seeds))
    finally:
        if tmp is not None:
            tmp.cleanup()
    path = write_result("accuracy", payload(rows, naming, table, complete=True), key=key)
    print(table)
    print(f"wrote {path} (runs[{key!r}])")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
