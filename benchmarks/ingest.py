"""Ingest throughput and peak memory against the in-memory anndata route.

For each size (by default 100,000 and 300,000 cells x 20,000 genes, about 1,000 non-zeros per
cell, 4 experiments, 10 cell types) one synthetic h5ad file is simulated with
:func:`mars_scale.simulate.write_h5ad` into a scratch directory outside the repository (reused
when it is already there with the same parameters). Then, in the same run and on the same
file, each route runs in its own process, so that its peak RSS is its own:

``mars_scale``
    ``python -m mars_scale -q ingest FILE -o OUT --experiment-key experiment --label-key
    cell_type`` (the ``mars-scale ingest`` command: two streaming passes, QC filters, per-gene
    statistics, checksums of the inputs);
``in_memory``
    ``anndata.read_h5ad(FILE)`` then ``AnnData.write_zarr(OUT)`` (anndata's defaults: zarr
    format 2, Blosc lz4);
``workers_N``
    the ``mars_scale`` command with ``--workers N``: reading, checks and statistics of each
    block on a ``dask.distributed`` LocalCluster of N worker processes (cluster start included;
    the peak RSS is the main process's: the workers are not its waited-for children).

Wall time, CPU time and peak RSS (``ru_maxrss`` of the child, from ``os.wait4``) are taken
around the whole child process, interpreter start and imports included, for both routes.
Repeats interleave the routes and alternate which goes first; medians are reported, and the
largest peak RSS. The input is read once before the first measurement so both routes find
it in the page cache.

Example::

    OMP_NUM_THREADS=1 python benchmarks/ingest.py --scratch /work/scratch/bench_ingest
    OMP_NUM_THREADS=1 python benchmarks/ingest.py --sizes 100000 --routes mars_scale,workers_1,workers_2 \
        --name ingest_workers

Results go to ``benchmarks/results/ingest.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _MARK, load_average, measurement_main, write_result  # noqa: E402

logger = logging.getLogger("benchmarks.ingest")

ROUTES = ("mars_scale", "in_memory")


# ---------------------------------------------------------------------------------------------
# The in-memory route (runs in a child process started by _run_child)


def measure_in_memory(p: dict) -> dict:
    """``anndata.read_h5ad`` then ``write_zarr``, timed separately."""
    import anndata as ad

    started = time.perf_counter()
    adata = ad.read_h5ad(p["input"])
    read_s = time.perf_counter() - started
    adata.write_zarr(p["output"])
    write_s = time.perf_counter() - started - read_s
    return {
        "read_s": round(read_s, 3),
        "write_s": round(write_s, 3),
        "n_obs": int(adata.n_obs),
        "nnz": int(adata.X.nnz),
        "zarr_write_format": int(ad.settings.zarr_write_format),
    }


MEASUREMENTS = {"in_memory": measure_in_memory}


# ---------------------------------------------------------------------------------------------
# Driver


def _run_child(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` to completion; wall time, CPU time and peak RSS of that process alone."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{output[-3000:]}")
    result = {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "load_average": load_average(),
    }
    lines = [ln for ln in output.splitlines() if ln.startswith(_MARK)]
    if lines:
        child = json.loads(lines[-1][len(_MARK):])
        result["child"] = {k: child[k] for k in ("read_s", "write_s", "n_obs", "nnz", "zarr_write_format")}
    return result


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _ensure_input(path: Path, config) -> dict:
    """Simulate the input unless a file with the same configuration is already there."""
    import h5py

    from mars_scale.simulate import write_h5ad

    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                saved = {k: f["uns/simulation/config"][k][()] for k in ("n_cells", "n_genes", "seed",
                                                                         "n_experiments", "n_cell_types")}
        except (OSError, KeyError):
            saved = None
        wanted = {k: getattr(config, k) for k in ("n_cells", "n_genes", "seed", "n_experiments", "n_cell_types")}
        if saved is not None and {k: int(v) for k, v in saved.items()} == wanted:
            logger.info("reusing %s", path)
            return {"generated": False}
    started = time.perf_counter()
    write_h5ad(path, config, overwrite=True)
    return {"generated": True, "generate_s": round(time.perf_counter() - started, 1)}


def _warm_page_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def _check_output(route: str, out: Path, n_cells: int) -> dict:
    """Cheap checks that the child wrote what it should (shape of X), and its size on disk."""
    import zarr

    root = zarr.open_group(out, mode="r")
    shape = [int(v) for v in root["X"].attrs["shape"]]
    if shape[0] != n_cells:
        raise RuntimeError(f"{route}: {out} holds {shape[0]} cells, expected {n_cells}")
    return {"shape": shape, "zarr_format": int(root.metadata.zarr_format), "size_bytes": _size_on_disk(out)}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,300000", help="comma-separated cell counts")
    ap.add_argument("--n-genes", type=int, default=20_000)
    ap.add_argument("--nnz-per-cell", type=float, default=1000.0)
    ap.add_argument("--n-experiments", type=int, default=4)
    ap.add_argument("--n-cell-types", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="measurements per route and size, interleaved")
    ap.add_argument("--scratch", type=Path, default=Path("/work/scratch/bench_ingest"))
    ap.add_argument("--name", default="ingest", help="results file stem")
    ap.add_argument("--routes", default=",".join(ROUTES),
                    help="comma-separated: mars_scale, in_memory, workers_N (mars_scale with --workers N)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from mars_scale.simulate import SimulationConfig

    root = Path(__file__).resolve().parents[1]
    if args.scratch.resolve().is_relative_to(root):
        raise SystemExit(f"--scratch {args.scratch} is inside the repository; choose a directory outside it")
    args.scratch.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    routes = tuple(args.routes.split(","))
    for route in routes:
        if route not in ROUTES and not (route.startswith("workers_") and route[8:].isdigit()):
            raise SystemExit(f"unknown route {route!r}")
    script = str(Path(__file__).resolve())
    commands = {
        "mars_scale": "python -m mars_scale -q ingest INPUT -o OUTPUT --experiment-key experiment --label-key cell_type",
        "in_memory": "anndata.read_h5ad(INPUT).write_zarr(OUTPUT)",
        "workers_N": "python -m mars_scale -q ingest INPUT -o OUTPUT --experiment-key experiment "
                     "--label-key cell_type --workers N",
    }
    results: dict[str, dict] = {}
    for n_cells in sizes:
        config = SimulationConfig(n_cells=n_cells, n_genes=args.n_genes, n_experiments=args.n_experiments,
                                  n_cell_types=args.n_cell_types, seed=args.seed,
                                  mean_nnz_per_cell=args.nnz_per_cell)
        tag = f"{n_cells}x{args.n_genes}"
        h5ad = args.scratch / f"sim_{tag}.h5ad"
        entry: dict = {"input": {"path": str(h5ad), **_ensure_input(h5ad, config),
                                 "size_bytes": h5ad.stat().st_size, "simulation": config.to_dict()}}
        _warm_page_cache(h5ad)
        runs: dict[str, list[dict]] = {r: [] for r in routes}
        for rep in range(args.repeats):
            order = routes if rep % 2 == 0 else routes[::-1]
            for route in order:
                out = args.scratch / f"out_{tag}_{route}.zarr"
                shutil.rmtree(out, ignore_errors=True)
                if route == "mars_scale" or route.startswith("workers_"):
                    cmd = [sys.executable, "-m", "mars_scale", "-q", "ingest", str(h5ad), "-o", str(out),
                           "--experiment-key", "experiment", "--label-key", "cell_type"]
                    if route.startswith("workers_"):
                        cmd += ["--workers", route[8:]]
                else:
                    cmd = [sys.executable, script, "--measure", "in_memory",
                           "--params", json.dumps({"input": str(h5ad), "output": str(out)})]
                logger.info("%s, %s, repeat %d", tag, route, rep + 1)
                res = _run_child(cmd, args.scratch / f"out_{tag}_{route}.log")
                res["output"] = _check_output(route, out, n_cells)
                res["repeat"] = rep
                runs[route].append(res)
                logger.info("%s %s: %.1f s, %.0f cells/s, peak RSS %.0f MB", tag, route, res["wall_s"],
                            n_cells / res["wall_s"], res["peak_rss_mb"])
                shutil.rmtree(out, ignore_errors=True)
        summary = {}
        for route in routes:
            wall = _median([r["wall_s"] for r in runs[route]])
            summary[route] = {
                "wall_s": wall,
                "cells_per_s": round(n_cells / wall, 1),
                "cpu_s": _median([r["cpu_s"] for r in runs[route]]),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[route]),
                "size_on_disk_mb": round(runs[route][-1]["output"]["size_bytes"] / 2**20, 1),
            }
        for route in routes:
            if route != "mars_scale" and "mars_scale" in summary:
                summary[f"ratio_mars_scale_over_{route}"] = {
                    key: round(summary["mars_scale"][key] / summary[route][key], 3)
                    for key in ("wall_s", "cells_per_s", "cpu_s", "peak_rss_mb")
                }
        entry["runs"] = runs
        entry["summary"] = summary
        results[tag] = entry

    tags = list(results)
    growth = {}
    if len(tags) >= 2:
        small, large = tags[0], tags[-1]
        growth = {
            "cells": [sizes[0], sizes[-1]],
            **{
                f"{route}_peak_rss_ratio": round(results[large]["summary"][route]["peak_rss_mb"]
                                                 / results[small]["summary"][route]["peak_rss_mb"], 3)
                for route in routes
            },
        }
    write_result(args.name, {
        "parameters": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "sizes": sizes, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "commands": commands,
        "sizes": results,
        "peak_rss_growth": growth,
        "note": "wall and CPU times are medians over interleaved repeats, peak RSS the largest; each "
                "measurement is a whole child process (interpreter start and imports included)",
    })


if __name__ == "__main__":
    if measurement_main(MEASUREMENTS):  # this process is a measurement child
        raise SystemExit(0)
    main()
