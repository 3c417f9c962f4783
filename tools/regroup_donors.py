"""Regroup a simulated atlas's experiments into donors that each hold a control and a
stimulated part, as PBMC donors multiplexed into one control and one stimulated run do.

The PBMC-like atlas (``benchmarks/novelty.py`` writes ``synthetic_pbmc_like_deep.h5ad`` in its
workdir) has stimulated experiments (exp00, exp01) and control ones (exp02, exp03). Each donor
here is half of one stimulated experiment and half of one control experiment (donor0 and donor1
from exp00 + exp02, donor2 and donor3 from exp01 + exp03), in a new ``obs['donor']`` column, so
a held-out donor holds both conditions and the reference's donors do too.

Usage::

    python tools/regroup_donors.py /work/scratch/novelty/synthetic_pbmc_like_deep.h5ad donors.h5ad
    python benchmarks/novelty.py --datasets donors.h5ad --experiment-key donor --label-key cell_type \\
        --held-out donor0 donor2 --key synthetic-deep-donors-mixed-conditions
"""

from __future__ import annotations

import argparse

import numpy as np


def regroup(source: str, target: str, *, pairs: tuple[tuple[str, str], ...] = (("exp00", "exp02"), ("exp01", "exp03")),
            experiment_key: str = "experiment") -> None:
    """Write ``source`` to ``target`` with ``obs['donor']``: two donors per (stimulated, control)
    pair of experiments, each the first or second half of both experiments' cells."""
    import anndata as ad

    adata = ad.read_h5ad(source)
    experiments = adata.obs[experiment_key].astype(str).to_numpy()
    donor = np.full(adata.n_obs, "", dtype=object)
    for k, pair in enumerate(pairs):
        for experiment in pair:
            cells = np.flatnonzero(experiments == experiment)
            if cells.size == 0:
                raise SystemExit(f"no cells of experiment {experiment!r} in {source}")
            donor[cells[: cells.size // 2]] = f"donor{2 * k}"
            donor[cells[cells.size // 2:]] = f"donor{2 * k + 1}"
    keep = donor != ""
    adata = adata[keep].copy()
    adata.obs["donor"] = np.asarray(donor[keep], dtype=str)
    adata.obs["donor"] = adata.obs["donor"].astype("category")
    adata.write_h5ad(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args()
    regroup(args.source, args.target)


if __name__ == "__main__":
    main()
