"""Regroup a simulated atlas's experiments into donors that each hold a control and a
stimulated part, as PBMC donors multiplexed into one control and one stimulated run do.

The PBMC-like atlases (``benchmarks/novelty.py`` writes ``synthetic_pbmc_like_deep.h5ad`` and
``synthetic_pbmc_like_ifn.h5ad`` in its workdir) have stimulated experiments (exp00, exp01) and
control ones (exp02, exp03). Two layouts, in a new ``obs['donor']`` column:

- ``donors`` (default): each donor is half of one stimulated experiment and half of one control
  experiment (donor0 and donor1 from exp00 + exp02, donor2 and donor3 from exp01 + exp03), so a
  held-out donor holds both conditions and the reference's donors do too.
- ``mixed-held-out``: only ``mix0`` (the first halves of exp00 and exp02) holds both
  conditions; the other halves (``exp00_rest``, ``exp02_rest``) and exp01 and exp03 stay
  experiments of one condition each. Holding out ``mix0`` asks whether a condition that the
  reference holds only in separate experiments is taken for a new population.

Usage::

    python tools/regroup_donors.py /work/scratch/novelty/synthetic_pbmc_like_deep.h5ad donors.h5ad
    python benchmarks/novelty.py --datasets donors.h5ad --experiment-key donor --label-key cell_type \\
        --held-out donor0 donor2 --key synthetic-deep-donors-mixed-conditions
    python tools/regroup_donors.py --layout mixed-held-out atlas.h5ad mixed.h5ad
    python benchmarks/novelty.py --datasets mixed.h5ad --experiment-key donor --label-key cell_type \\
        --held-out mix0 --key ...
"""

from __future__ import annotations

import argparse

import numpy as np

PAIRS = (("exp00", "exp02"), ("exp01", "exp03"))  # (stimulated, control)


def regroup(source: str, target: str, *, layout: str = "donors", pairs: tuple[tuple[str, str], ...] = PAIRS,
            experiment_key: str = "experiment") -> None:
    """Write ``source`` to ``target`` with ``obs['donor']`` as ``layout`` (module docstring) groups
    the cells of the (stimulated, control) ``pairs`` of experiments: the first or second half of
    each experiment's cells."""
    import anndata as ad

    if layout not in ("donors", "mixed-held-out"):
        raise SystemExit(f"unknown layout {layout!r}: donors or mixed-held-out")
    adata = ad.read_h5ad(source)
    experiments = adata.obs[experiment_key].astype(str).to_numpy()
    donor = np.full(adata.n_obs, "", dtype=object)
    for k, pair in enumerate(pairs):
        for experiment in pair:
            cells = np.flatnonzero(experiments == experiment)
            if cells.size == 0:
                raise SystemExit(f"no cells of experiment {experiment!r} in {source}")
            first, second = cells[: cells.size // 2], cells[cells.size // 2:]
            if layout == "donors":
                donor[first], donor[second] = f"donor{2 * k}", f"donor{2 * k + 1}"
            elif k == 0:
                donor[first], donor[second] = "mix0", f"{experiment}_rest"
            else:
                donor[cells] = experiment
    keep = donor != ""
    adata = adata[keep].copy()
    adata.obs["donor"] = np.asarray(donor[keep], dtype=str)
    adata.obs["donor"] = adata.obs["donor"].astype("category")
    adata.write_h5ad(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--layout", choices=("donors", "mixed-held-out"), default="donors")
    args = parser.parse_args()
    regroup(args.source, args.target, layout=args.layout)


if __name__ == "__main__":
    main()
