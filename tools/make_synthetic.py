#!/usr/bin/env python
"""Write a synthetic single-cell atlas as h5ad (see :mod:`mars_scale.simulate`).

Examples
--------
One file of 100,000 cells x 20,000 genes in 4 experiments::

    python tools/make_synthetic.py --cells 100000 --genes 20000 --output atlas.h5ad

One file per experiment (``exp00.h5ad``, ...), as ingest expects by default::

    python tools/make_synthetic.py --cells 40000 --per-experiment --output synthetic/
"""

from __future__ import annotations

import argparse
import logging
import sys

from mars_scale.errors import MarsScaleError
from mars_scale.simulate import SimulationConfig, write_h5ad, write_h5ad_per_experiment


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", "-o", required=True,
                   help="h5ad file, or a directory with --per-experiment")
    p.add_argument("--cells", type=int, default=10_000, help="number of cells (default 10000)")
    p.add_argument("--genes", type=int, default=20_000, help="number of genes (default 20000)")
    p.add_argument("--experiments", type=int, default=4, help="number of experiments (default 4)")
    p.add_argument("--types", type=int, default=10, help="number of cell types (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--nnz-per-cell", type=float, default=None,
                   help="mean non-zeros per cell (default 1000 * sqrt(genes / 20000))")
    p.add_argument("--batch-effect", type=float, default=0.3,
                   help="batch-effect strength (default 0.3)")
    p.add_argument("--restricted-fraction", type=float, default=0.3,
                   help="fraction of cell types present in only some experiments (default 0.3)")
    p.add_argument("--per-experiment", action="store_true",
                   help="write one file per experiment into the --output directory")
    p.add_argument("--layout", choices=("csr", "csc", "dense"), default="csr",
                   help="layout of X (default csr)")
    p.add_argument("--dtype", choices=("float32", "float64", "int32", "int64"),
                   default="float32", help="dtype of X (default float32)")
    p.add_argument("--compression", choices=("gzip", "lzf"), default=None,
                   help="compress X (default: none)")
    p.add_argument("--rows-per-block", type=int, default=None,
                   help="cells generated and written at a time (default: automatic)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes generating cells (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = SimulationConfig(
            n_cells=args.cells,
            n_genes=args.genes,
            n_experiments=args.experiments,
            n_cell_types=args.types,
            seed=args.seed,
            mean_nnz_per_cell=args.nnz_per_cell,
            batch_effect_strength=args.batch_effect,
            restricted_type_fraction=args.restricted_fraction,
        )
        writer = write_h5ad_per_experiment if args.per_experiment else write_h5ad
        writer(
            args.output,
            config,
            rows_per_block=args.rows_per_block,
            layout=args.layout,
            dtype=args.dtype,
            compression=args.compression,
            n_jobs=args.jobs,
            overwrite=args.overwrite,
        )
    except MarsScaleError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
