"""The null distribution of the two-means bimodality d' of n Gaussian values.

``mars_scale.subpopulations`` calls n values bimodal when their d' exceeds the 99th percentile
printed here for their size (and 3.5). Run:

    python tools/bimodality_null.py --draws 400 --seed 1
"""

from __future__ import annotations

import argparse

import numpy as np

from mars_scale.subpopulations import _NULL_Q99, _NULL_SIZES, bimodality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{'n':>6} {'median':>7} {'q95':>6} {'q99':>6} {'q99.9':>6} {'in the package':>15}")
    for n, used in zip(_NULL_SIZES, _NULL_Q99):
        values = np.array([bimodality(rng.normal(size=int(n)))[0] for _ in range(args.draws)])
        q = np.quantile(values, [0.5, 0.95, 0.99, 0.999])
        print(f"{n:>6} {q[0]:>7.2f} {q[1]:>6.2f} {q[2]:>6.2f} {q[3]:>6.2f} {used:>15.2f}")


if __name__ == "__main__":
    main()
