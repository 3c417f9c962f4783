"""Landmarks: K-means initialisation and nearest-landmark assignment.

Small composable pieces, after faiss's ``contrib/clustering.py``:

- :func:`nearest` assigns points to their nearest landmark block by block, so memory is set by
  ``block_size`` and not by the number of points. Three backends sit behind it: a faiss flat index
  on the CPU, a faiss GPU flat index (only when :func:`~mars_scale.device.faiss_gpu_count` finds a
  GPU that works), and torch (matmul + argmin), used on CUDA when faiss cannot use the GPU and on
  MPS.
- :func:`kmeans` runs ``n_init`` restarts of k-means++ seeding on a subsample followed by Lloyd
  iterations on up to a million points, and keeps the restart with the lowest inertia over all
  points. faiss's own defaults (random seeding, 256 points per centroid) give clearly worse
  inertia, so neither is used.
- :func:`choose_n_clusters` picks K when the user cannot: the K-means with the best mean
  silhouette over a range, raised to a floor the caller knows (for MARS, the reference types
  the new cells reach, :func:`groups_reached`).
- :func:`reservoir_sample` keeps a uniform random subsample of a stream of blocks (for example
  embeddings produced batch by batch), so that callers can bound what they pass to :func:`kmeans`.

All randomness comes from an explicit ``seed``; nothing touches global random state.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse
import torch

from mars_scale.device import faiss_gpu_count, resolve_device
from mars_scale.errors import ConfigError, InputError
from mars_scale.rng import RNGLike, SeedLike

__all__ = ["ClusterCountChoice", "KMeansResult", "choose_n_clusters", "groups_reached", "kmeans", "nearest",
           "reservoir_sample"]

logger = logging.getLogger(__name__)

#: Rows per block in assignment passes.
DEFAULT_BLOCK_SIZE = 65536
#: Lloyd iterations use at most this many points unless ``sample_size`` says otherwise.
MAX_TRAIN_POINTS = 1_000_000
#: k-means++ seeding runs on ``max(SEED_POINTS_PER_CENTROID * k, MIN_SEED_POINTS)`` points.
SEED_POINTS_PER_CENTROID = 50
MIN_SEED_POINTS = 10_000

_Backend = Literal["faiss-cpu", "faiss-gpu", "torch"]


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes
    ----------
    centroids
        The best restart's centroids, float32 of shape ``(k, d)``.
    inertia
        Sum of squared distances from every input point to its nearest centroid.
    n_iter
        Lloyd iterations run by the best restart.
    converged
        Whether the best restart stopped on the tolerance or on unchanged assignments (rather
        than on ``max_iter``).
    inertias
        Inertia over all points of each restart, in restart order.
    best_restart
        Index of the restart kept.
    n_train
        Number of points used for the Lloyd iterations.
    """

    centroids: np.ndarray
    inertia: float
    n_iter: int
    converged: bool
    inertias: tuple[float, ...]
    best_restart: int
    n_train: int


# ----------------------------------------------------------------------------------------------
# validation and conversion


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _shape_2d(x: Any, name: str) -> tuple[int, int]:
    """Check that ``x`` is a 2-D numeric numpy array or tensor with at least one column."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise InputError(f"{name} must hold real numbers, got dtype {x.dtype}")
        shape = tuple(x.shape)
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise InputError(f"{name} must hold real numbers, got dtype {x.dtype}")
        shape = x.shape
    else:
        raise InputError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if len(shape) != 2:
        raise InputError(f"{name} must be 2-D (points x dimensions), got shape {shape}")
    if shape[1] < 1:
        raise InputError(f"{name} must have at least one column, got shape {shape}")
    return int(shape[0]), int(shape[1])


def _numpy_block(x: np.ndarray | torch.Tensor, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``x`` as a C-contiguous float32 numpy array."""
    block = x[start:stop]
    if isinstance(block, torch.Tensor):
        block = block.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(block, dtype=np.float32)


def _torch_block(x: np.ndarray | torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of ``x`` as a float32 tensor on ``device``."""
    block = x[start:stop]
    if isinstance(block, torch.Tensor):
        return block.detach().to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(device)


def _check_finite(x: np.ndarray | torch.Tensor, name: str, block_size: int) -> None:
    """Raise InputError if ``x`` holds NaN or infinity (checked block by block)."""
    for start in range(0, x.shape[0], block_size):
        block = x[start : start + block_size]
        if isinstance(block, torch.Tensor):
            ok = bool(torch.isfinite(block.to(torch.float32)).all())
        else:
            ok = bool(np.isfinite(block.astype(np.float32, copy=False)).all())
        if not ok:
            raise InputError(f"{name} contains NaN or infinite values (drop or impute them first)")


def _as_float32(x: Any, name: str, block_size: int) -> np.ndarray:
    """Validate ``x`` and return it as a finite, C-contiguous float32 numpy array."""
    _shape_2d(x, name)
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    _check_finite(x, name, block_size)
    return x


@functools.cache
def _faiss_gpu_usable() -> bool:
    # Probed once per process: the smoke test costs a GPU round trip and logs its fallback.
    return faiss_gpu_count() > 0


def _choose_backend(device: torch.device, use_faiss_gpu: bool | None) -> _Backend:
    """Pick the assignment backend for ``device`` (faiss CPU, faiss GPU or torch)."""
    if device.type != "cuda":
        if use_faiss_gpu:
            raise ConfigError(f"use_faiss_gpu=True needs a CUDA device, got {device} (pass device='cuda')")
        return "faiss-cpu" if device.type == "cpu" else "torch"
    if use_faiss_gpu is False:
        return "torch"
    usable = _faiss_gpu_usable()
    if use_faiss_gpu and not usable:
        raise ConfigError(
            "use_faiss_gpu=True but faiss cannot use a GPU here "
            "(pass use_faiss_gpu=None to fall back to torch)"
        )
    return "faiss-gpu" if usable else "torch"


def _gpu_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# ----------------------------------------------------------------------------------------------
# nearest landmark: backends


def _nearest_faiss(
    x: np.ndarray | torch.Tensor,
    landmarks: np.ndarray,
    *,
    block_size: int,
    gpu: int | None = None,
    resources: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest landmark with a faiss flat L2 index (CPU, or GPU ``gpu`` with ``resources``).

    ``x`` is read block by block and converted to float32 one block at a time. Returns numpy
    int64 assignments and float32 squared distances (clamped at 0).
    """
    import faiss

    n, d = x.shape
    landmarks = np.ascontiguousarray(landmarks, dtype=np.float32)
    if gpu is None:
        index = faiss.IndexFlatL2(d)
    else:
        if resources is None:
            resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = gpu
        index = faiss.GpuIndexFlatL2(resources, d, config)
    index.add(landmarks)
    assignment = np.empty(n, dtype=np.int64)
    distance = np.empty(n, dtype=np.float32)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        found_d, found_i = index.search(_numpy_block(x, start, stop), 1)
        assignment[start:stop] = found_i[:, 0]
        np.maximum(found_d[:, 0], 0.0, out=distance[start:stop])
    return assignment, distance


def _nearest_torch(
    x: np.ndarray | torch.Tensor, landmarks: torch.Tensor, *, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest landmark with torch: ``||x||² − 2 x·p + ||p||²``, argmin, clamped at 0.

    The work runs on ``landmarks.device``; blocks of ``x`` (numpy or tensor, any device) are moved
    there one at a time, so device memory is about ``block_size × (d + k)`` floats. Results are
    int64 assignments and float32 squared distances on ``x``'s device (the CPU for numpy).
    """
    device = landmarks.device
    p = landmarks.detach().to(torch.float32)
    p_sq = (p * p).sum(dim=1)
    p_t = p.T.contiguous()
    n = x.shape[0]
    out_device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    assignment = torch.empty(n, dtype=torch.int64, device=out_device)
    distance = torch.empty(n, dtype=torch.float32, device=out_device)
    with torch.no_grad():
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            xb = _torch_block(x, start, stop, device)
            # ||p||² − 2 x·p; ||x||² is constant per row, so it is added after the argmin.
            partial = torch.addmm(p_sq, xb, p_t, alpha=-2.0)
            best, index = partial.min(dim=1)
            best.add_((xb * xb).sum(dim=1)).clamp_(min=0.0)
            assignment[start:stop] = index.to(out_device)
            distance[start:stop] = best.to(out_device)
    return assignment, distance


def nearest(
    x: np.ndarray | torch.Tensor,
    landmarks: np.ndarray | torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | torch.device | None = None,
    use_faiss_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
    """Assign each point to its nearest landmark (squared Euclidean distance).

    Parameters
    ----------
    x
        Points, shape ``(n, d)``, as a numpy array or a torch tensor (any float or integer dtype;
        computation is in float32).
    landmarks
        Landmarks, shape ``(k, d)``, numpy or torch.
    block_size
        Rows of ``x`` handled at a time; memory is about ``block_size × (d + k)`` floats.
    device
        Where to compute: ``"cpu"`` uses a faiss flat index; a CUDA device uses a faiss GPU index
        if faiss can use the GPU, otherwise torch (matmul + argmin); MPS uses torch. ``None``
        means the device of ``x`` if it is a tensor, otherwise the CPU.
    use_faiss_gpu
        On CUDA: ``None`` runs :func:`~mars_scale.device.faiss_gpu_count` (a smoke test) to decide,
        ``False`` always uses torch, ``True`` requires faiss GPU. Callers assigning repeatedly on
        CUDA should decide once and pass a bool.

    Returns
    -------
    assignment, squared_distance
        int64 index of the nearest landmark and float32 squared distance to it (never negative),
        each of shape ``(n,)``. numpy arrays for numpy ``x``; tensors on ``x``'s device for a
        tensor ``x``. Ties go to either landmark.

    Raises
    ------
    InputError
        If the inputs are not 2-D, their dimensions differ, ``landmarks`` is empty, either holds
        NaN or infinity, or ``block_size`` is not a positive integer.
    ConfigError
        If ``device`` is unavailable, or ``use_faiss_gpu=True`` cannot be honoured.
    """
    block_size = _check_int(block_size, "block_size", minimum=1)
    n, d = _shape_2d(x, "x")
    k, d_landmarks = _shape_2d(landmarks, "landmarks")
    if k < 1:
        raise InputError("landmarks is empty (pass at least one landmark)")
    if d_landmarks != d:
        raise InputError(
            f"landmarks have {d_landmarks} dimensions but x has {d} (embed both with the same model)"
        )
    _check_finite(landmarks, "landmarks", block_size)
    _check_finite(x, "x", block_size)

    is_tensor = isinstance(x, torch.Tensor)
    if device is None:
        compute = x.device if is_tensor else torch.device("cpu")
    else:
        compute = resolve_device(device)
    backend = _choose_backend(compute, use_faiss_gpu)

    started = time.perf_counter()
    if backend == "torch":
        if isinstance(landmarks, torch.Tensor):
            p = landmarks
        else:
            p = torch.from_numpy(np.ascontiguousarray(landmarks, dtype=np.float32))
        p = p.to(device=compute, dtype=torch.float32)
        assignment, distance = _nearest_torch(x, p, block_size=block_size)
        if not is_tensor:
            assignment, distance = assignment.numpy(), distance.numpy()
    else:
        p_np = _numpy_block(landmarks, 0, k)
        gpu = _gpu_index(compute) if backend == "faiss-gpu" else None
        assignment, distance = _nearest_faiss(x, p_np, block_size=block_size, gpu=gpu)
        if is_tensor:
            assignment = torch.from_numpy(assignment).to(x.device)
            distance = torch.from_numpy(distance).to(x.device)
    logger.debug(
        "nearest: %d points x %d dims to %d landmarks on %s with %s in %.2f s",
        n,
        d,
        k,
        compute,
        backend,
        time.perf_counter() - started,
    )
    return assignment, distance


# ----------------------------------------------------------------------------------------------
# k-means


def _sq_dist(points: np.ndarray, points_sq: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distances (m, c) between float64 ``points`` and ``centers``, clamped at 0."""
    out = points @ centers.T
    out *= -2.0
    out += points_sq[:, None]
    out += np.einsum("ij,ij->i", centers, centers)[None, :]
    np.maximum(out, 0.0, out=out)
    return out


def _kmeans_plusplus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (D² sampling, best of ``2 + ln k`` candidates per centre).

    ``points`` is float64 of shape ``(m, d)``; returns float64 centres of shape ``(k, d)``.
    Cost is ``O(k · m · d · (2 + ln k))``.
    """
    m, d = points.shape
    n_trials = 2 + int(math.log(k))
    points_sq = np.einsum("ij,ij->i", points, points)
    centers = np.empty((k, d), dtype=np.float64)
    first = int(rng.integers(m))
    centers[0] = points[first]
    closest = _sq_dist(points, points_sq, points[first : first + 1])[:, 0]
    potential = float(closest.sum())
    for c in range(1, k):
        if potential > 0.0:
            targets = rng.random(n_trials) * potential
            candidates = np.searchsorted(np.cumsum(closest), targets, side="right")
            np.minimum(candidates, m - 1, out=candidates)
        else:  # every point already coincides with a centre
            candidates = rng.integers(m, size=n_trials)
        dist = _sq_dist(points, points_sq, points[candidates])
        np.minimum(dist, closest[:, None], out=dist)
        potentials = dist.sum(axis=0)
        best = int(np.argmin(potentials))
        centers[c] = points[candidates[best]]
        closest = dist[:, best].copy()
        potential = float(potentials[best])
    return centers


def _mean_variance(data: np.ndarray, block_size: int) -> float:
    """Mean over dimensions of the per-dimension variance, in float64, block by block."""
    n, d = data.shape
    total = np.zeros(d)
    total_sq = np.zeros(d)
    for start in range(0, n, block_size):
        block = data[start : start + block_size].astype(np.float64)
        total += block.sum(axis=0)
        total_sq += np.einsum("ij,ij->j", block, block)
    mean = total / n
    return float(np.mean(np.maximum(total_sq / n - mean * mean, 0.0)))


def _centroid_update(
    data: torch.Tensor,
    assignment: torch.Tensor,
    distance: torch.Tensor,
    k: int,
    *,
    block_size: int,
    sparse: bool,
) -> tuple[np.ndarray, int]:
    """Means of the assigned points; an empty cluster moves to a point far from its centroid.

    Sums are taken per block in float32 and accumulated in float64: with ``sparse`` (CPU data
    only) by a scipy one-hot product, which is single-threaded, deterministic and free of
    contention between torch's and faiss's OpenMP runtimes; otherwise with ``index_add_`` on the
    data's device. Returns float32 centroids and the number of clusters that were empty.
    """
    n, d = data.shape
    if sparse:
        values, labels = data.numpy(), assignment.numpy()
        sums = np.zeros((k, d), dtype=np.float64)
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            one_hot = scipy.sparse.csr_matrix(
                (np.ones(stop - start, dtype=np.float32), (labels[start:stop], np.arange(stop - start))),
                shape=(k, stop - start),
            )
            sums += one_hot @ values[start:stop]
        counts = np.bincount(labels, minlength=k)
    else:
        sums_t = torch.zeros((k, d), dtype=torch.float64, device=data.device)
        part = torch.empty((k, d), dtype=torch.float32, device=data.device)
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            part.zero_().index_add_(0, assignment[start:stop], data[start:stop])
            sums_t += part
        sums = sums_t.cpu().numpy()
        counts = torch.bincount(assignment, minlength=k).cpu().numpy()
    centroids = sums / np.maximum(counts, 1)[:, None]
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        far = torch.topk(distance, int(empty.size)).indices
        centroids[empty] = data[far].cpu().numpy()
    return centroids.astype(np.float32), int(empty.size)


def _lloyd(
    data: torch.Tensor,
    init: np.ndarray,
    assign: Callable[[torch.Tensor, np.ndarray], tuple[torch.Tensor, torch.Tensor]],
    *,
    max_iter: int,
    tol_abs: float,
    block_size: int,
    sparse: bool,
) -> tuple[np.ndarray, int, bool]:
    """Lloyd iterations from ``init`` until assignments stop changing or the centres move less
    than ``tol_abs`` (summed squared shift). Returns centroids, iterations and convergence."""
    centroids = np.ascontiguousarray(init, dtype=np.float32)
    k = centroids.shape[0]
    previous = None
    n_iter = 0
    for iteration in range(1, max_iter + 1):
        assignment, distance = assign(data, centroids)
        if previous is not None and torch.equal(assignment, previous):
            return centroids, n_iter, True
        updated, n_empty = _centroid_update(
            data, assignment, distance, k, block_size=block_size, sparse=sparse
        )
        if n_empty:
            logger.debug("k-means iteration %d: %d empty cluster(s) moved to far points", iteration, n_empty)
        shift = float(np.sum((updated.astype(np.float64) - centroids.astype(np.float64)) ** 2))
        centroids, previous, n_iter = updated, assignment, iteration
        if shift <= tol_abs:
            return centroids, n_iter, True
    return centroids, n_iter, False


def kmeans(
    x: np.ndarray | torch.Tensor,
    k: int,
    *,
    seed: SeedLike | RNGLike,
    n_init: int = 10,
    max_iter: int = 100,
    tol: float = 1e-4,
    sample_size: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | torch.device = "cpu",
    use_faiss_gpu: bool | None = None,
) -> KMeansResult:
    """K-means: best of ``n_init`` restarts of k-means++ seeding followed by Lloyd iterations.

    Each restart draws ``max(50·k, 10000)`` points (all if fewer) of the training set, seeds
    ``k`` centres on them with greedy k-means++, and runs Lloyd iterations on the training set:
    ``sample_size`` points drawn once at random from ``x`` (all of ``x`` up to
    :data:`MAX_TRAIN_POINTS`). The restart with the lowest inertia over all of ``x`` is kept.

    ``x`` is held in memory as float32 (a float64 input is copied once). To cluster a stream
    (for example embeddings computed batch by batch), cap the points kept first, with
    :func:`reservoir_sample` or a per-experiment subsample; a million points is plenty.

    Parameters
    ----------
    x
        Points, shape ``(n, d)``, numpy array or torch tensor, finite.
    k
        Number of clusters, ``1 <= k <= n``.
    seed
        Seed or generator; restart ``r`` uses the ``r``-th generator spawned from
        ``np.random.default_rng(seed)``, so results depend on nothing else (on the CPU they are
        bit-for-bit reproducible; CUDA sums may differ in the last bits).
    n_init
        Number of restarts.
    max_iter
        Maximum Lloyd iterations per restart.
    tol
        Stop when the summed squared centre shift is at most ``tol`` times the mean per-dimension
        variance of the training points (scikit-learn's rule), or when no assignment changes.
    sample_size
        Points used for Lloyd iterations; ``None`` means ``min(n, MAX_TRAIN_POINTS)``. Values
        above ``n`` use all points.
    block_size
        Rows per block in assignment passes; bounds the temporary memory.
    device
        ``"cpu"`` (faiss), or a CUDA/MPS device (faiss GPU if usable, otherwise torch); see
        :func:`nearest`. Seeding always runs on the CPU.
    use_faiss_gpu
        As in :func:`nearest`; decided once per call.

    Returns
    -------
    KMeansResult
        Best centroids (float32), their inertia over all of ``x``, iterations, convergence flag,
        and the inertia of every restart.

    Raises
    ------
    InputError
        If ``x`` is not a finite 2-D array, ``k`` is not in ``[1, n]``, or an option is out of
        range.
    ConfigError
        If ``device`` is unavailable or ``use_faiss_gpu=True`` cannot be honoured.
    """
    k = _check_int(k, "k", minimum=1)
    n_init = _check_int(n_init, "n_init", minimum=1)
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    block_size = _check_int(block_size, "block_size", minimum=1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not tol >= 0:
        raise InputError(f"tol must be a non-negative number, got {tol!r}")
    if sample_size is not None:
        sample_size = _check_int(sample_size, "sample_size", minimum=k)
    n, d = _shape_2d(x, "x")
    if k > n:
        raise InputError(f"k={k} is larger than the number of points ({n}) (lower k or pass more points)")
    compute = resolve_device(device)
    points = _as_float32(x, "x", block_size)
    backend = _choose_backend(compute, use_faiss_gpu)

    started = time.perf_counter()
    sample_rng, *restart_rngs = np.random.default_rng(seed).spawn(n_init + 1)
    n_train = min(n, sample_size if sample_size is not None else max(k, MAX_TRAIN_POINTS))
    if n_train < n:
        train = points[np.sort(sample_rng.choice(n, size=n_train, replace=False))]
    else:
        train = points
    tol_abs = float(tol) * _mean_variance(train, block_size)
    data, assign = _assigner(train, backend, compute, block_size)
    n_seed = min(n_train, max(SEED_POINTS_PER_CENTROID * k, MIN_SEED_POINTS))
    runs: list[tuple[np.ndarray, int, bool]] = []
    inertias: list[float] = []
    for restart, rng in enumerate(restart_rngs):
        seed_points = train[np.sort(rng.choice(n_train, size=n_seed, replace=False))].astype(np.float64)
        init = _kmeans_plusplus(seed_points, k, rng)
        centroids, n_iter, converged = _lloyd(
            data, init, assign, max_iter=max_iter, tol_abs=tol_abs, block_size=block_size,
            sparse=backend != "torch",
        )
        _, distance = assign(data if train is points else torch.from_numpy(points), centroids)
        inertias.append(float(distance.to(torch.float64).sum()))
        runs.append((centroids, n_iter, converged))
        logger.debug("k-means restart %d: inertia %.6g after %d iteration(s)%s", restart, inertias[-1], n_iter,
                     "" if converged else " (max_iter reached)")

    best_restart = int(np.argmin(inertias))  # first of equal inertias
    centroids, n_iter, converged = runs[best_restart]
    logger.info(
        "k-means: %d points x %d dims, k=%d, %d restart(s) on %d points with %s on %s: "
        "inertia %.6g (restarts %.6g to %.6g) in %.2f s",
        n, d, k, n_init, n_train, backend, compute, inertias[best_restart], min(inertias), max(inertias),
        time.perf_counter() - started,
    )
    if not converged:
        logger.info("k-means: the best restart stopped at max_iter=%d before converging", max_iter)
    return KMeansResult(centroids=centroids, inertia=inertias[best_restart], n_iter=n_iter, converged=converged,
                        inertias=tuple(inertias), best_restart=best_restart, n_train=n_train)


def _assigner(train: np.ndarray, backend: _Backend, compute: torch.device, block_size: int):
    """The training points as a tensor, and the nearest-centroid function of ``backend``."""
    if backend == "torch":
        def assign(values: torch.Tensor, centroids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            return _nearest_torch(values, torch.from_numpy(centroids).to(compute), block_size=block_size)

        return torch.from_numpy(train).to(compute), assign
    gpu = _gpu_index(compute) if backend == "faiss-gpu" else None
    resources = None
    if gpu is not None:
        import faiss

        resources = faiss.StandardGpuResources()

    def assign(values: torch.Tensor, centroids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        found_i, found_d = _nearest_faiss(values.numpy(), centroids, block_size=block_size, gpu=gpu,
                                          resources=resources)
        return torch.from_numpy(found_i), torch.from_numpy(found_d)

    return torch.from_numpy(train), assign


# ----------------------------------------------------------------------------------------------
# choosing K


@dataclass(frozen=True)
class ClusterCountChoice:
    """Outcome of :func:`choose_n_clusters`.

    Attributes
    ----------
    n_clusters
        The chosen K: ``max(best, floor)``, at most the number of points.
    best
        The K of the highest mean silhouette (the smallest of equal ones).
    floor
        The lower bound the caller gave.
    silhouette
        Mean silhouette of the K-means partition for each K tried.
    """

    n_clusters: int
    best: int
    floor: int
    silhouette: dict[int, float]


def choose_n_clusters(
    x: np.ndarray | torch.Tensor,
    *,
    k_max: int,
    seed: SeedLike,
    k_min: int = 2,
    floor: int = 1,
    n_init: int = 3,
    sample_size: int = 20_000,
    silhouette_size: int = 4_000,
    device: str | torch.device = "cpu",
) -> ClusterCountChoice:
    """K for K-means when none is given: the best mean silhouette over ``k_min..k_max``, and at
    least ``floor``.

    For each K, :func:`kmeans` runs on at most ``sample_size`` points; the silhouette
    (scikit-learn's, Euclidean) is taken over at most ``silhouette_size`` of them, the same
    ones for every K, each labelled by its nearest centroid. The silhouette prefers
    well-separated groups and so merges close ones (two subtypes become one cluster);
    ``floor`` is where the caller puts what it knows about the least number of groups.

    Parameters
    ----------
    x
        Points, shape ``(n, d)``, finite.
    k_max, k_min
        The range of K tried, ``2 <= k_min <= k_max``; ``k_max`` is lowered to ``n - 1``.
    seed
        Seed of the subsamples and the K-means runs.
    floor
        The chosen K is at least this (and at most ``n``).
    n_init
        K-means restarts per K.
    sample_size, silhouette_size
        Points clustered per K, and points the silhouette is measured on.
    device
        As in :func:`kmeans`.

    Raises
    ------
    InputError
        If ``x`` has fewer than ``k_min + 1`` points, or ``k_min``, ``k_max`` or ``floor`` is out
        of range.
    """
    from sklearn.metrics import silhouette_score

    n, _ = _shape_2d(x, "x")
    k_min = _check_int(k_min, "k_min", minimum=2)
    k_max = min(_check_int(k_max, "k_max", minimum=k_min), n - 1)
    floor = _check_int(floor, "floor", minimum=1)
    if k_max < k_min:
        raise InputError(f"choosing K needs at least {k_min + 1} points, got {n}")
    points = _as_float32(x, "x", DEFAULT_BLOCK_SIZE)
    rng = np.random.default_rng(seed)
    if n > sample_size:
        points = points[np.sort(rng.choice(n, size=sample_size, replace=False))]
    measured = points[np.sort(rng.choice(len(points), size=min(len(points), silhouette_size), replace=False))]
    scores: dict[int, float] = {}
    for k in range(k_min, k_max + 1):
        centroids = kmeans(points, k, seed=rng, n_init=n_init, device=device).centroids
        labels, _ = nearest(measured, centroids, device=device)
        scores[k] = float(silhouette_score(measured, labels)) if np.unique(labels).size > 1 else -1.0
    best = max(scores, key=lambda k: (scores[k], -k))
    chosen = min(max(best, floor), n)
    logger.info("K chosen: %d (best silhouette %.3f at K=%d, floor %d; K=%d..%d tried)", chosen, scores[best], best,
                floor, k_min, k_max)
    return ClusterCountChoice(n_clusters=chosen, best=best, floor=floor, silhouette=scores)


def groups_reached(
    x: np.ndarray | torch.Tensor,
    centers: np.ndarray | torch.Tensor,
    groups: np.ndarray,
    *,
    min_points: int,
    device: str | torch.device = "cpu",
) -> int:
    """How many groups of centres are the nearest centre's group for at least ``min_points`` of ``x``.

    With the annotated landmarks as ``centers`` and their cell-type codes (non-negative
    integers) as ``groups``, it counts the reference types a new experiment's cells land on: a
    lower bound on its number of types (a new type lands on a known one and is not counted).
    """
    assignment, _ = nearest(x, centers, device=device)
    per_group = np.bincount(np.asarray(groups, dtype=np.int64)[np.asarray(assignment)])
    return int((per_group >= min_points).sum())


# ----------------------------------------------------------------------------------------------
# streaming subsample


def reservoir_sample(
    blocks: Iterable[np.ndarray | torch.Tensor],
    *,
    max_points: int,
    seed: SeedLike | RNGLike,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep a uniform random subsample (without replacement) of the rows of a stream of blocks.

    Every row gets a uniform random key and the ``max_points`` rows with the smallest keys are
    kept, so the sample depends only on the seed and the row order, not on how the stream is cut
    into blocks. Memory stays below about ``3 × max_points`` rows plus one block.

    Parameters
    ----------
    blocks
        Iterable of 2-D arrays or tensors with the same number of columns (e.g. embeddings of
        successive batches).
    max_points
        Size of the sample; streams with fewer rows are returned whole.
    seed
        Seed or generator for the keys.

    Returns
    -------
    sample, index
        The kept rows as float32 of shape ``(m, d)`` with ``m = min(max_points, total rows)``, and
        their int64 positions in the stream, both in stream order.

    Raises
    ------
    InputError
        If ``max_points`` is not a positive integer, a block is not a finite 2-D array, blocks
        differ in width, or the stream is empty.
    """
    max_points = _check_int(max_points, "max_points", minimum=1)
    rng = np.random.default_rng(seed)
    kept_rows: np.ndarray | None = None
    kept_keys = np.empty(0)
    kept_index = np.empty(0, dtype=np.int64)
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n_pending = 0
    threshold = np.inf
    offset = 0
    width = None

    def merge() -> None:
        nonlocal kept_rows, kept_keys, kept_index, pending, n_pending, threshold
        rows = np.concatenate(([kept_rows] if kept_rows is not None else []) + [p[0] for p in pending])
        keys = np.concatenate([kept_keys] + [p[1] for p in pending])
        index = np.concatenate([kept_index] + [p[2] for p in pending])
        if keys.size > max_points:
            keep = np.argpartition(keys, max_points - 1)[:max_points]
            rows, keys, index = rows[keep], keys[keep], index[keep]
        if keys.size == max_points:
            threshold = float(keys.max())
        kept_rows, kept_keys, kept_index = rows, keys, index
        pending, n_pending = [], 0

    for position, block in enumerate(blocks):
        n_rows, n_cols = _shape_2d(block, f"block {position}")
        if width is None:
            width = n_cols
        elif n_cols != width:
            raise InputError(f"block {position} has {n_cols} columns but earlier blocks have {width}")
        keys = rng.random(n_rows)
        chosen = np.flatnonzero(keys < threshold)
        if chosen.size:
            rows = _numpy_block(block, 0, n_rows)[chosen]
            _check_finite(rows, f"block {position}", DEFAULT_BLOCK_SIZE)
            pending.append((rows, keys[chosen], offset + chosen))
            n_pending += chosen.size
            if n_pending >= max(max_points // 2, 1):
                merge()
        offset += n_rows
    if width is None:
        raise InputError("the stream of blocks is empty (pass at least one block)")
    if offset == 0:
        return np.empty((0, width), dtype=np.float32), np.empty(0, dtype=np.int64)
    if pending:
        merge()
    order = np.argsort(kept_index, kind="stable")
    return np.ascontiguousarray(kept_rows[order]), kept_index[order]
