"""Loader throughput and memory against raw zarr reads and anndata's random access.

One run, one synthetic atlas, several store layouts, every measurement in its own process
(so each has its own peak RSS):

(a) ``raw``: contiguous reads of ``X`` (indptr, data, indices) in store order, blocks of 1, 4
    and 16 chunks, through a pool of threads: the ceiling through zarr on this machine; the
    same blocks read with :class:`mars_scale.store.RangeReader` (the loader's chunk reader)
    are reported beside it as ``direct_*``;
(b) ``loader``: :class:`mars_scale.loader.Loader` shuffling, batches of ``--batch-size``
    (log1p-normalised sparse torch tensors), two whole epochs: ``cells_per_s`` is the second
    (as every epoch of training after its first), ``first_epoch_cells_per_s`` the first;
(c) ``anndata_zarr`` / ``anndata_h5ad``: the same shuffled batches (row ids saved by (b)) read
    by ``anndata.io.sparse_dataset`` fancy indexing on the same zarr store, and from an
    uncompressed h5ad copy opened with ``backed="r"``; also uniformly random batches. These are
    slow, so they stop after ``--random-batches`` batches or ``--random-seconds``;
(d) ``inmemory``: the whole AnnData read into memory, a map-style dataset and a plain torch
    ``DataLoader`` with a shuffled ``BatchSampler``, normalising each batch as the loader does.

Shuffle quality: distinct I/O blocks and experiments per loader batch, against batches drawn
uniformly at random. Layouts: zarr v2 (one file per chunk) and v3 (shards of 32 chunks) at
several ``rows_per_chunk``; each gets (a) and (b), and the main comparison runs on the layout
whose loader is fastest (or ``--main-layout``).

Examples (data go to a scratch directory outside the repository)::

    python benchmarks/loader.py --n-cells 200000 --n-genes 20000 --scratch /work/scratch/bench
    python benchmarks/loader.py --n-cells 1000000 --n-genes 2000 --scratch /work/scratch/bench \\
        --layouts v2-256,v3-256

Results go to ``benchmarks/results/loader.json`` under ``runs["<cells>x<genes>"]``.

``--checksum-cost`` measures only what the chunk checksums (store spec 0.1.1) and the row
checks of ``mars_scale.store.x_rows_damage`` cost the loader: the same input is ingested with
and without checksums and the loader's epochs on both alternate in one run (see
:func:`checksum_cost_main`); results in ``benchmarks/results/loader_checksums.json``::

    python benchmarks/loader.py --checksum-cost --n-cells 100000 --n-genes 2000 \
        --layouts v3-1024,v2-1024 --repeats 5 --scratch /work/scratch/bench_crc
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, measurement_main, run_measurement, write_result, writes_as_spec_0_1_0  # noqa: E402

logger = logging.getLogger("benchmarks.loader")


# ---------------------------------------------------------------------------------------------
# Measurements (each runs in a child process)


def _chunk_aligned_blocks(store, chunks_per_block: int) -> list[tuple[int, int]]:
    x = store.x_group
    n = store.n_cells
    chunk = int(x["data"].chunks[0])
    indptr = np.asarray(x["indptr"][:], dtype=np.int64)
    marks = np.arange(chunk * chunks_per_block, int(indptr[-1]), chunk * chunks_per_block)
    bounds = np.unique(np.concatenate([[0], np.searchsorted(indptr, marks), [n]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def measure_raw(p: dict) -> dict:
    """Contiguous reads of X in store order: no decoding beyond zarr, no processing.

    The same blocks are then read with :class:`mars_scale.store.RangeReader` (the loader's
    chunk reader, which bypasses zarr's per-call machinery): ``direct_*`` passes.
    """
    from _common import cpu_seconds

    from mars_scale.store import RangeReader, open_store

    store = open_store(p["store"])
    x = store.x_group
    routes = {
        "": [lambda a, b, arr=x[k]: np.asarray(arr[a:b]) for k in ("indptr", "data", "indices")],
        "direct_": [RangeReader(x[k]).read for k in ("indptr", "data", "indices")],
    }

    def read(block, readers):
        a, b = block
        ptr = readers[0](a, b + 1)
        readers[1](int(ptr[0]), int(ptr[-1]))
        indices = readers[2](int(ptr[0]), int(ptr[-1]))
        return b - a, indices.size

    out = {}
    for prefix, readers in routes.items():
        for m in p["chunks_per_block"]:
            for threads in p["threads"]:
                blocks = _chunk_aligned_blocks(store, m)
                wall, cpu = time.perf_counter(), cpu_seconds()
                rows = nnz = 0
                with ThreadPoolExecutor(threads) as pool:
                    for r, z in pool.map(lambda block: read(block, readers), blocks):
                        rows += r
                        nnz += z
                wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
                out[f"{prefix}{m}chunks_{threads}threads"] = {
                    "rows_per_block": round(rows / len(blocks)),
                    "threads": threads,
                    "cells_per_s": round(rows / wall),
                    "cells_per_cpu_s": round(rows / cpu),
                    "nnz_per_s": round(nnz / wall),
                }
    def fastest(direct: bool) -> dict:
        passes = [v for k, v in out.items() if k.startswith("direct_") == direct]
        return max(passes, key=lambda r: r["cells_per_s"])

    best, direct = fastest(False), fastest(True)
    return {"passes": out, "best_cells_per_s": best["cells_per_s"], "best": best,
            "direct_best_cells_per_s": direct["cells_per_s"], "direct_best": direct}


def measure_loader(p: dict) -> dict:
    """A whole shuffled epoch (or ``max_batches``) of the Loader."""
    from _common import cpu_seconds

    import mars_scale.loader as loader_module
    from mars_scale.loader import Loader

    if p.get("old_row_checks"):
        loader_module.x_rows_damage = _old_row_checks
    loader = Loader(
        p["store"],
        batch_size=p["batch_size"],
        seed=p.get("seed", 0),
        rows_per_block=p.get("rows_per_block"),
        blocks_per_buffer=p.get("blocks_per_buffer", 16),
        experiments=p.get("experiments"),
        n_threads=p.get("n_threads"),
    )
    starts, _ = loader.block_bounds()
    exp_starts = loader._exp_starts
    max_batches = p.get("max_batches") or len(loader)
    keep = p.get("save_batches", 0)
    saved: list[np.ndarray] = []
    blocks_per_batch, exps_per_batch = [], []
    # Epoch 0 starts cold; later epochs find the chunk heads that row blocks share (see
    # RangeReader) in memory, as every epoch of a training run after its first does.
    epochs = []
    for epoch in range(p.get("epochs", 2)):
        loader.set_epoch(epoch)
        rows = nnz = n = 0
        wall, cpu = time.perf_counter(), cpu_seconds()
        first = None
        for batch in loader:
            if first is None:
                first = time.perf_counter() - wall
            index = batch.index.numpy()
            rows += index.shape[0]
            nnz += int(batch.x.values().shape[0])
            if epoch == 0 and n < 400:  # shuffle quality on the first batches
                blocks_per_batch.append(len(np.unique(np.searchsorted(starts, index, "right"))))
                exps_per_batch.append(len(np.unique(batch.experiment.numpy())))
            if epoch == 0 and len(saved) < keep:
                saved.append(index.copy())
            n += 1
            if n >= max_batches:
                break
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        epochs.append({"rows": rows, "nnz": nnz, "n": n, "wall": wall, "cpu": cpu, "first": first})
    last = epochs[-1]
    rows, nnz, n, wall, cpu, first = (last[k] for k in ("rows", "nnz", "n", "wall", "cpu", "first"))
    if keep:
        np.save(p["batches_file"], np.array(saved, dtype=object), allow_pickle=True)
    # uniform sampling of the same batch size from the same rows, for comparison
    rng = np.random.default_rng(1)
    selected = np.concatenate([np.arange(a, b) for a, b in zip(*loader.block_bounds())])
    uni_blocks, uni_exps = [], []
    for _ in range(200):
        index = np.sort(rng.choice(selected, size=min(p["batch_size"], len(selected)), replace=False))
        uni_blocks.append(len(np.unique(np.searchsorted(starts, index, "right"))))
        uni_exps.append(len(np.unique(np.searchsorted(exp_starts, index, "right"))))
    return {
        "batches": n,
        "cells": rows,
        "epochs": len(epochs),
        "first_epoch_cells_per_s": round(epochs[0]["rows"] / epochs[0]["wall"]),
        "cells_per_s": round(rows / wall),
        "cells_per_cpu_s": round(rows / cpu),
        "nnz_per_s": round(nnz / wall),
        "first_batch_s": round(first or 0.0, 3),
        "n_blocks": loader.n_blocks,
        "rows_per_block_mean": round(loader.n_rows / loader.n_blocks, 1),
        "batches_per_buffer": loader.batches_per_buffer,
        "shuffle_quality": {
            "loader_blocks_per_batch_mean": round(float(np.mean(blocks_per_batch)), 2),
            "loader_experiments_per_batch_mean": round(float(np.mean(exps_per_batch)), 2),
            "uniform_blocks_per_batch_mean": round(float(np.mean(uni_blocks)), 2),
            "uniform_experiments_per_batch_mean": round(float(np.mean(uni_exps)), 2),
        },
    }


def _random_access(p: dict, read) -> dict:
    from _common import cpu_seconds

    if p["batches"] == "uniform":
        rng = np.random.default_rng(2)
        batches = [rng.choice(p["n_cells"], p["batch_size"], replace=False) for _ in range(p["max_batches"])]
    else:
        batches = list(np.load(p["batches_file"], allow_pickle=True))[: p["max_batches"]]
    rows = n = 0
    wall, cpu = time.perf_counter(), cpu_seconds()
    for index in batches:
        block = read(np.sort(np.asarray(index, dtype=np.int64)))
        rows += block.shape[0]
        n += 1
        if time.perf_counter() - wall > p["max_seconds"]:
            break
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {"batches": n, "cells": rows, "cells_per_s": round(rows / wall, 1),
            "cells_per_cpu_s": round(rows / cpu, 1)}


def measure_anndata_zarr(p: dict) -> dict:
    """``anndata.io.sparse_dataset`` fancy indexing on the zarr store."""
    import anndata as ad
    import zarr

    x = ad.io.sparse_dataset(zarr.open_group(p["store"], mode="r")["X"])
    return _random_access(p, lambda index: x[index])


def measure_anndata_h5ad(p: dict) -> dict:
    """Backed-mode AnnData on an uncompressed h5ad file."""
    import anndata as ad

    adata = ad.read_h5ad(p["h5ad"], backed="r")
    return _random_access(p, lambda index: adata.X[index])


def measure_inmemory(p: dict) -> dict:
    """Whole AnnData in memory, plain torch DataLoader over a map-style dataset."""
    import anndata as ad
    import scipy.sparse as sp
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from _common import cpu_seconds
    from mars_scale.preprocess import normalize_log1p

    t0 = time.perf_counter()
    adata = ad.read_h5ad(p["h5ad"])
    x = sp.csr_matrix(adata.X)
    load_s = time.perf_counter() - t0
    # anndata gives int64 indptr with int32 indices; scipy's fancy row indexing then upcasts
    # the whole matrix on every call (seconds per batch). One index dtype is the fair baseline.
    if x.nnz < np.iinfo(np.int32).max:
        x.indptr = x.indptr.astype(np.int32)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return x.shape[0]

        def __getitem__(self, index):
            sub = x[np.asarray(index)]
            values = normalize_log1p(sub.indptr, sub.indices, sub.data)
            return torch.sparse_csr_tensor(
                torch.from_numpy(sub.indptr.astype(np.int64)),
                torch.from_numpy(sub.indices.astype(np.int64)),
                torch.from_numpy(values), size=sub.shape, check_invariants=False,
            )

    sampler = BatchSampler(
        RandomSampler(range(x.shape[0]), generator=torch.Generator().manual_seed(0)),
        p["batch_size"], drop_last=False,
    )
    loader = DataLoader(Rows(), sampler=sampler, batch_size=None)
    rows = n = 0
    wall, cpu = time.perf_counter(), cpu_seconds()
    for batch in loader:
        rows += batch.shape[0]
        n += 1
        if n >= p["max_batches"]:
            break
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {"load_s": round(load_s, 1), "batches": n, "cells": rows,
            "cells_per_s": round(rows / wall), "cells_per_cpu_s": round(rows / cpu)}


def _old_row_checks(indptr, data=None, indices=None, **_):
    """The row checks before issue 17 (missing chunks only), for measuring the new ones' cost."""
    if (np.diff(indptr) < 0).any():
        return "have a decreasing X/indptr"
    if data is not None and data.size and not data.min() > 0:
        return "read back zeros"
    if indices is not None and indices.size - np.count_nonzero(indices) > indptr.shape[0] - 1:
        return "read back zeros"
    return None


def measure_ingest(p: dict) -> dict:
    import contextlib

    from mars_scale.ingest import IngestConfig, ingest
    from mars_scale.store import StoreLayout

    fmt, rows = p["layout"]
    t0 = time.perf_counter()
    with (contextlib.nullcontext() if p.get("checksums", True) else writes_as_spec_0_1_0()):
        _ingest_layout(p, ingest, IngestConfig, StoreLayout, fmt, rows)
    return {"ingest_s": round(time.perf_counter() - t0, 1)}


def _ingest_layout(p, ingest, IngestConfig, StoreLayout, fmt, rows) -> None:
    ingest(
        [p["h5ad"]], p["store"],
        config=IngestConfig(
            experiment_key="experiment", label_key="cell_type",
            layout=StoreLayout(rows_per_chunk=rows, zarr_format=fmt),
        ),
        overwrite=True,
    )


def measure_simulate(p: dict) -> dict:
    from mars_scale.simulate import SimulationConfig, write_h5ad

    config = SimulationConfig(
        n_cells=p["n_cells"], n_genes=p["n_genes"], n_experiments=p["n_experiments"], seed=0
    )
    t0 = time.perf_counter()
    write_h5ad(p["h5ad"], config, overwrite=True)  # uncompressed float32 CSR
    return {"simulate_s": round(time.perf_counter() - t0, 1)}


def measure_loader_interleaved(p: dict) -> dict:
    """Loader epochs on both stores alternating in one process; the best epoch of each.

    Three loaders (the checksummed store; the store without checksums; that store with the
    row checks of before issue 17) run one epoch each per round, in an order rotated between
    rounds, after a first warm epoch each. Other work on the machine only adds time, so the
    fastest of ``rounds`` epochs is the least disturbed estimate of each.
    """
    from _common import cpu_seconds

    import mars_scale.loader as loader_module
    from mars_scale.loader import Loader

    checks = {"new": loader_module.x_rows_damage, "old": _old_row_checks}
    variants = {
        "checksums": (p["store"], "new"),
        "no_checksums": (p["store_no_checksums"], "new"),
        "no_checksums_old_row_checks": (p["store_no_checksums"], "old"),
    }
    loaders = {v: Loader(store, batch_size=p["batch_size"], seed=0, rows_per_block=p.get("rows_per_block"))
               for v, (store, _) in variants.items()}
    best = {v: {"wall": float("inf"), "cpu": float("inf")} for v in variants}
    names = list(variants)
    for r in range(p.get("rounds", 12) + 1):
        for v in names[r % 3:] + names[: r % 3]:
            loader_module.x_rows_damage = checks[variants[v][1]]
            loader = loaders[v]
            loader.set_epoch(r)
            wall, cpu = time.perf_counter(), cpu_seconds()
            rows = sum(batch.n_rows for batch in loader)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            if r:  # round 0 warms the page cache and the chunk-head caches
                best[v]["wall"] = min(best[v]["wall"], wall)
                best[v]["cpu"] = min(best[v]["cpu"], cpu)
    loader_module.x_rows_damage = checks["new"]
    out = {v: {"cells_per_s_best": round(rows / b["wall"]), "cells_per_cpu_s_best": round(rows / b["cpu"])}
           for v, b in best.items()}
    out["rows_per_epoch"] = rows
    out["checksums_over_no_checksums_wall"] = round(best["no_checksums"]["wall"] / best["checksums"]["wall"], 4)
    out["checksums_over_no_checksums_cpu"] = round(best["no_checksums"]["cpu"] / best["checksums"]["cpu"], 4)
    out["new_row_checks_over_old_cpu"] = round(
        best["no_checksums_old_row_checks"]["cpu"] / best["no_checksums"]["cpu"], 4)
    return out


def measure_check_costs(p: dict) -> dict:
    """CPU cost per cell of the chunk checksums and of the row checks, by themselves.

    Best of ``repeats`` passes over the whole of X (single thread): checking the checksum of
    every chunk the loader reads (``X/data``, ``X/indices``, ``X/indptr``,
    ``obs/cell_type/codes``; the encoded bytes are read into memory first), and the row
    checks of ``x_rows_damage`` against those of before issue 17 over every row block.
    """
    from mars_scale.store import _strip_checksum, open_store, x_rows_damage

    store = open_store(p["store"])
    blobs, kinds = [], []
    for key in ("X/data", "X/indices", "X/indptr", "obs/cell_type/codes"):
        reader = store.reader(key)
        files = reader._files
        for i in range(-(-reader.size // files.chunk)):
            blob = reader._chunk_bytes(i)
            if blob is not None:
                blobs.append(blob)
                kinds.append(files.checksum)
    n_bytes = sum(len(b) for b in blobs)
    blocks = []
    for a in range(0, store.n_cells, store.rows_per_chunk):
        b = min(store.n_cells, a + store.rows_per_chunk)
        ptr = store.reader("X/indptr").read(a, b + 1)
        lo, hi = int(ptr[0]), int(ptr[-1])
        blocks.append((ptr, store.reader("X/data").read(lo, hi), store.reader("X/indices").read(lo, hi)))
    nnz, n_genes = store.reader("X/data").size, store.n_genes
    best = {"checksums": float("inf"), "row_checks": float("inf"), "row_checks_before": float("inf")}
    for _ in range(p.get("repeats", 7)):
        t0 = time.process_time()
        for blob, kind in zip(blobs, kinds):
            _strip_checksum(blob, kind)
        t1 = time.process_time()
        for ptr, data, indices in blocks:
            x_rows_damage(ptr, data, indices, n_genes=n_genes, nnz=nnz)
        t2 = time.process_time()
        for ptr, data, indices in blocks:
            _old_row_checks(ptr, data, indices)
        t3 = time.process_time()
        for k, v in zip(best, (t1 - t0, t2 - t1, t3 - t2)):
            best[k] = min(best[k], v)
    return {"encoded_mb": round(n_bytes / 1e6, 1), "checksum_kinds": sorted({str(k) for k in kinds}),
            **{f"{k}_us_per_cell": round(v / store.n_cells * 1e6, 4) for k, v in best.items()}}


MEASUREMENTS = {
    "check_costs": measure_check_costs,
    "loader_interleaved": measure_loader_interleaved,
    "raw": measure_raw,
    "loader": measure_loader,
    "anndata_zarr": measure_anndata_zarr,
    "anndata_h5ad": measure_anndata_h5ad,
    "inmemory": measure_inmemory,
    "ingest": measure_ingest,
    "simulate": measure_simulate,
}


# ---------------------------------------------------------------------------------------------
# Driver


def _parse_layout(text: str) -> tuple[int, int]:
    fmt, rows = text.lower().lstrip("v").split("-")
    return int(fmt), int(rows)


def _files(path: Path) -> tuple[int, int]:
    count = size = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            count += 1
            size += os.path.getsize(os.path.join(dirpath, f))
    return count, size


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def _start_run(args) -> tuple[Path, str, float, dict]:
    """The scratch folder (refused inside the repository), the run key, the start time and the
    record's opening fields, shared by the two benchmark modes."""
    script = Path(__file__).resolve()
    scratch = args.scratch.resolve()
    if script.parents[1] in [scratch, *scratch.parents]:
        raise SystemExit(f"--scratch {scratch} is inside the repository; use a directory outside it")
    scratch.mkdir(parents=True, exist_ok=True)
    record: dict = {
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python " + " ".join([f"benchmarks/{script.name}", *sys.argv[1:]]),
        "load_average_start": load_average(),
    }
    return scratch, f"{args.n_cells}x{args.n_genes}", time.perf_counter(), record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-cells", type=int, default=200_000)
    ap.add_argument("--n-genes", type=int, default=20_000)
    ap.add_argument("--n-experiments", type=int, default=10)
    ap.add_argument("--scratch", type=Path, default=Path("/work/scratch/bench"))
    ap.add_argument("--layouts", default="v2-256,v3-256,v2-1024,v3-1024",
                    help="store layouts to compare: v<zarr format>-<rows per chunk>")
    ap.add_argument("--main-layout", default=None,
                    help="layout of the main comparison (default: the one whose default loader is fastest)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="repeats of (a) and (b) per layout, interleaved")
    ap.add_argument("--loader-variants", default="chunk,4096x4",
                    help="loader runs per layout: 'chunk' (rows_per_block = the store's rows_per_chunk, "
                         "16 blocks per buffer: the defaults) or ROWSxBLOCKS (rows_per_block x blocks_per_buffer)")
    ap.add_argument("--random-batches", type=int, default=40)
    ap.add_argument("--random-seconds", type=float, default=40.0)
    ap.add_argument("--inmemory-batches", type=int, default=2000)
    ap.add_argument("--name", default="loader")
    ap.add_argument("--checksum-cost", action="store_true",
                    help="only measure what chunk checksums and the row checks cost the loader: the same "
                         "input ingested with and without checksums, loader epochs interleaved "
                         "(results in loader_checksums.json)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.checksum_cost:
        return checksum_cost_main(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    script = Path(__file__).resolve()
    scratch, key, started, record = _start_run(args)

    h5ad = scratch / f"sim_{key}.h5ad"
    if not h5ad.exists():
        logger.info("simulating %s", h5ad)
        record["simulate"] = run_measurement(script, "simulate", {
            "h5ad": h5ad, "n_cells": args.n_cells, "n_genes": args.n_genes,
            "n_experiments": args.n_experiments,
        })
    layouts = [t.strip() for t in args.layouts.split(",") if t.strip()]
    stores = {}
    record["layouts"] = {}
    for name in layouts:
        fmt, rows = _parse_layout(name)
        store = scratch / f"sim_{key}_{name}.zarr"
        entry = record["layouts"].setdefault(name, {"zarr_format": fmt, "rows_per_chunk": rows})
        if not store.exists():
            logger.info("ingesting %s", store)
            entry["ingest"] = run_measurement(script, "ingest", {"h5ad": h5ad, "store": store, "layout": [fmt, rows]})
        entry["files"], entry["bytes"] = _files(store)
        stores[name] = store

    # (a) and (b) on every layout, interleaved so that load on a shared machine hits all alike
    variants = [None if v == "chunk" else tuple(int(t) for t in v.split("x")) for v in args.loader_variants.split(",")]
    for rep in range(args.repeats):
        for name, store in stores.items():
            entry = record["layouts"][name]
            logger.info("layout %s, repeat %d", name, rep)
            raw = run_measurement(script, "raw", {"store": store, "chunks_per_block": [1, 4, 16], "threads": [4]})
            entry.setdefault("raw", []).append(raw)
            for v in variants:
                label = "chunk" if v is None else f"{v[0]}x{v[1]}"
                rows, per_buffer = (entry["rows_per_chunk"], 16) if v is None else v
                if v is not None and (rows, per_buffer) == (entry["rows_per_chunk"], 16) and None in variants:
                    continue  # same as "chunk"
                res = run_measurement(script, "loader", {
                    "store": store, "batch_size": args.batch_size, "rows_per_block": rows,
                    "blocks_per_buffer": per_buffer,
                })
                res["ratio_to_raw_same_repeat"] = round(res["cells_per_s"] / raw["best_cells_per_s"], 3)
                entry.setdefault("loader", {}).setdefault(label, []).append(res)
    for name, entry in record["layouts"].items():
        entry["raw_best_cells_per_s_median"] = _median([r["best_cells_per_s"] for r in entry["raw"]])
        entry["raw_direct_best_cells_per_s_median"] = _median(
            [r["direct_best_cells_per_s"] for r in entry["raw"]]
        )
        entry["loader_cells_per_s_median"] = {k: _median([r["cells_per_s"] for r in v]) for k, v in entry["loader"].items()}
        entry["loader_ratio_median"] = {k: _median([r["ratio_to_raw_same_repeat"] for r in v]) for k, v in entry["loader"].items()}
    best = max(
        ((name, label) for name, e in record["layouts"].items() for label in e["loader_cells_per_s_median"]),
        key=lambda nl: record["layouts"][nl[0]]["loader_cells_per_s_median"][nl[1]],
    )
    main_name = args.main_layout or max(
        record["layouts"], key=lambda n: record["layouts"][n]["loader_cells_per_s_median"].get("chunk", 0)
    )
    # the main comparison uses the loader's defaults (rows_per_block = rows_per_chunk)
    main_label = "chunk"
    main_rows, main_per_buffer = record["layouts"][main_name]["rows_per_chunk"], 16
    record["layout_choice"] = {"fastest_loader": {"layout": best[0], "variant": best[1]},
                               "main_layout": main_name, "main_variant": main_label}
    if "chunk" not in record["layouts"][main_name]["loader_cells_per_s_median"]:
        raise SystemExit("--loader-variants must include 'chunk' (the defaults) for the main comparison")
    store = stores[main_name]
    logger.info("main comparison on %s (%s)", main_name, main_label)

    # (b) again on the main layout, saving its batches for (c); memory against cells selected
    batches_file = scratch / f"batches_{key}.npy"
    main = {}
    main["loader"] = run_measurement(script, "loader", {
        "store": store, "batch_size": args.batch_size, "rows_per_block": main_rows,
        "blocks_per_buffer": main_per_buffer,
        "save_batches": args.random_batches, "batches_file": batches_file,
    })
    from mars_scale.store import open_store

    atlas = open_store(store)
    first_exps = atlas.experiments[: max(1, len(atlas.experiments) // 5)]
    main["loader_fifth_of_cells"] = run_measurement(script, "loader", {
        "store": store, "batch_size": args.batch_size, "rows_per_block": main_rows,
        "experiments": first_exps,
    })
    main["loader_fifth_of_cells"]["experiments"] = first_exps
    # (c) random access, capped
    common = {"batch_size": args.batch_size, "max_batches": args.random_batches,
              "max_seconds": args.random_seconds, "n_cells": atlas.n_cells, "batches_file": batches_file}
    main["anndata_zarr_loader_batches"] = run_measurement(script, "anndata_zarr", {**common, "store": store, "batches": "loader"})
    main["anndata_zarr_uniform_batches"] = run_measurement(script, "anndata_zarr", {**common, "store": store, "batches": "uniform"})
    main["anndata_h5ad_backed_loader_batches"] = run_measurement(script, "anndata_h5ad", {**common, "h5ad": h5ad, "batches": "loader"})
    main["anndata_h5ad_backed_uniform_batches"] = run_measurement(script, "anndata_h5ad", {**common, "h5ad": h5ad, "batches": "uniform"})
    # (d) in memory
    main["inmemory_dataloader"] = run_measurement(script, "inmemory", {
        "h5ad": h5ad, "batch_size": args.batch_size, "max_batches": args.inmemory_batches,
    })
    raw_main = record["layouts"][main_name]["raw_best_cells_per_s_median"]
    loader_main = record["layouts"][main_name]["loader_cells_per_s_median"][main_label]
    main["summary"] = {
        "raw_contiguous_cells_per_s": raw_main,
        "loader_cells_per_s": loader_main,
        "loader_over_raw": record["layouts"][main_name]["loader_ratio_median"][main_label],
        "raw_direct_cells_per_s": (
            record["layouts"][main_name]["raw_direct_best_cells_per_s_median"]
        ),
        "loader_over_anndata_zarr_random": round(loader_main / main["anndata_zarr_uniform_batches"]["cells_per_s"], 1),
        "loader_over_anndata_zarr_loader_batches": round(loader_main / main["anndata_zarr_loader_batches"]["cells_per_s"], 1),
        "loader_over_h5ad_backed_random": round(loader_main / main["anndata_h5ad_backed_uniform_batches"]["cells_per_s"], 1),
        "loader_over_h5ad_backed_loader_batches": round(loader_main / main["anndata_h5ad_backed_loader_batches"]["cells_per_s"], 1),
        "loader_main_rerun_cells_per_s": main["loader"]["cells_per_s"],
        "loader_peak_rss_mb": main["loader"]["peak_rss_mb"],
        "loader_fifth_of_cells_peak_rss_mb": main["loader_fifth_of_cells"]["peak_rss_mb"],
        "inmemory_peak_rss_mb": main["inmemory_dataloader"]["peak_rss_mb"],
        "shuffle_quality": main["loader"]["shuffle_quality"],
        "note": "medians over interleaved repeats; ratios from the same repeat",
    }
    record["main"] = main
    record["load_average_end"] = load_average()
    record["elapsed_s"] = round(time.perf_counter() - started, 1)
    path = write_result(args.name, record, key=key)
    print(json.dumps(main["summary"], indent=2))
    print(f"wrote {path}")


def checksum_cost_main(args) -> None:
    """Loader throughput on one input ingested with and without chunk checksums, interleaved.

    Per layout, three loader runs per repeat (three epochs each; the last is timed), their
    order rotated between repeats:
    ``checksums`` (the current store), ``no_checksums`` (the same cells written as spec 0.1.0
    did) and ``no_checksums_old_row_checks`` (that store read with the row checks of before
    issue 17, which only looked for missing chunks). Plus the raw direct reads of X
    (:class:`~mars_scale.store.RangeReader`) on both stores. Ratios are taken within a repeat.
    """
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    script = Path(__file__).resolve()
    scratch, key, started, record = _start_run(args)
    record["layouts"] = {}
    h5ad = scratch / f"sim_{key}.h5ad"
    if not h5ad.exists():
        record["simulate"] = run_measurement(script, "simulate", {
            "h5ad": h5ad, "n_cells": args.n_cells, "n_genes": args.n_genes, "n_experiments": args.n_experiments,
        })
    variants = ("checksums", "no_checksums", "no_checksums_old_row_checks")
    for name in [t.strip() for t in args.layouts.split(",") if t.strip()]:
        fmt, rows = _parse_layout(name)
        entry = record["layouts"][name] = {"zarr_format": fmt, "rows_per_chunk": rows}
        stores = {}
        for checksums in (True, False):
            store = scratch / f"sim_{key}_{name}{'' if checksums else '_nocrc'}.zarr"
            entry[f"ingest_{'checksums' if checksums else 'no_checksums'}"] = run_measurement(
                script, "ingest", {"h5ad": h5ad, "store": store, "layout": [fmt, rows], "checksums": checksums})
            entry[f"files_bytes_{'checksums' if checksums else 'no_checksums'}"] = _files(store)
            stores[checksums] = store
        runs = {v: [] for v in variants}
        raw = {True: [], False: []}
        for rep in range(args.repeats):
            order = variants[rep % 3:] + variants[: rep % 3]
            for v in order:
                res = run_measurement(script, "loader", {
                    "store": stores[v == "checksums"], "batch_size": args.batch_size, "rows_per_block": rows,
                    "old_row_checks": v.endswith("old_row_checks"), "epochs": 3,
                })
                runs[v].append(res)
            for checksums in ((True, False) if rep % 2 == 0 else (False, True)):
                raw[checksums].append(run_measurement(script, "raw", {
                    "store": stores[checksums], "chunks_per_block": [1, 4], "threads": [1, 4]}))
        entry["loader"] = runs
        entry["raw"] = {"checksums": raw[True], "no_checksums": raw[False]}
        costs = entry["check_costs"] = run_measurement(script, "check_costs", {"store": stores[True]})
        inter = entry["loader_interleaved"] = run_measurement(script, "loader_interleaved", {
            "store": stores[True], "store_no_checksums": stores[False], "batch_size": args.batch_size,
            "rows_per_block": rows, "rounds": 12})
        best_cpu = max(r["cells_per_cpu_s"] for r in runs["checksums"])  # least disturbed run
        loader_us = 1e6 / best_cpu
        per_rep = lambda a, b: [x["cells_per_s"] / y["cells_per_s"] for x, y in zip(runs[a], runs[b])]  # noqa: E731
        per_rep_cpu = lambda a, b: [x["cells_per_cpu_s"] / y["cells_per_cpu_s"] for x, y in zip(runs[a], runs[b])]  # noqa: E731
        entry["summary"] = {
            # the costs by themselves, over the loader's CPU time per cell (its best run):
            # robust on a busy machine, where whole-loader ratios scatter by tens of percent
            # throughput ratios from epochs alternating in one process (best of 12 each)
            "interleaved_checksums_over_no_checksums_wall": inter["checksums_over_no_checksums_wall"],
            "interleaved_checksums_over_no_checksums_cpu": inter["checksums_over_no_checksums_cpu"],
            "interleaved_new_row_checks_over_old_cpu": inter["new_row_checks_over_old_cpu"],
            "loader_cpu_us_per_cell_best": round(loader_us, 3),
            "checksums_us_per_cell": costs["checksums_us_per_cell"],
            "checksums_fraction_of_loader_cpu": round(costs["checksums_us_per_cell"] / loader_us, 4),
            "row_checks_added_us_per_cell": round(costs["row_checks_us_per_cell"] - costs["row_checks_before_us_per_cell"], 4),
            "row_checks_added_fraction_of_loader_cpu": round(
                (costs["row_checks_us_per_cell"] - costs["row_checks_before_us_per_cell"]) / loader_us, 4),
            "loader_best_cells_per_s": {v: max(r["cells_per_s"] for r in runs[v]) for v in variants},
            "loader_best_checksums_over_no_checksums": round(
                max(r["cells_per_s"] for r in runs["checksums"]) / max(r["cells_per_s"] for r in runs["no_checksums"]), 3),
            # CPU time: what the checks cost, and far less sensitive than wall time to other
            # work on a shared machine (the load average is recorded at the start and end)
            "loader_cells_per_cpu_s_median": {v: _median([r["cells_per_cpu_s"] for r in runs[v]]) for v in variants},
            "loader_cpu_checksums_over_no_checksums_median": _median(per_rep_cpu("checksums", "no_checksums")),
            "loader_cpu_checksums_over_no_checksums_per_repeat": [
                round(x, 3) for x in per_rep_cpu("checksums", "no_checksums")],
            "loader_cpu_new_row_checks_over_old_median": _median(per_rep_cpu("no_checksums", "no_checksums_old_row_checks")),
            "loader_cpu_checksums_and_new_checks_over_neither_median": _median(
                per_rep_cpu("checksums", "no_checksums_old_row_checks")),
            "loader_cells_per_s_median": {v: _median([r["cells_per_s"] for r in runs[v]]) for v in variants},
            "loader_checksums_over_no_checksums_median": _median(per_rep("checksums", "no_checksums")),
            "loader_checksums_over_no_checksums_per_repeat": [round(x, 3) for x in per_rep("checksums", "no_checksums")],
            "loader_new_row_checks_over_old_median": _median(per_rep("no_checksums", "no_checksums_old_row_checks")),
            "loader_checksums_and_new_checks_over_neither_median": _median(
                per_rep("checksums", "no_checksums_old_row_checks")),
            "raw_direct_best_cells_per_s_median": {
                k: _median([r["direct_best_cells_per_s"] for r in raw[c]]) for k, c in (("checksums", True), ("no_checksums", False))
            },
            "raw_direct_checksums_over_no_checksums_median": _median(
                [a["direct_best_cells_per_s"] / b["direct_best_cells_per_s"] for a, b in zip(raw[True], raw[False])]),
        }
        print(name, json.dumps(entry["summary"], indent=2))
    record["load_average_end"] = load_average()
    record["elapsed_s"] = round(time.perf_counter() - started, 1)
    path = write_result(f"{args.name}_checksums", record, key=key)
    print(f"wrote {path}")


if __name__ == "__main__":
    if not measurement_main(MEASUREMENTS):
        main()
