"""Tests for mars_scale.device: device resolution and faiss GPU detection."""

from __future__ import annotations

import logging

import faiss
import pytest
import torch

from mars_scale.device import faiss_gpu_count, resolve_device
from mars_scale.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend four CUDA devices are visible (torch.device objects need no real GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_cpu_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_without_accelerator_is_cpu(no_accelerator):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_raises(no_accelerator, spec):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device(spec)


def test_mps_without_mps_raises(no_accelerator):
    with pytest.raises(ConfigError, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["tpu", "cuda:", "cuda:x", "gpu", ""])
def test_unknown_spec_raises(spec):
    with pytest.raises(ConfigError, match="is not valid"):
        resolve_device(spec)


def test_non_string_spec_raises():
    with pytest.raises(ConfigError, match="device must be a string"):
        resolve_device(0)


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_cuda_without_torchrun(fake_cuda):
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


def test_cuda_index_out_of_range(fake_cuda):
    with pytest.raises(ConfigError, match="only 4 CUDA device"):
        resolve_device("cuda:4")


def test_torchrun_local_rank_picks_gpu(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # explicit index wins
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("value", "message"),
    [("5", "LOCAL_RANK=5 but only 4"), ("x", "not an integer"), ("-1", "negative")],
)
def test_torchrun_bad_local_rank(fake_cuda, monkeypatch, value, message):
    monkeypatch.setenv("LOCAL_RANK", value)
    with pytest.raises(ConfigError, match=message):
        resolve_device("cuda")


@no_cuda
def test_faiss_gpu_count_is_zero_on_cpu_machine():
    assert faiss_gpu_count() == 0


def test_faiss_gpu_count_without_gpu_support(monkeypatch):
    monkeypatch.delattr(faiss, "get_num_gpus", raising=False)
    assert faiss_gpu_count() == 0


def test_faiss_gpu_count_falls_back_when_smoke_test_fails(monkeypatch, caplog):
    def broken_resources():
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", broken_resources, raising=False)
    with caplog.at_level(logging.INFO, logger="mars_scale.device"):
        assert faiss_gpu_count() == 0
    assert "smoke test" in caplog.text
    assert "no kernel image" in caplog.text


def test_faiss_gpu_count_rejects_wrong_answers(monkeypatch, caplog):
    """A GPU index that returns garbage without raising also counts as unusable."""

    class Config:
        device = 0

    class WrongIndex:
        def __init__(self, resources, d, config):
            self.n = 0

        def add(self, x):
            self.n = len(x)

        def search(self, x, k):
            return torch.zeros(len(x), 1).numpy(), torch.zeros(len(x), 1, dtype=torch.int64).numpy()

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", Config, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", WrongIndex, raising=False)
    with caplog.at_level(logging.INFO, logger="mars_scale.device"):
        assert faiss_gpu_count() == 0
    assert "wrong neighbours" in caplog.text


def test_faiss_gpu_count_counts_working_gpus(monkeypatch):
    """With a (fake) working GPU index, faiss's GPU count is returned."""

    class Config:
        device = 0

    class FlatOnCpu:
        def __init__(self, resources, d, config):
            self.index = faiss.IndexFlatL2(d)

        def add(self, x):
            self.index.add(x)

        def search(self, x, k):
            return self.index.search(x, k)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 3, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", Config, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", FlatOnCpu, raising=False)
    assert faiss_gpu_count() == 3
