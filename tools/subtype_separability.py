"""Can a subtype be told from its parent without labels? A bound for any discovery method.

For the simulated PBMC-like atlas (``mars_scale.simulate.pbmc_like_config``) at several depths
and closenesses, per experiment and per (parent, subtype) pair: K-means (k=2) on the first 20
principal components of the pair's own cells (log1p of counts per 10,000, centred), scored by
ARI against the truth. This is the easiest unsupervised setting there is (only the two
populations, nothing else to explain); where it fails, no clustering of the whole experiment
can be expected to find a subtype that the reference lacks. Also reported: K-means with k = the
number of types on the whole experiment (30 components).

Usage::

    python tools/subtype_separability.py                       # default depth, closeness 0.7
    python tools/subtype_separability.py --nnz 600 800 --closeness 0.7 0.5

Prints one line per setting; writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from scipy import sparse


def separability(*, mean_nnz_per_cell: float | None, subtype_closeness: float, seed: int = 0) -> dict[str, float]:
    """Pair-only and whole-experiment K-means ARI of one simulated atlas (see the module doc)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score

    from mars_scale.simulate import pbmc_like_config, simulate_anndata

    config = dataclasses.replace(pbmc_like_config(seed=seed), subtype_closeness=subtype_closeness,
                                 mean_nnz_per_cell=mean_nnz_per_cell)
    adata = simulate_anndata(config)
    counts = sparse.csr_matrix(adata.X)
    library = np.asarray(counts.sum(axis=1)).ravel()
    x = sparse.diags(1e4 / library) @ counts
    x.data = np.log1p(x.data)
    x = x.toarray()
    experiments = adata.obs["experiment"].astype(str).to_numpy()
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    parents = adata.obs["parent_type"].astype(str).to_numpy()
    pairs = sorted({(p, t) for p, t in zip(parents, truth) if p and p != t})
    pair_ari, whole_ari = [], []
    for e in np.unique(experiments):
        mine = experiments == e
        for parent, sub in pairs:
            rows = mine & np.isin(truth, [parent, sub])
            scores = PCA(20, random_state=seed).fit_transform(x[rows] - x[rows].mean(axis=0))
            found = KMeans(2, n_init=10, random_state=seed).fit_predict(scores)
            pair_ari.append(adjusted_rand_score(truth[rows], found))
        scores = PCA(30, random_state=seed).fit_transform(x[mine] - x[mine].mean(axis=0))
        k = np.unique(truth[mine]).size
        whole_ari.append(adjusted_rand_score(truth[mine], KMeans(k, n_init=10, random_state=seed).fit_predict(scores)))
    return {
        "genes_per_cell": float(counts.getnnz(axis=1).mean()),
        "counts_per_cell": float(library.mean()),
        "pair_ari_mean": float(np.mean(pair_ari)),
        "pair_ari_min": float(np.min(pair_ari)),
        "whole_ari_mean": float(np.mean(whole_ari)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nnz", nargs="+", type=float, default=[None],
                        help="mean_nnz_per_cell values (default: the simulator's, about 320 at 2,000 genes)")
    parser.add_argument("--closeness", nargs="+", type=float, default=[0.7])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for nnz in args.nnz:
        for closeness in args.closeness:
            r = separability(mean_nnz_per_cell=nnz, subtype_closeness=closeness, seed=args.seed)
            print(f"nnz {nnz} closeness {closeness}: {r['genes_per_cell']:.0f} genes and {r['counts_per_cell']:.0f} "
                  f"counts per cell; pair-only K-means ARI mean {r['pair_ari_mean']:.2f} (min {r['pair_ari_min']:.2f}); "
                  f"whole-experiment K-means ARI {r['whole_ari_mean']:.2f}", flush=True)


if __name__ == "__main__":
    main()
