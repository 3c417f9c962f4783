"""Training benchmark: epoch time and peak RSS, the sparse first layer, faiss K-means.

Three measurements, side by side in one run, written to ``benchmarks/results/train.json``:

1. ``epochs``: one pretraining epoch plus one fine-tuning epoch of :class:`mars_scale.model.Mars`
   on synthetic stores of 10k, 100k and 1M cells x 2,000 genes (10 experiments, 10 cell types,
   unannotated experiment ``exp00``, batch 512, CPU). Each size runs in its own child process so
   its peak RSS is its own. The whole ``Mars.train()`` is timed (it includes the K-means
   initialisation and the final landmark pass); the time of each phase is taken from the
   training log's timestamps. Stores are built in ``--scratch`` (reused when present).
2. ``sparse_first_layer``: :class:`mars_scale.nn.SparseScaledLinear` on a CSR batch (with and
   without its CSC copy) against ``torch.nn.Linear`` on the densified batch, 20,000 genes,
   about 1,000 non-zeros per cell, batch 512; and the whole :class:`mars_scale.nn.Encoder` step
   (forward, backward, Adam step) with sparse and dense input. Medians of ``--repeats`` runs,
   the variants timed round robin; ratios are dense time / sparse time.
3. ``kmeans``: :func:`mars_scale.landmarks.kmeans` against scikit-learn's k-means++
   (``n_init=10``) on the same 100,000 x 100 blobs, k=50: time and inertia (both inertias are
   recomputed in float64 from the returned centroids).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/train.py                 # everything
    python benchmarks/train.py --sizes 10000 100000 --skip-1m-reason "..."
    OMP_NUM_THREADS=1 python benchmarks/train.py --only sparse   # one section; keeps the others
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, load_average, measurement_main, run_measurement, write_result  # noqa: E402

logger = logging.getLogger("benchmarks.train")

SCRATCH = Path("/work/scratch/train_bench")
SIZES = (10_000, 100_000, 1_000_000)
N_GENES = 2000


# ---- 1. epochs ------------------------------------------------------------------------------


def store_path(scratch: Path, n_cells: int) -> Path:
    return scratch / f"sim_{n_cells}.zarr"


def build_store(scratch: Path, n_cells: int) -> tuple[Path, float | None]:
    """Build the synthetic store unless it is already there; return its path and build time."""
    from mars_scale.simulate import SimulationConfig, write_store

    path = store_path(scratch, n_cells)
    marker = path.with_name(path.name + ".building")
    if path.exists() and not marker.exists():
        return path, None
    scratch.mkdir(parents=True, exist_ok=True)
    marker.touch()
    t0 = time.perf_counter()
    config = SimulationConfig(n_cells=n_cells, n_genes=N_GENES, n_experiments=10, n_cell_types=10, seed=0)
    write_store(path, config, overwrite=True)
    marker.unlink()
    return path, round(time.perf_counter() - t0, 2)


class _Stamps(logging.Handler):
    """Records the time of each training log message (epoch ends, K-means)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((time.perf_counter(), record.getMessage()))


def measure_epochs(params: dict) -> dict:
    """Child: one pretraining and one fine-tuning epoch of Mars on ``params['store']``."""
    import torch

    from mars_scale.config import RunConfig, TrainConfig
    from mars_scale.model import Mars
    from mars_scale.store import open_store

    stamps = _Stamps()
    train_logger = logging.getLogger("mars_scale.train")
    train_logger.addHandler(stamps)
    train_logger.setLevel(logging.INFO)

    store = open_store(params["store"])
    n_cells = int(store.n_cells)
    start, stop = store.experiment_ranges["exp00"]
    t0 = time.perf_counter()
    model = Mars(
        store,
        unannotated="exp00",
        n_clusters=10,
        config=RunConfig(
            train=TrainConfig(
                pretrain_epochs=1,
                finetune_epochs=1,
                batch_size=512,
                annotated_cells_per_epoch=None,
                device="cpu",
            )
        ),
    )
    t1 = time.perf_counter()
    model.train()
    t2 = time.perf_counter()

    phases: dict[str, float] = {}
    previous = t1
    for when, message in stamps.events:
        for key, prefix in (("pretrain_epoch_s", "pretrain epoch"), ("kmeans_init_s", "K-means"),
                            ("finetune_epoch_s", "fine-tune epoch")):
            if message.startswith(prefix) and key not in phases:
                phases[key] = round(when - previous, 3)
                previous = when
    phases["after_finetune_s"] = round(t2 - previous, 3)  # final landmarks and usage pass
    train_s = t2 - t1
    return {
        "n_cells": n_cells,
        "n_genes": int(store.n_genes),
        "pretrain_cells": int(stop - start),
        "finetune_cells": n_cells,
        "setup_s": round(t1 - t0, 3),
        "train_s": round(train_s, 3),
        "seconds_per_cell": train_s / n_cells,
        "microseconds_per_cell": round(1e6 * train_s / n_cells, 2),
        "phases": phases,
        "history": [{k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in h.items()}
                    for h in model.state["history"]],
        "torch_threads": torch.get_num_threads(),
    }


# ---- 2. sparse first layer ------------------------------------------------------------------


def _median_times(fns: dict[str, Any], repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Time each of ``fns`` ``repeats`` times, round robin (a burst of load from other jobs then
    slows every variant alike, not only the one running); median and all times per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": round(statistics.median(t), 5), "times_s": [round(v, 5) for v in t]}
            for name, t in times.items()}


def measure_sparse(params: dict) -> dict:
    """Child: SparseScaledLinear and Encoder on a sparse batch against dense input."""
    import scipy.sparse as sp
    import torch

    from mars_scale.nn import Encoder, SparseScaledLinear
    from mars_scale.train import adam

    n_genes, batch, nnz_row = params["n_genes"], params["batch"], params["nnz_per_cell"]
    hidden, repeats = params["hidden"], params["repeats"]
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    # CSR batch: nnz_per_cell distinct genes per row, log1p-like positive values.
    cols = np.stack([np.sort(rng.choice(n_genes, nnz_row, replace=False)) for _ in range(batch)])
    vals = np.log1p(rng.gamma(1.0, 2.0, size=cols.shape)).astype(np.float32) + 0.1
    crow = np.arange(0, batch * nnz_row + 1, nnz_row, dtype=np.int64)
    m = sp.csr_matrix((vals.ravel(), cols.ravel(), crow), shape=(batch, n_genes))
    x = torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                torch.from_numpy(m.indices.astype(np.int64)),
                                torch.from_numpy(m.data), size=m.shape)
    mc = m.tocsc()
    x_csc = torch.sparse_csc_tensor(torch.from_numpy(mc.indptr.astype(np.int64)),
                                    torch.from_numpy(mc.indices.astype(np.int64)),
                                    torch.from_numpy(mc.data), size=mc.shape)
    mean = rng.uniform(0.05, 0.5, n_genes)
    std = rng.uniform(0.3, 1.5, n_genes)
    layer = SparseScaledLinear(n_genes, hidden, mean=mean, std=std, rng=0)
    with torch.no_grad():
        x_dense = layer.scale(x.to_dense()).contiguous()  # the densified, scaled batch
    dense = torch.nn.Linear(n_genes, hidden)
    with torch.no_grad():
        dense.weight.copy_(layer.weight.T)
        dense.bias.copy_(layer.bias)
        check = (layer(x) - dense(x_dense)).abs().max().item()

    def fwd_sparse():
        with torch.no_grad():
            layer(x)

    def fwd_dense():
        with torch.no_grad():
            dense(x_dense)

    def fb_sparse():
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()

    def fb_sparse_csc():
        layer.zero_grad(set_to_none=True)
        layer(x, x_csc=x_csc).sum().backward()

    def fb_dense():
        dense.zero_grad(set_to_none=True)
        dense(x_dense).sum().backward()

    out: dict[str, Any] = {"max_abs_difference_sparse_vs_dense": check}
    times = _median_times({"forward_sparse": fwd_sparse, "forward_dense": fwd_dense,
                           "forward_backward_sparse": fb_sparse,
                           "forward_backward_sparse_csc": fb_sparse_csc,
                           "forward_backward_dense": fb_dense}, repeats)
    out["layer"] = times

    # Whole encoder step: the same Encoder, fed the sparse batch (with or without the CSC copy)
    # or the dense unscaled batch (its dense path scales and multiplies densely).
    x_raw_dense = x.to_dense()
    encoder = Encoder(n_genes, hidden=(hidden,), n_latent=params["n_latent"], mean=mean, std=std, rng=0)
    opt = adam(encoder.parameters(), lr=1e-3)  # the training loop's optimiser

    def step(inp, csc=None):
        def run():
            opt.zero_grad(set_to_none=True)
            z = encoder(inp) if csc is None else encoder(inp, x_csc=csc)
            z.pow(2).mean().backward()
            opt.step()
        return run

    enc = _median_times({"step_sparse": step(x), "step_sparse_csc": step(x, x_csc),
                         "step_dense": step(x_raw_dense)}, repeats)
    out["encoder"] = enc
    out["adam_fused"] = bool(opt.defaults.get("fused"))
    out["torch_threads"] = torch.get_num_threads()

    def ratio(a, b):
        return round(a["median_s"] / b["median_s"], 3)

    out["ratios_dense_over_sparse"] = {
        "forward": ratio(times["forward_dense"], times["forward_sparse"]),
        "forward_backward": ratio(times["forward_backward_dense"], times["forward_backward_sparse"]),
        "forward_backward_csc": ratio(times["forward_backward_dense"], times["forward_backward_sparse_csc"]),
        "encoder_step": ratio(enc["step_dense"], enc["step_sparse"]),
        "encoder_step_csc": ratio(enc["step_dense"], enc["step_sparse_csc"]),
    }
    return out


# ---- 3. K-means -----------------------------------------------------------------------------


def _inertia(x: np.ndarray, centroids: np.ndarray, block: int = 20000) -> float:
    """Sum of squared distances to the nearest centroid, float64."""
    c = centroids.astype(np.float64)
    cc = (c * c).sum(1)
    total = 0.0
    for i in range(0, len(x), block):
        xb = x[i:i + block].astype(np.float64)
        d = (xb * xb).sum(1)[:, None] - 2 * xb @ c.T + cc[None, :]
        total += float(np.maximum(d.min(1), 0).sum())
    return total


def measure_kmeans(params: dict) -> dict:
    """Child: faiss K-means (mars_scale.landmarks.kmeans) against scikit-learn k-means++."""
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs

    from mars_scale.landmarks import kmeans

    n, d, k, n_init = params["n_points"], params["dim"], params["k"], params["n_init"]
    x, _ = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=params["cluster_std"], random_state=0)
    x = np.ascontiguousarray(x, dtype=np.float32)

    t0 = time.perf_counter()
    ours = kmeans(x, k, seed=0, n_init=n_init)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    sk = KMeans(k, init="k-means++", n_init=n_init, random_state=0).fit(x)
    t_sk = time.perf_counter() - t0

    in_ours = _inertia(x, np.asarray(ours.centroids))
    in_sk = _inertia(x, sk.cluster_centers_)
    return {
        "data": f"make_blobs({n} x {d}, centers={k}, cluster_std={params['cluster_std']}, random_state=0), float32",
        "mars_scale_faiss": {"seconds": round(t_ours, 3), "inertia": in_ours, "inertia_reported": float(ours.inertia),
                             "n_iter": int(ours.n_iter), "n_train": int(ours.n_train)},
        "sklearn": {"seconds": round(t_sk, 3), "inertia": in_sk, "inertia_reported": float(sk.inertia_),
                    "n_iter": int(sk.n_iter_)},
        "time_ratio_sklearn_over_faiss": round(t_sk / t_ours, 3),
        "inertia_ratio_faiss_over_sklearn": in_ours / in_sk,
    }


MEASUREMENTS = {"epochs": measure_epochs, "sparse": measure_sparse, "kmeans": measure_kmeans}


SECTIONS = {"epochs": "epochs", "sparse": "sparse_first_layer", "kmeans": "kmeans"}
"""``--only`` choice -> key of its section in the results file."""


def _keep_other_sections(payload: dict[str, Any], only: list[str]) -> None:
    """Copy the sections not rerun from the existing results file into ``payload``.

    A kept section gets a ``run`` entry with the command, environment and load averages of
    the run that measured it (unless it already has one), since the file's top-level ones
    describe this run.
    """
    path = RESULTS / "train.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    for choice, section in SECTIONS.items():
        if choice in only or section not in previous:
            continue
        kept = previous[section]
        kept.setdefault("run", {k: previous.get(k) for k in
                                ("command", "environment", "load_average_start", "load_average_end")})
        payload[section] = kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--scratch", type=Path, default=SCRATCH)
    parser.add_argument("--skip-1m-reason", default=None,
                        help="do not train at 1M cells (build the store only) and record this reason")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=None,
                        help="run only these sections; the others are kept from the existing "
                             "results file")
    args = parser.parse_args(argv)
    only = args.only or list(SECTIONS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    payload: dict[str, Any] = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_start": load_average(),
    }
    if "epochs" in only:
        payload["epochs"] = run_epochs(args)
    if "sparse" in only:
        logger.info("sparse first layer")
        params = {"n_genes": 20000, "batch": 512, "nnz_per_cell": 1000, "hidden": 1000, "n_latent": 100,
                  "repeats": args.repeats}
        payload["sparse_first_layer"] = {"params": params,
                                         **run_measurement(__file__, "sparse", params, timeout=args.timeout)}
    if "kmeans" in only:
        logger.info("k-means")
        payload["kmeans"] = run_measurement(
            __file__, "kmeans", {"n_points": 100_000, "dim": 100, "k": 50, "n_init": 10, "cluster_std": 4.0},
            timeout=args.timeout)
    payload["load_average_end"] = load_average()
    if args.only:
        _keep_other_sections(payload, args.only)
    path = write_result("train", payload)
    print(json.dumps({"written": str(path)}))
    return 0


def run_epochs(args: argparse.Namespace) -> dict[str, Any]:
    """Section 1: train at each of ``args.sizes`` in a child process."""
    epochs: dict[str, Any] = {}
    for n in args.sizes:
        path, build_s = build_store(args.scratch, n)
        entry: dict[str, Any] = {"store": str(path), "store_build_s": build_s}
        if n >= 1_000_000 and args.skip_1m_reason:
            entry["skipped"] = args.skip_1m_reason
        else:
            logger.info("training on %d cells", n)
            entry.update(run_measurement(__file__, "epochs", {"store": str(path)}, timeout=args.timeout))
        epochs[str(n)] = entry
    for n in SIZES:
        if str(n) not in epochs:
            epochs[str(n)] = {"skipped": args.skip_1m_reason or "not requested (--sizes)"}
    measured = {k: v for k, v in epochs.items() if "train_s" in v}
    smallest = min(measured, key=int) if measured else None
    return {
        "config": {"n_genes": N_GENES, "n_experiments": 10, "n_cell_types": 10, "unannotated": "exp00",
                   "n_clusters": 10, "pretrain_epochs": 1, "finetune_epochs": 1, "batch_size": 512,
                   "annotated_cells_per_epoch": None, "device": "cpu"},
        "note": "train_s is the whole Mars.train() (one pretraining epoch on exp00, K-means initialisation, "
                "one fine-tuning epoch on all cells, final landmark pass); seconds_per_cell divides it "
                "by all cells of the store",
        "sizes": epochs,
        "seconds_per_cell_relative_to_smallest": (
            {k: round(v["seconds_per_cell"] / measured[smallest]["seconds_per_cell"], 3) for k, v in measured.items()}
            if smallest else {}),
    }


if __name__ == "__main__":
    if measurement_main(MEASUREMENTS):
        raise SystemExit(0)
    raise SystemExit(main())
