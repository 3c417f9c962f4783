"""Tests for mars_scale.landmarks: k-means, nearest landmark, streaming subsample."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from mars_scale import landmarks
from mars_scale.errors import ConfigError, InputError
from mars_scale.landmarks import KMeansResult, _nearest_torch, kmeans, nearest, reservoir_sample

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def brute_force(x, p):
    """Float64 squared distances, nearest index, and the gap to the second nearest."""
    d2 = ((x.astype(np.float64)[:, None, :] - p.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1)
    rows = np.arange(len(x))
    best, second = d2[rows, order[:, 0]], d2[rows, order[:, 1]]
    return order[:, 0], best, second - best


def check_against_brute_force(x, p, assignment, distance):
    expected, best, gap = brute_force(x, p)
    clear = gap > 1e-4 * np.maximum(best, 1.0)  # leave near-ties out
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(assignment[clear], expected[clear])
    np.testing.assert_allclose(distance, best, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def random_points():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5003, 16)).astype(np.float32)
    return x, rng.standard_normal((37, 16)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# nearest


def test_nearest_faiss_cpu_matches_brute_force(random_points):
    x, p = random_points
    assignment, distance = nearest(x, p, block_size=1000)
    assert isinstance(assignment, np.ndarray) and assignment.dtype == np.int64
    assert distance.dtype == np.float32 and assignment.shape == distance.shape == (len(x),)
    check_against_brute_force(x, p, assignment, distance)


def test_nearest_torch_backend_matches_brute_force(random_points):
    x, p = random_points
    assignment, distance = _nearest_torch(torch.from_numpy(x), torch.from_numpy(p), block_size=1000)
    assert assignment.dtype == torch.int64 and distance.dtype == torch.float32
    check_against_brute_force(x, p, assignment.numpy(), distance.numpy())
    # numpy input to the torch backend gives the same answer
    assignment_np, distance_np = _nearest_torch(x, torch.from_numpy(p), block_size=777)
    np.testing.assert_array_equal(assignment_np.numpy(), assignment.numpy())
    np.testing.assert_allclose(distance_np.numpy(), distance.numpy(), rtol=1e-6, atol=1e-6)


def test_nearest_backends_agree(random_points):
    x, p = random_points
    faiss_a, faiss_d = nearest(x, p, block_size=512)
    torch_a, torch_d = _nearest_torch(x, torch.from_numpy(p), block_size=512)
    clear = brute_force(x, p)[2] > 1e-4
    np.testing.assert_array_equal(faiss_a[clear], torch_a.numpy()[clear])
    np.testing.assert_allclose(faiss_d, torch_d.numpy(), rtol=1e-4, atol=1e-4)


def test_nearest_accepts_tensors_and_float64(random_points):
    x, p = random_points
    ref_a, ref_d = nearest(x, p)
    t_a, t_d = nearest(torch.from_numpy(x), torch.from_numpy(p), block_size=999)
    assert isinstance(t_a, torch.Tensor) and t_a.device == torch.device("cpu")
    np.testing.assert_array_equal(t_a.numpy(), ref_a)
    d_a, d_d = nearest(x.astype(np.float64), p.astype(np.float64), block_size=999)
    np.testing.assert_array_equal(d_a, ref_a)
    np.testing.assert_allclose(d_d, ref_d, rtol=1e-6)


def test_nearest_single_landmark_and_self():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    assignment, distance = nearest(x, x, block_size=4)
    np.testing.assert_array_equal(assignment, np.arange(6))
    np.testing.assert_allclose(distance, 0.0, atol=1e-5)
    assignment, distance = nearest(x, x[:1])
    np.testing.assert_array_equal(assignment, 0)
    np.testing.assert_allclose(distance, ((x - x[0]) ** 2).sum(1), rtol=1e-6)


def test_nearest_logs_backend(random_points, caplog):
    x, p = random_points
    with caplog.at_level(logging.DEBUG, logger="mars_scale.landmarks"):
        nearest(x[:100], p)
    assert "faiss-cpu" in caplog.text


@pytest.mark.parametrize(
    ("x", "p", "kwargs", "message"),
    [
        (np.zeros((4, 3)), np.zeros((2, 2)), {}, "landmarks have 2 dimensions but x has 3"),
        (np.zeros(4), np.zeros((2, 4)), {}, "x must be 2-D"),
        (np.zeros((4, 3)), np.zeros((0, 3)), {}, "landmarks is empty"),
        (np.array([[0.0, np.nan]]), np.zeros((1, 2)), {}, "x contains NaN"),
        (np.zeros((4, 2)), np.array([[np.inf, 0.0]]), {}, "landmarks contains NaN or infinite"),
        (np.zeros((4, 2)), np.zeros((1, 2)), {"block_size": 0}, "block_size must be at least 1"),
        ([[0.0, 1.0]], np.zeros((1, 2)), {}, "x must be a numpy array or a torch tensor"),
    ],
)
def test_nearest_rejects_bad_input(x, p, kwargs, message):
    with pytest.raises(InputError, match=message):
        nearest(x, p, **kwargs)


def test_nearest_faiss_gpu_needs_cuda():
    with pytest.raises(ConfigError, match="use_faiss_gpu=True needs a CUDA device"):
        nearest(np.zeros((2, 2)), np.zeros((1, 2)), use_faiss_gpu=True)


# ----------------------------------------------------------------------------------------------
# kmeans


def sklearn_inertia(x, k):
    return KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=0).fit(x).inertia_


def test_kmeans_matches_sklearn_on_blobs():
    x, _ = make_blobs(n_samples=20000, n_features=20, centers=15, cluster_std=2.0, random_state=0)
    result = kmeans(x, 15, seed=0)
    assert isinstance(result, KMeansResult)
    assert result.centroids.shape == (15, 20) and result.centroids.dtype == np.float32
    assert result.inertia <= 1.02 * sklearn_inertia(x, 15)
    # the reported inertia is over all points, for the returned centroids
    _, distance = nearest(x, result.centroids)
    assert result.inertia == pytest.approx(float(distance.astype(np.float64).sum()), rel=1e-5)
    assert len(result.inertias) == 10 and result.inertia == min(result.inertias)


def test_kmeans_matches_sklearn_on_anisotropic_unequal_clusters():
    sizes = [6000, 3000, 1500, 800, 400, 200, 100, 60]
    rng = np.random.default_rng(1)
    x, _ = make_blobs(
        n_samples=sizes,
        n_features=10,
        cluster_std=rng.uniform(0.5, 3.0, len(sizes)),
        center_box=(-15, 15),
        random_state=1,
    )
    x = x @ rng.standard_normal((10, 10))  # shear: elongated clusters
    result = kmeans(x, len(sizes), seed=0)
    assert result.inertia <= 1.02 * sklearn_inertia(x, len(sizes))


def test_kmeans_subsample_for_lloyd():
    x, _ = make_blobs(n_samples=20000, n_features=8, centers=6, random_state=3)
    result = kmeans(x, 6, seed=1, sample_size=2000, n_init=3)
    assert result.n_train == 2000
    _, distance = nearest(x, result.centroids)
    assert result.inertia == pytest.approx(float(distance.astype(np.float64).sum()), rel=1e-5)
    assert result.inertia <= 1.02 * kmeans(x, 6, seed=1, n_init=3).inertia


def test_kmeans_same_seed_same_result():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 6)).astype(np.float32)
    first = kmeans(x, 8, seed=3, n_init=3)
    second = kmeans(x, 8, seed=3, n_init=3)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    assert first.inertias == second.inertias
    from_generator = kmeans(x, 8, seed=np.random.default_rng(3), n_init=3)
    np.testing.assert_array_equal(first.centroids, from_generator.centroids)
    other = kmeans(x, 8, seed=4, n_init=3)
    assert other.inertias != first.inertias  # unstructured data: different seeds, different optima


def test_kmeans_k1_is_the_mean():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(2000, 5))
    result = kmeans(x, 1, seed=0, n_init=2)
    np.testing.assert_allclose(result.centroids[0], x.mean(axis=0), rtol=1e-5, atol=1e-5)
    assert result.inertia == pytest.approx(((x - x.mean(axis=0)) ** 2).sum(), rel=1e-5)


def test_kmeans_k_equals_n_and_duplicates():
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]]), 4, axis=0)
    result = kmeans(x, 3, seed=0, n_init=2)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)
    rows = {tuple(row) for row in np.round(result.centroids, 5)}
    assert rows == {(0.0, 0.0), (1.0, 0.0), (0.0, 5.0)}
    # more clusters than distinct points: empty clusters are reseeded, nothing breaks
    more = kmeans(x, 5, seed=0, n_init=2)
    assert np.isfinite(more.centroids).all() and more.inertia == pytest.approx(0.0, abs=1e-6)
    exact = kmeans(x[:4], 4, seed=0, n_init=1)
    assert exact.centroids.shape == (4, 2)


def test_kmeans_accepts_tensor():
    x, _ = make_blobs(n_samples=2000, n_features=4, centers=3, random_state=4)
    from_numpy = kmeans(x.astype(np.float32), 3, seed=0, n_init=2)
    from_tensor = kmeans(torch.from_numpy(x.astype(np.float32)), 3, seed=0, n_init=2)
    np.testing.assert_array_equal(from_numpy.centroids, from_tensor.centroids)


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "message"),
    [
        (np.zeros((10, 2)), 0, {}, "k must be at least 1"),
        (np.zeros((10, 2)), 11, {}, r"k=11 is larger than the number of points \(10\)"),
        (np.zeros((10, 2)), 2.0, {}, "k must be an integer"),
        (np.zeros((10, 2)), True, {}, "k must be an integer"),
        (np.array([[0.0, np.nan]] * 5), 2, {}, "x contains NaN"),
        (np.zeros(10), 2, {}, "x must be 2-D"),
        (np.zeros((10, 2)), 2, {"n_init": 0}, "n_init must be at least 1"),
        (np.zeros((10, 2)), 3, {"sample_size": 2}, "sample_size must be at least 3"),
        (np.zeros((10, 2)), 2, {"tol": -1.0}, "tol must be a non-negative number"),
    ],
)
def test_kmeans_rejects_bad_input(x, k, kwargs, message):
    with pytest.raises(InputError, match=message):
        kmeans(x, k, seed=0, **kwargs)


def test_kmeans_torch_backend_matches_faiss_backend(monkeypatch):
    """The torch Lloyd path (used on CUDA without faiss GPU) gives the faiss path's answer."""
    x, _ = make_blobs(n_samples=6000, n_features=12, centers=9, cluster_std=2.5, random_state=6)
    with_faiss = kmeans(x, 9, seed=2, n_init=4)
    monkeypatch.setattr(landmarks, "_choose_backend", lambda device, use_faiss_gpu: "torch")
    with_torch = kmeans(x, 9, seed=2, n_init=4, sample_size=4000)
    assert with_torch.n_train == 4000
    assert with_torch.inertia == pytest.approx(with_faiss.inertia, rel=1e-3)
    _, distance = nearest(x, with_torch.centroids)
    assert with_torch.inertia == pytest.approx(float(distance.astype(np.float64).sum()), rel=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_kmeans_cuda_without_cuda():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        kmeans(np.zeros((10, 2)), 2, seed=0, device="cuda")


# ----------------------------------------------------------------------------------------------
# reservoir_sample


def test_reservoir_sample_is_uniform_and_block_invariant():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50000, 3)).astype(np.float32)
    cuts_a = [x[i : i + 4096] for i in range(0, len(x), 4096)]
    cuts_b = [x[i : i + 1000] for i in range(0, len(x), 1000)]
    sample_a, index_a = reservoir_sample(cuts_a, max_points=5000, seed=11)
    sample_b, index_b = reservoir_sample(iter(cuts_b), max_points=5000, seed=11)
    np.testing.assert_array_equal(index_a, index_b)
    assert len(index_a) == 5000 and len(np.unique(index_a)) == 5000
    assert np.all(np.diff(index_a) > 0)
    np.testing.assert_array_equal(sample_a, x[index_a])
    # uniform over the stream: each tenth of the stream holds about a tenth of the sample
    counts = np.bincount(index_a // 5000, minlength=10)
    assert counts.min() > 400 and counts.max() < 600
    _, other = reservoir_sample(cuts_a, max_points=5000, seed=12)
    assert not np.array_equal(other, index_a)


def test_reservoir_sample_short_stream_and_tensors():
    x = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    sample, index = reservoir_sample([x[:4], x[4:]], max_points=100, seed=0)
    np.testing.assert_array_equal(index, np.arange(10))
    np.testing.assert_array_equal(sample, x.numpy())


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([], "stream of blocks is empty"),
        ([np.zeros((3, 2)), np.zeros((3, 4))], "block 1 has 4 columns but earlier blocks have 2"),
        ([np.full((3, 2), np.nan)], "block 0 contains NaN"),
    ],
)
def test_reservoir_sample_rejects_bad_input(blocks, message):
    with pytest.raises(InputError, match=message):
        reservoir_sample(blocks, max_points=5, seed=0)


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_backend_matches_faiss_cpu(random_points):
    x, p = random_points
    cpu_a, cpu_d = nearest(x, p, block_size=1000, device="cpu")
    gpu_a, gpu_d = nearest(x, p, block_size=1000, device="cuda", use_faiss_gpu=False)
    assert isinstance(gpu_a, np.ndarray)
    clear = brute_force(x, p)[2] > 1e-4
    np.testing.assert_array_equal(gpu_a[clear], cpu_a[clear])
    np.testing.assert_allclose(gpu_d, cpu_d, rtol=1e-4, atol=1e-4)
    t_a, t_d = nearest(torch.from_numpy(x).cuda(), torch.from_numpy(p).cuda(), block_size=1000)
    assert t_a.is_cuda and t_d.is_cuda
    np.testing.assert_array_equal(t_a.cpu().numpy()[clear], cpu_a[clear])
    x_blobs, _ = make_blobs(n_samples=20000, n_features=20, centers=15, cluster_std=2.0, random_state=0)
    on_gpu = kmeans(x_blobs, 15, seed=0, device="cuda", use_faiss_gpu=False)
    on_cpu = kmeans(x_blobs, 15, seed=0)
    assert on_gpu.inertia == pytest.approx(on_cpu.inertia, rel=1e-3)


# -- choosing K ---------------------------------------------------------------------------------


def test_choose_n_clusters_finds_separated_groups_and_respects_the_floor():
    x, truth = make_blobs(n_samples=3000, n_features=10, centers=5, cluster_std=1.0, center_box=(-30, 30),
                          random_state=1)
    choice = landmarks.choose_n_clusters(x, k_max=10, seed=0)
    assert choice.best == choice.n_clusters == 5 and choice.floor == 1
    assert sorted(choice.silhouette) == list(range(2, 11))
    # the recorded value is scikit-learn's silhouette of the true partition here (K-means finds it)
    from sklearn.metrics import silhouette_score
    assert choice.silhouette[5] == pytest.approx(silhouette_score(x, truth), abs=0.01)
    assert max(choice.silhouette.values()) == choice.silhouette[5]
    raised = landmarks.choose_n_clusters(x, k_max=10, seed=0, floor=7)
    assert (raised.n_clusters, raised.best, raised.floor) == (7, 5, 7)
    assert landmarks.choose_n_clusters(x, k_max=10, seed=0, floor=5000).n_clusters == len(x)  # at most n


def test_choose_n_clusters_subsamples_and_is_seeded():
    x, _ = make_blobs(n_samples=5000, n_features=4, centers=3, cluster_std=0.5, random_state=2)
    a = landmarks.choose_n_clusters(x, k_max=6, seed=3, sample_size=1000, silhouette_size=300)
    b = landmarks.choose_n_clusters(x, k_max=6, seed=3, sample_size=1000, silhouette_size=300)
    assert a == b and a.n_clusters == 3


def test_choose_n_clusters_rejects_bad_input():
    with pytest.raises(InputError, match="at least 3 points"):
        landmarks.choose_n_clusters(np.zeros((2, 3)), k_max=5, seed=0)
    with pytest.raises(InputError, match="k_min"):
        landmarks.choose_n_clusters(np.random.default_rng(0).normal(size=(50, 3)), k_max=5, k_min=1, seed=0)


def test_groups_reached_against_a_dense_reference():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 6))
    centers = rng.normal(size=(9, 6))
    groups = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4])
    nearest_center = ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
    per_group = np.bincount(groups[nearest_center], minlength=5)
    for min_points in (1, 30, 80, 200):
        assert landmarks.groups_reached(x, centers, groups, min_points=min_points) == int((per_group >= min_points).sum())
