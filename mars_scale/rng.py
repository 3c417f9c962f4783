"""The package's one random-number convention (scanpy's ``_utils/random.py``).

A public function that draws random numbers takes a seed or a generator, ``SeedLike |
RNGLike``, and turns it into a :class:`numpy.random.Generator` once, with
:func:`numpy.random.default_rng`, at its entry; everything below it receives that generator or
generators spawned from it. Options that are written to files (``TrainConfig.seed``, the
CLI's ``--seed``) stay plain integers. Only torch code needs a :class:`torch.Generator`, and
derives it from the same argument (:mod:`mars_scale.nn`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SeedLike", "RNGLike"]

SeedLike = int | np.integer | Sequence[int] | np.random.SeedSequence
"""A seed: the same seed gives the same numbers."""

RNGLike = np.random.Generator | np.random.BitGenerator
"""A generator, used (and advanced) as given."""
