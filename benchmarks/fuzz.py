"""Damage a small annotated store at random and check that nothing reads back wrong.

A small store is ingested (zarr format 3 and 2), a tiny model is trained on it and
``annotate`` adds its results (obs columns, obsm arrays, the ``uns`` run record). Each case
then damages one file of the store, chosen among all its files (chunk and shard files of X, obs,
var, obsm and uns, and every ``zarr.json`` / ``.zarray`` / ``.zattrs``): uniformly in even
cases, in proportion to file size in odd ones (so the chunks of X and obsm are hit often too):

``bitflip``
    one random bit;
``byterun``
    1 to 64 consecutive bytes replaced by random bytes;
``truncate``
    the file cut to a random shorter length (possibly empty);
``zerofill``
    1 to 4,096 consecutive bytes set to zero.

In a separate worker process, :func:`mars_scale.verify.verify_store` runs on the damaged
store. Outcomes:

``detected``
    verify raised ``StoreError`` (``mars-scale verify`` exits 2 with one line);
``identical``
    verify passed and everything reads back equal to the undamaged store: X (through
    ``open_store(...).read_rows``), obs, var, obsm and uns (through ``anndata.io.read_elem``);
``silent``
    verify passed and something reads back different (the failure this guards against);
``missed``
    verify passed but reading raised an error;
``crash``
    verify raised anything but ``StoreError``, or the worker died (a signal such as SIGSEGV,
    or "double free"), or it hung for more than 120 s.

The file is restored after each case. Example (results in ``benchmarks/results/fuzz.json``)::

    OMP_NUM_THREADS=1 python benchmarks/fuzz.py --cases 2000 --seed 0

``tests/test_fuzz.py`` runs a few dozen cases of the same harness.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("bitflip", "byterun", "truncate", "zerofill")
OUTCOMES = ("detected", "identical", "silent", "missed", "crash")
_CASE_TIMEOUT_S = 120

logger = logging.getLogger("benchmarks.fuzz")


# ---------------------------------------------------------------------------------------------
# The store


def build_store(directory: Path, *, zarr_format: int = 3, seed: int = 0) -> Path:
    """A small annotated store: 240 cells x 60 genes, 3 experiments, 8 X chunks, results of a tiny model."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from mars_scale.annotate import annotate
    from mars_scale.config import ModelConfig, RunConfig, TrainConfig
    from mars_scale.ingest import IngestConfig, ingest
    from mars_scale.model import Mars
    from mars_scale.store import StoreLayout

    rng = np.random.default_rng(seed)
    n_cells, n_genes, n_types = 240, 60, 3
    types = rng.integers(0, n_types, n_cells)
    programme = rng.lognormal(0.0, 1.0, (n_types, n_genes))
    counts = rng.poisson(programme[types] * rng.lognormal(0.0, 0.3, n_cells)[:, None]).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    obs = pd.DataFrame(
        {"experiment": pd.Categorical(np.repeat(["e0", "e1", "e2"], [80, 80, 80])),
         "cell_type": pd.Categorical([f"t{t}" for t in types])},
        index=[f"c{i}" for i in range(n_cells)],
    )
    directory.mkdir(parents=True, exist_ok=True)
    h5ad = directory / "cells.h5ad"
    ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])).write_h5ad(h5ad)
    layout = StoreLayout(rows_per_chunk=32, zarr_format=zarr_format, chunks_per_shard=2)
    store = ingest([h5ad], directory / f"fuzz-v{zarr_format}.zarr",
                   config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1, layout=layout))
    config = RunConfig(
        model=ModelConfig(hidden=(16,), n_latent=4),
        train=TrainConfig(pretrain_epochs=1, finetune_epochs=1, batch_size=64, min_steps_per_epoch=1,
                          seed=seed, device="cpu"),
    )
    model = Mars(store, unannotated="e1", n_clusters=3, config=config).train()
    annotate(store, model, seed=seed, device="cpu")
    return store


def store_files(store: Path) -> list[Path]:
    """Every file of the store (chunks, shards and metadata), in a fixed order."""
    return sorted(p for p in store.rglob("*") if p.is_file() and not p.name.startswith(".mars-scale"))


# ---------------------------------------------------------------------------------------------
# Damage


def damage(path: Path, kind: str, rng: np.random.Generator) -> str:
    """Damage the file ``path`` in place; return a description of what was done."""
    raw = bytearray(path.read_bytes())
    size = len(raw)
    if kind == "truncate" or size == 0:
        keep = int(rng.integers(0, max(size, 1)))
        path.write_bytes(bytes(raw[:keep]))
        return f"truncate to {keep} of {size} bytes"
    at = int(rng.integers(0, size))
    if kind == "bitflip":
        bit = int(rng.integers(0, 8))
        raw[at] ^= 1 << bit
        what = f"bitflip byte {at} bit {bit}"
    elif kind == "byterun":
        n = min(int(rng.integers(1, 65)), size - at)
        new = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        raw[at:at + n] = new
        what = f"byterun {at}:{at + n}"
    elif kind == "zerofill":
        n = min(int(rng.integers(1, 4097)), size - at)
        raw[at:at + n] = bytes(n)
        what = f"zerofill {at}:{at + n}"
    else:
        raise ValueError(f"unknown damage kind {kind!r}")
    path.write_bytes(bytes(raw))
    return what


# ---------------------------------------------------------------------------------------------
# Reading back (runs in the worker)

_REFERENCE: dict[str, Any] = {}


def read_everything(store: Path) -> dict[str, Any]:
    """Every element of the store as plain Python/numpy values."""
    import zarr
    from anndata.io import read_elem

    from mars_scale.store import open_store

    atlas = open_store(store)
    x = atlas.read_rows(0, atlas.n_cells)
    root = zarr.open_group(store, mode="r")
    out: dict[str, Any] = {
        "X": (x.shape, x.indptr.copy(), x.indices.copy(), x.data.copy()),
        "meta": (atlas.n_cells, atlas.n_genes, atlas.experiments, atlas.experiment_ranges, atlas.input_kind),
    }
    for key in ("obs", "var", "obsm", "uns"):
        out[key] = read_elem(root[key])
    return out


def _equal(a: Any, b: Any) -> bool:
    import pandas as pd

    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, pd.DataFrame):
        return isinstance(b, pd.DataFrame) and a.equals(b) and list(a.columns) == list(b.columns) and a.index.equals(b.index) \
            and all(str(a[c].dtype) == str(b[c].dtype) for c in a.columns)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.kind == "f":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _prime(store: str) -> int:
    """Read the undamaged store once (in the worker) as the reference; silence the worker.

    Only for the worker process: it turns off logging and warnings process-wide.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    _REFERENCE[store] = read_everything(Path(store))
    return os.getpid()


def _evaluate(store: str) -> tuple[str, str]:
    """verify, then read back: (outcome, detail)."""
    import signal

    from mars_scale.errors import StoreError
    from mars_scale.verify import verify_store

    signal.alarm(_CASE_TIMEOUT_S)  # a hang ends the worker with SIGALRM: counted as a crash
    try:
        try:
            verify_store(store)
        except StoreError as exc:
            return "detected", str(exc).split("; the store is damaged")[0].replace(store, "STORE")
        except Exception as exc:
            return "crash", f"verify raised {type(exc).__name__}: {exc}"
        try:
            back = read_everything(Path(store))
        except Exception as exc:
            return "missed", f"read raised {type(exc).__name__}: {exc}"
        if _equal(back, _REFERENCE[store]):
            return "identical", ""
        return "silent", "reads back different values"
    finally:
        signal.alarm(0)


# ---------------------------------------------------------------------------------------------
# Running cases


class Fuzzer:
    """Runs damage cases on one store, evaluating each in a worker process (restarted after a crash).

    Parameters
    ----------
    store
        An annotated store (see :func:`build_store`); every case restores the file it damaged.
    """

    def __init__(self, store: Path) -> None:
        self.store = Path(store)
        self.files = store_files(self.store)
        self._pool: cf.ProcessPoolExecutor | None = None

    def _worker(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            self._pool.submit(_prime, str(self.store)).result()
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def run_case(self, rng: np.random.Generator, kind: str | None = None, *, by_size: bool = False) -> dict[str, Any]:
        """Damage one random file, evaluate, restore; return the case record.

        The file is drawn uniformly, or with ``by_size`` in proportion to its size (which
        favours the chunks of X and obsm over the many small metadata files).
        """
        if by_size:
            sizes = np.array([max(p.stat().st_size, 1) for p in self.files], dtype=np.float64)
            path = self.files[int(rng.choice(len(self.files), p=sizes / sizes.sum()))]
        else:
            path = self.files[int(rng.integers(0, len(self.files)))]
        kind = kind or KINDS[int(rng.integers(0, len(KINDS)))]
        original = path.read_bytes()
        pool = self._worker()  # primed on the undamaged store
        try:
            what = damage(path, kind, rng)
            future = pool.submit(_evaluate, str(self.store))
            try:
                outcome, detail = future.result(timeout=_CASE_TIMEOUT_S + 30)
            except (cf.process.BrokenProcessPool, cf.TimeoutError) as exc:
                self._pool = None  # the worker died: start another for the next case
                outcome, detail = "crash", f"worker died ({type(exc).__name__})"
        finally:
            tmp = path.with_name(f".{path.name}.restore")
            tmp.write_bytes(original)
            os.replace(tmp, path)
        return {"file": path.relative_to(self.store).as_posix(), "kind": kind, "damage": what,
                "outcome": outcome, "detail": detail}


def run(store: Path, n_cases: int, seed: int) -> dict[str, Any]:
    """Run ``n_cases`` cases on ``store``; counts by outcome, by kind and by element."""
    rng = np.random.default_rng(seed)
    fuzzer = Fuzzer(store)
    cases = []
    started = time.perf_counter()
    try:
        for i in range(n_cases):
            cases.append(fuzzer.run_case(rng, by_size=bool(i % 2)))
            if (i + 1) % 100 == 0:
                logger.info("%s: %d cases, %s", store.name, i + 1,
                            dict(collections.Counter(c["outcome"] for c in cases)))
    finally:
        fuzzer.close()
    counts = collections.Counter(c["outcome"] for c in cases)
    by_kind = {k: dict(collections.Counter(c["outcome"] for c in cases if c["kind"] == k)) for k in KINDS}
    by_element = collections.defaultdict(collections.Counter)
    for c in cases:
        by_element[c["file"].split("/")[0]][c["outcome"]] += 1
    return {
        "n_cases": n_cases,
        "seed": seed,
        "n_files": len(fuzzer.files),
        "store_bytes": sum(p.stat().st_size for p in fuzzer.files),
        "counts": {o: int(counts.get(o, 0)) for o in OUTCOMES},
        "by_kind": by_kind,
        "by_element": {k: dict(v) for k, v in sorted(by_element.items())},
        "failures": [c for c in cases if c["outcome"] in ("silent", "missed", "crash")],
        "examples_detected": [c for c in cases if c["outcome"] == "detected"][:10],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="Cases per zarr format.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", type=int, nargs="+", default=[3, 2])
    parser.add_argument("--scratch", type=Path, default=None, help="Where to build the stores (default: a temporary directory).")
    parser.add_argument("--name", default="fuzz", help="Result file stem.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import write_result

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="mars-fuzz-"))
    results = {}
    try:
        for fmt in args.formats:
            directory = scratch / f"v{fmt}"
            shutil.rmtree(directory, ignore_errors=True)
            store = build_store(directory, zarr_format=fmt, seed=args.seed)
            results[f"zarr_v{fmt}"] = run(store, args.cases, args.seed)
            logger.info("zarr v%d: %s", fmt, results[f"zarr_v{fmt}"]["counts"])
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    total = collections.Counter()
    for r in results.values():
        total.update(r["counts"])
    payload = {
        "parameters": {"cases_per_format": args.cases, "seed": args.seed, "formats": args.formats, "kinds": list(KINDS)},
        "total": {o: int(total.get(o, 0)) for o in OUTCOMES},
        "results": results,
    }
    path = write_result(args.name, payload)
    logger.info("total %s -> %s", payload["total"], path)
    return 0 if total["silent"] == total["crash"] == total["missed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
