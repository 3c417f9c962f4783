"""mars-scale's loader against its peers annbatch and scDataset, on the same h5ad, raw and normalised batches.

One run: one simulated h5ad (``mars_scale.simulate.write_h5ad``), converted once by each tool
(mars-scale ``ingest`` with its defaults; annbatch's ``DatasetCollection.add_adatas`` with its
defaults, which shuffles the cells on disk), then ``--rounds`` rounds in which every variant runs
in its own fresh process, in an order rotated from round to round:

- ``mars_scale_raw`` / ``mars_scale_normalized``: :class:`mars_scale.loader.Loader` with
  ``normalize=False`` / ``True`` (defaults otherwise), batches of ``--batch-size``.
- ``annbatch_raw`` / ``annbatch_normalized``: ``annbatch.Loader`` with its defaults
  (``chunk_size=512, preload_nchunks=32``), ``shuffle=True``, torch sparse CSR batches
  (``to="torch"``) with the ``experiment`` and ``cell_type`` columns of ``obs``, zarrs as zarr's
  codec pipeline (as annbatch recommends for local disks); the normalised variant applies
  :func:`mars_scale.preprocess.normalize_log1p` (the function mars-scale's loader uses) to each
  batch's values in place.
- ``scdataset_raw`` / ``scdataset_normalized``: scDataset with its defaults
  (``BlockShuffling(block_size=8)``, ``fetch_factor=16``) over the h5ad opened with
  ``anndata.read_h5ad(backed="r")``, batches converted to torch sparse CSR; it reads far slower,
  so each of its passes stops after ``--scdataset-batches`` batches.
- ``mars_scale_spec_0_1_1_*``: the same loader on the same cells ingested with the layout of
  before this benchmark (1,024 cells per chunk, 32 chunks per shard, int32 column indices), to
  measure what the store changes gave.

Each process runs ``--epochs`` whole epochs; per epoch it records cells/s, CPU seconds (all
threads) and batch mixing (distinct experiments per batch, against batches drawn uniformly at
random), and for the process its peak RSS and its RSS once the loader is built (imports, the
store opened): ``loader_rss_mb`` is the difference, the memory of the epochs themselves. The
two interpreters import different torch builds (CPU for mars-scale; the CUDA build from PyPI for
annbatch, as no CPU build for Python 3.12 is reachable here), which differ by a few hundred MB
at import, so the loaders' own memory is compared as well as the peaks. Ratios are taken within a
round (the two processes ran minutes apart at most), then the median over rounds; as other work
on a shared machine only slows a run down, the best run of each variant is the least disturbed
estimate, and the ratio of the bests is given too.

annbatch needs Python >= 3.12: give the peers' interpreter with ``--peers-python`` (a virtual
environment with ``annbatch``, ``zarrs``, ``scdataset``, ``torch`` and ``psutil``; none of them
a dependency of mars-scale, and no test imports them)::

    /root/.pyenv/versions/3.12.1/bin/python -m venv /work/scratch/peers-venv
    /work/scratch/peers-venv/bin/pip install annbatch zarrs scdataset torch psutil
    python benchmarks/peers.py --scratch /work/scratch/peers \\
        --peers-python /work/scratch/peers-venv/bin/python --n-cells 200000 --n-genes 20000

Results: ``benchmarks/results/peers.json``, under ``runs["<cells>x<genes>"]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    cpu_seconds, current_rss_mb, load_average, measurement_main, run_measurement, write_result,
)
from loader import _files, _median, _start_run, measure_simulate  # noqa: E402

logger = logging.getLogger("benchmarks.peers")

MARS_VARIANTS = ("mars_scale_raw", "mars_scale_normalized")
OLD_VARIANTS = ("mars_scale_spec_0_1_1_raw", "mars_scale_spec_0_1_1_normalized")
PEER_VARIANTS = ("annbatch_raw", "annbatch_normalized")
SCDATASET_VARIANTS = ("scdataset_raw", "scdataset_normalized")


# ---------------------------------------------------------------------------------------------
# Measurements (each runs in a child process)


def _mixing(experiments: list[np.ndarray], n_experiments_total: np.ndarray, batch_size: int) -> dict:
    """Distinct experiments per batch, and the same for batches drawn uniformly at random."""
    per_batch = [len(np.unique(e)) for e in experiments]
    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(len(n_experiments_total)), n_experiments_total)
    uniform = [len(np.unique(rng.choice(codes, batch_size, replace=False))) for _ in range(200)]
    return {"experiments_per_batch_mean": round(float(np.mean(per_batch)), 2),
            "uniform_experiments_per_batch_mean": round(float(np.mean(uniform)), 2)}


def _epochs(batches_of_epoch, n_epochs: int) -> tuple[list[dict], list[np.ndarray]]:
    """Time ``n_epochs`` epochs; ``batches_of_epoch(e)`` yields (rows, experiment codes)."""
    out, first_codes = [], []
    for epoch in range(n_epochs):
        rows = n = 0
        codes = []
        wall, cpu = time.perf_counter(), cpu_seconds()
        for n_rows, exp in batches_of_epoch(epoch):
            rows += n_rows
            n += 1
            codes.append(exp)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        out.append({"cells": rows, "batches": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                    "cells_per_s": round(rows / wall), "cells_per_cpu_s": round(rows / cpu)})
        if epoch == 0:
            first_codes = codes
    return out, first_codes


def measure_mars(p: dict) -> dict:
    """mars-scale's loader, raw or normalised, ``epochs`` whole epochs."""
    from mars_scale.loader import Loader
    from mars_scale.store import open_store

    atlas = open_store(p["store"])
    loader = Loader(atlas, batch_size=p["batch_size"], seed=p["seed"], normalize=p["normalize"])
    after_imports = current_rss_mb()

    def batches(epoch):
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch.n_rows, batch.experiment.numpy()

    epochs, codes = _epochs(batches, p["epochs"])
    sizes = np.diff(np.array([r for r in atlas.experiment_ranges.values()]), axis=1).ravel()
    return {"epochs": epochs, "mixing": _mixing(codes, sizes, p["batch_size"]),
            "rss_after_imports_mb": round(after_imports, 1),
            "rows_per_block": loader.rows_per_block, "blocks_per_buffer": loader.blocks_per_buffer}


def measure_annbatch(p: dict) -> dict:
    """annbatch's loader on its collection, its defaults, torch sparse CSR batches."""
    import anndata as ad
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    from annbatch import DatasetCollection, Loader

    from mars_scale.preprocess import normalize_log1p

    def load(group):  # X on disk, the two obs columns the comparison needs in memory
        obs = ad.io.read_elem(group["obs"])[["experiment", "cell_type"]]
        return ad.AnnData(X=ad.io.sparse_dataset(group["X"]), obs=obs)

    loader = Loader(batch_size=p["batch_size"], shuffle=True, rng=np.random.default_rng(p["seed"]),
                    preload_to_gpu=False, to="torch")
    loader.use_collection(DatasetCollection(p["store"]), load_adata=load)
    after_imports = current_rss_mb()

    def batches(epoch):
        for batch in loader:
            x = batch["X"]
            if p["normalize"]:
                values = x.values().numpy()
                normalize_log1p(x.crow_indices().numpy(), x.col_indices().numpy(), values, out=values)
            yield x.shape[0], batch["obs"]["experiment"].cat.codes.to_numpy()

    epochs, codes = _epochs(batches, p["epochs"])
    sizes = np.bincount(np.concatenate(codes))
    return {"epochs": epochs, "mixing": _mixing(codes, sizes[sizes > 0], p["batch_size"]),
            "rss_after_imports_mb": round(after_imports, 1)}


def measure_scdataset(p: dict) -> dict:
    """scDataset (block shuffling, its defaults) over the h5ad opened backed, ``max_batches`` a pass."""
    import itertools
    import warnings

    import anndata as ad
    import torch
    from scdataset import scDataset
    from scdataset.strategy import BlockShuffling

    from mars_scale.preprocess import normalize_log1p

    adata = ad.read_h5ad(p["h5ad"], backed="r")
    x, codes = adata.X, adata.obs["experiment"].cat.codes.to_numpy()
    dataset = scDataset(
        adata, BlockShuffling(), batch_size=p["batch_size"], seed=p["seed"],
        fetch_callback=lambda _, index: (x[index], codes[index]),
        batch_callback=lambda fetched, index: (fetched[0][index], fetched[1][index]),
    )
    after_imports = current_rss_mb()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

    def batches(epoch):
        for sub, exp in itertools.islice(dataset, p["max_batches"]):
            if p["normalize"]:
                normalize_log1p(sub.indptr, sub.indices, sub.data, out=sub.data)
            torch.sparse_csr_tensor(torch.from_numpy(sub.indptr), torch.from_numpy(sub.indices),
                                    torch.from_numpy(sub.data), size=sub.shape)
            yield sub.shape[0], exp

    epochs, codes_seen = _epochs(batches, p["epochs"])
    sizes = np.bincount(codes)
    return {"epochs": epochs, "mixing": _mixing(codes_seen, sizes[sizes > 0], p["batch_size"]),
            "rss_after_imports_mb": round(after_imports, 1)}


def measure_mars_convert(p: dict) -> dict:
    """``mars-scale ingest`` of the h5ad (its defaults, or the layout of spec 0.1.1)."""
    import contextlib

    from mars_scale.ingest import IngestConfig, ingest
    from mars_scale.store import StoreLayout

    old = p.get("spec_0_1_1_layout", False)
    layout = StoreLayout(rows_per_chunk=1024, chunks_per_shard=32) if old else StoreLayout()
    with _int32_indices() if old else contextlib.nullcontext():
        ingest([p["h5ad"]], p["store"], overwrite=True, config=IngestConfig(
            experiment_key="experiment", label_key="cell_type", layout=layout))
    return {}


def _int32_indices():
    """Column indices written as int32, as before spec 0.1.2."""
    import contextlib

    import mars_scale.store as store_module

    stack = contextlib.ExitStack()
    old = store_module.UINT16_GENES
    store_module.UINT16_GENES = 0
    stack.callback(setattr, store_module, "UINT16_GENES", old)
    return stack


def measure_annbatch_convert(p: dict) -> dict:
    """annbatch's ``DatasetCollection.add_adatas`` of the h5ad, with its defaults."""
    import shutil

    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    from annbatch import DatasetCollection

    shutil.rmtree(p["store"], ignore_errors=True)
    DatasetCollection(p["store"]).add_adatas([p["h5ad"]], rng=np.random.default_rng(0))
    return {}


MEASUREMENTS = {
    "simulate": measure_simulate,
    "mars": measure_mars,
    "annbatch": measure_annbatch,
    "scdataset": measure_scdataset,
    "mars_convert": measure_mars_convert,
    "annbatch_convert": measure_annbatch_convert,
}


# ---------------------------------------------------------------------------------------------
# Orchestration


def _summary(runs: dict[str, list[dict]], variants: list[str]) -> dict:
    """Medians per variant, and ratios of mars-scale over annbatch taken within each round."""
    def per(v, key, epoch):
        return [r["epochs"][epoch][key] for r in runs[v]]

    last = -1
    out: dict = {"cells_per_s_median": {}, "cells_per_s_best": {}, "first_epoch_cells_per_s_median": {},
                 "cpu_s_per_epoch_median": {}, "peak_rss_mb_max": {}, "loader_rss_mb_max": {},
                 "experiments_per_batch": {}}
    for v in variants:
        out["cells_per_s_median"][v] = _median(per(v, "cells_per_s", last))
        out["cells_per_s_best"][v] = max(per(v, "cells_per_s", last))
        out["first_epoch_cells_per_s_median"][v] = _median(per(v, "cells_per_s", 0))
        out["cpu_s_per_epoch_median"][v] = _median(per(v, "cpu_s", last))
        out["peak_rss_mb_max"][v] = max(r["peak_rss_mb"] for r in runs[v])
        out["loader_rss_mb_max"][v] = round(max(r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in runs[v]), 1)
        out["experiments_per_batch"][v] = runs[v][0]["mixing"]
    for name in ("annbatch", "scdataset"):
        if f"{name}_raw" in runs:
            out[f"mars_scale_over_{name}"] = _ratios(runs, out, name)
    if any(v in runs for v in OLD_VARIANTS):
        out["mars_scale_over_spec_0_1_1_layout"] = {
            mode: {
                "cells_per_s": _median([a["epochs"][last]["cells_per_s"] / b["epochs"][last]["cells_per_s"]
                                        for a, b in zip(runs[f"mars_scale_{mode}"], runs[f"mars_scale_spec_0_1_1_{mode}"])]),
                "first_epoch_cells_per_s": _median([a["epochs"][0]["cells_per_s"] / b["epochs"][0]["cells_per_s"]
                                                    for a, b in zip(runs[f"mars_scale_{mode}"], runs[f"mars_scale_spec_0_1_1_{mode}"])]),
            } for mode in ("raw", "normalized")}
    return out


def _ratios(runs: dict, out: dict, peer_name: str) -> dict:
    """mars-scale over one peer: cells/s within each round (median, per round, best over best),
    CPU time and RSS."""
    last, ratios = -1, {}
    for mode in ("raw", "normalized"):
        ours, peer = runs[f"mars_scale_{mode}"], runs[f"{peer_name}_{mode}"]
        for epoch, name in ((last, ""), (0, "first_epoch_")):
            per_round = [a["epochs"][epoch]["cells_per_s"] / b["epochs"][epoch]["cells_per_s"]
                         for a, b in zip(ours, peer)]
            best = (max(a["epochs"][epoch]["cells_per_s"] for a in ours)
                    / max(b["epochs"][epoch]["cells_per_s"] for b in peer))
            ratios[f"{name}cells_per_s_{mode}"] = {
                "median": _median(per_round), "per_round": [round(x, 3) for x in per_round],
                "best_over_best": round(best, 3)}
        cpu = [b["epochs"][last]["cpu_s"] / b["epochs"][last]["cells"] * a["epochs"][last]["cells"]
               / a["epochs"][last]["cpu_s"] for a, b in zip(ours, peer)]
        ratios[f"cpu_s_per_cell_{peer_name}_over_mars_scale_{mode}"] = _median(cpu)
        for key in ("peak_rss_mb_max", "loader_rss_mb_max"):
            ratios[f"{key[:-7]}_mars_scale_over_{peer_name}_{mode}"] = round(
                out[key][f"mars_scale_{mode}"] / out[key][f"{peer_name}_{mode}"], 3)
    return ratios


def _convert(script, args, scratch: Path, key: str, h5ad: Path) -> tuple[dict, dict]:
    """Each tool's conversion of the h5ad, timed in its own process; the stores made."""
    stores = {"mars_scale": scratch / f"mars_{key}.zarr", "annbatch": scratch / f"annbatch_{key}.zarr",
              "mars_scale_spec_0_1_1": scratch / f"mars_{key}_spec_0_1_1.zarr"}
    conversion = {}
    for name, store in stores.items():
        if name == "annbatch":
            res = run_measurement(script, "annbatch_convert", {"h5ad": h5ad, "store": store},
                                  python=args.peers_python)
        else:
            res = run_measurement(script, "mars_convert", {
                "h5ad": h5ad, "store": store, "spec_0_1_1_layout": name.endswith("0_1_1")})
        files, size = _files(store)
        conversion[name] = {"wall_s": res["wall_s"], "cpu_s": res["cpu_s"],
                            "peak_rss_mb": res["peak_rss_mb"], "files": files, "disk_mb": round(size / 1e6, 1)}
        logger.info("%s conversion: %s", name, conversion[name])
    return stores, conversion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-cells", type=int, default=200_000)
    ap.add_argument("--n-genes", type=int, default=20_000)
    ap.add_argument("--n-experiments", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per process (the last is the steady one)")
    ap.add_argument("--scratch", type=Path, default=Path("/work/scratch/peers"))
    ap.add_argument("--peers-python", required=True, help="interpreter with annbatch, zarrs and torch (Python >= 3.12)")
    ap.add_argument("--no-old-layout", action="store_true", help="skip the spec 0.1.1 layout variants")
    ap.add_argument("--scdataset-batches", type=int, default=150,
                    help="batches per scDataset pass over the backed h5ad (0: skip scDataset)")
    ap.add_argument("--name", default="peers")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    script = Path(__file__).resolve()
    scratch, key, started, record = _start_run(args)
    record["command"] = "python " + " ".join([f"benchmarks/{script.name}", *sys.argv[1:]])
    h5ad = scratch / f"sim_{key}.h5ad"
    if not h5ad.exists():
        record["simulate"] = run_measurement(script, "simulate", {
            "h5ad": h5ad, "n_cells": args.n_cells, "n_genes": args.n_genes, "n_experiments": args.n_experiments})
    record["h5ad_mb"] = round(h5ad.stat().st_size / 1e6, 1)
    stores, record["conversion"] = _convert(script, args, scratch, key, h5ad)
    variants = [*MARS_VARIANTS, *PEER_VARIANTS, *(() if args.no_old_layout else OLD_VARIANTS),
                *(SCDATASET_VARIANTS if args.scdataset_batches else ())]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        for v in order:
            params = {"batch_size": args.batch_size, "epochs": args.epochs, "seed": rnd,
                      "normalize": v.endswith("normalized")}
            if v.startswith("annbatch"):
                res = run_measurement(script, "annbatch", {**params, "store": stores["annbatch"]},
                                      python=args.peers_python)
            elif v.startswith("scdataset"):
                res = run_measurement(script, "scdataset", {
                    **params, "h5ad": h5ad, "max_batches": args.scdataset_batches}, python=args.peers_python)
            else:
                store = stores["mars_scale_spec_0_1_1" if v in OLD_VARIANTS else "mars_scale"]
                res = run_measurement(script, "mars", {**params, "store": store})
            runs[v].append(res)
            logger.info("round %d %s: %s cells/s", rnd, v, [e["cells_per_s"] for e in res["epochs"]])
    record["runs"] = runs
    record["peers_python"] = args.peers_python
    record["peer_versions"] = json.loads(run_measurement(script, "versions", {}, python=args.peers_python)["versions"])
    record["summary"] = _summary(runs, variants)
    record["load_average_end"] = load_average()
    record["elapsed_s"] = round(time.perf_counter() - started, 1)
    path = write_result(args.name, record, key=key)
    print(json.dumps({"conversion": record["conversion"], **record["summary"]}, indent=2))
    print(f"wrote {path}")


def measure_versions(p: dict) -> dict:
    """Python and package versions of the interpreter running this (the peers' venv)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("annbatch", "zarrs", "scdataset", "zarr", "anndata", "h5py", "numpy", "scipy", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": json.dumps(versions)}


MEASUREMENTS["versions"] = measure_versions


if __name__ == "__main__":
    if not measurement_main(MEASUREMENTS):
        main()
