"""End-to-end benchmark: ingest (from h5ad), train and annotate a simulated atlas, per stage.

Each stage runs as the real command line (``mars-scale ingest|train|annotate``) in its own
process, so its wall time and peak RSS are its own. The atlas has ``--experiments`` experiments
and ``--cell-types`` types (some restricted to some experiments); the first experiment is held
out unannotated with K = the number of types it holds, and the ARI of its clusters against the
simulated truth is reported.

Examples::

    python benchmarks/end_to_end.py --cells 100000,1000000
    python benchmarks/end_to_end.py --cells 20000 --scratch /tmp/e2e     # a quick check

Training uses ``--batch-size`` and caps the annotated cells visited per fine-tuning epoch
(``annotated_cells_per_epoch``), the settings docs/scaling.md recommends for a large reference
and a small new experiment; they are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, write_result  # noqa: E402

_WRAP = (
    "import resource, subprocess, sys, json, time;"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]);"
    "print(json.dumps({'rc': r.returncode, 'wall_s': time.perf_counter() - t,"
    " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
)


def _stage(cmd: list[str], log: Path) -> dict:
    """Run one command in a wrapper process that reports the command's own peak RSS."""
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run([sys.executable, "-c", _WRAP, *cmd], stdout=subprocess.PIPE, stderr=fh, text=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise SystemExit(f"stage failed ({out['rc']}): {' '.join(cmd)}; see {log}")
    out["load_average"] = load_average()
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def run_size(n_cells: int, args, scratch: Path) -> dict:
    from mars_scale.metrics import clustering_metrics
    from mars_scale.simulate import SimulationConfig, Simulator, write_h5ad
    from mars_scale.store import open_store

    work = scratch / f"e2e_{n_cells}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    sim = SimulationConfig(n_cells=n_cells, n_genes=args.genes, n_experiments=args.experiments,
                           n_cell_types=args.cell_types, seed=args.seed)
    simulator = Simulator(sim)
    held = str(simulator.experiments[0])
    k = int(simulator.presence[0].sum())
    h5ad = work / "atlas.h5ad"
    t = time.perf_counter()
    if not h5ad.exists():
        write_h5ad(h5ad, sim)
    simulate_s = time.perf_counter() - t
    store, run = work / "atlas.zarr", work / "run"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    config = work / "train.toml"
    config.write_text(
        "[train]\n"
        f"batch_size = {args.batch_size}\n"
        f"annotated_cells_per_epoch = {args.annotated_cells_per_epoch}\n"
        f"pretrain_epochs = {args.pretrain_epochs}\n"
        f"warmup_epochs = {args.warmup_epochs}\n"
        f"finetune_epochs = {args.finetune_epochs}\n"
        "device = \"cpu\"\n"
    )
    cli = [sys.executable, "-m", "mars_scale", "-q"]
    stages = {
        "ingest": _stage([*cli, "ingest", str(h5ad), "-o", str(store), "--experiment-key", "experiment",
                          "--label-key", "cell_type"], log),
        "train": _stage([*cli, "train", str(store), "--unannotated", held, "--n-clusters", str(k),
                         "-o", str(run), "--config", str(config)], log),
        "annotate": _stage([*cli, "annotate", str(store), "--model", str(run)], log),
    }
    atlas = open_store(store)
    a, b = atlas.experiment_ranges[held]
    truth, _ = atlas.categorical_codes("cell_type", a, b)
    codes, names = atlas.categorical_codes("mars_cluster", a, b)
    metrics = clustering_metrics(truth, np.asarray(names, dtype=object)[codes])
    return {
        "n_cells": n_cells,
        "held_out": held,
        "n_clusters": k,
        "held_out_cells": b - a,
        "simulate_s": round(simulate_s, 1),
        "stages": stages,
        "total_s": round(sum(s["wall_s"] for s in stages.values()), 1),
        "max_peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
        "ari": metrics["ari"],
        "metrics": metrics,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="100000,1000000")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--experiments", type=int, default=20)
    p.add_argument("--cell-types", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--annotated-cells-per-epoch", type=int, default=100_000)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--scratch", type=Path, default=Path("/work/scratch/e2e"))
    p.add_argument("--key", default=None)
    args = p.parse_args()
    sizes = [int(c) for c in args.cells.split(",")]
    results = {}
    for n in sizes:
        results[str(n)] = run_size(n, args, args.scratch)
        print(json.dumps(results[str(n)], indent=1), flush=True)
    payload = {"parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "sizes": results}
    if len(sizes) == 2:
        small, large = (results[str(n)] for n in sorted(sizes))
        payload["time_ratio"] = round(large["total_s"] / small["total_s"], 2)
    write_result("end_to_end", payload, key=args.key)


if __name__ == "__main__":
    main()
