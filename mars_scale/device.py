"""Compute devices: torch device resolution and faiss GPU detection.

Nothing here is cached at module level. :func:`faiss_gpu_count` runs a small smoke test on every
call, so callers that need the answer repeatedly should keep the result.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from mars_scale.errors import ConfigError

__all__ = ["resolve_device", "faiss_gpu_count"]

logger = logging.getLogger(__name__)

_ALLOWED = '"auto", "cpu", "cuda", "cuda:N" or "mps"'


def _local_rank() -> int | None:
    """Return torchrun's ``LOCAL_RANK`` as an int, or None when it is not set."""
    value = os.environ.get("LOCAL_RANK")
    if value is None or value.strip() == "":
        return None
    try:
        rank = int(value)
    except ValueError:
        raise ConfigError(
            f"LOCAL_RANK={value!r} is not an integer (unset it or launch with torchrun)"
        ) from None
    if rank < 0:
        raise ConfigError(f"LOCAL_RANK={rank} is negative (unset it or launch with torchrun)")
    return rank


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _cuda_device(index: int | None, *, spec: str) -> torch.device:
    """Return a checked CUDA device; ``index=None`` means LOCAL_RANK under torchrun, else default."""
    if not torch.cuda.is_available():
        raise ConfigError(
            f'device "{spec}" was requested but CUDA is not available '
            '(use "cpu" or "auto", or install a CUDA build of torch)'
        )
    count = torch.cuda.device_count()
    if index is None:
        index = _local_rank()
        if index is None:
            return torch.device("cuda")
        if index >= count:
            raise ConfigError(
                f"LOCAL_RANK={index} but only {count} CUDA device(s) are visible "
                "(start at most one process per GPU or check CUDA_VISIBLE_DEVICES)"
            )
        return torch.device("cuda", index)
    if index >= count:
        raise ConfigError(
            f'device "{spec}" does not exist: only {count} CUDA device(s) are visible '
            "(check CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", index)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn a device specification into a :class:`torch.device`.

    Parameters
    ----------
    spec
        ``"auto"`` picks CUDA if available, else MPS if available, else the CPU. ``"cpu"``,
        ``"mps"``, ``"cuda"`` and ``"cuda:N"`` ask for that device. Under ``torchrun`` (the
        ``LOCAL_RANK`` environment variable is set), ``"auto"`` and ``"cuda"`` resolve to
        ``cuda:LOCAL_RANK``; an explicit ``"cuda:N"`` is kept as given. A
        :class:`torch.device` is accepted and checked the same way.

    Returns
    -------
    torch.device
        The resolved device. Without ``LOCAL_RANK``, ``"cuda"`` stays unindexed (torch's
        current CUDA device).

    Raises
    ------
    ConfigError
        If the specification is unknown, names a device that is not available, or
        ``LOCAL_RANK`` is invalid or larger than the number of visible GPUs.
    """
    if isinstance(spec, torch.device):
        text = str(spec)
    elif isinstance(spec, str):
        text = spec.strip().lower()
    else:
        raise ConfigError(f"device must be a string such as {_ALLOWED}, got {type(spec).__name__}")

    if text == "auto":
        if torch.cuda.is_available():
            device = _cuda_device(None, spec=text)
        elif _mps_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    elif text == "cpu":
        device = torch.device("cpu")
    elif text == "mps":
        if not _mps_available():
            raise ConfigError('device "mps" was requested but MPS is not available (use "cpu" or "auto")')
        device = torch.device("mps")
    elif text == "cuda":
        device = _cuda_device(None, spec=text)
    elif text.startswith("cuda:"):
        suffix = text[len("cuda:") :]
        if not suffix.isdigit():
            raise ConfigError(f'device "{spec}" is not valid (use one of {_ALLOWED})')
        device = _cuda_device(int(suffix), spec=text)
    else:
        raise ConfigError(f'device "{spec}" is not valid (use one of {_ALLOWED})')

    logger.debug("device %r resolved to %s", spec, device)
    return device


def _faiss_gpu_smoke_test(faiss_module, gpu: int) -> None:
    """Add and search a few vectors on one GPU; raise RuntimeError if the answer is wrong."""
    d = 8
    base = np.arange(16 * d, dtype=np.float32).reshape(16, d)  # distinct rows: each is its own nearest
    resources = faiss_module.StandardGpuResources()
    config = faiss_module.GpuIndexFlatConfig()
    config.device = gpu
    index = faiss_module.GpuIndexFlatL2(resources, d, config)
    index.add(base)
    _, found = index.search(base, 1)
    if not np.array_equal(np.asarray(found).reshape(-1), np.arange(16)):
        raise RuntimeError("a GPU flat-index search returned wrong neighbours")


def faiss_gpu_count() -> int:
    """Count the GPUs that the installed faiss can actually use.

    faiss's own count is not enough: the ``faiss-gpu-cu12`` wheels report GPUs on an H100 but
    lack sm_90 kernels and fail at the first search. Each reported GPU therefore gets a tiny
    smoke test (add and search on a GPU flat index). Nothing is cached; keep the result.

    Returns
    -------
    int
        0 if faiss has no GPU support, reports no GPUs, or any reported GPU fails the smoke
        test; otherwise the number of GPUs faiss reports. A fallback is logged at INFO when
        torch sees CUDA (work on CUDA then goes to torch instead of faiss).
    """
    import faiss

    # INFO only when it matters: torch has CUDA, so the caller will fall back from faiss to torch.
    level = logging.INFO if torch.cuda.is_available() else logging.DEBUG
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None or not hasattr(faiss, "StandardGpuResources"):
        logger.log(level, "faiss %s has no GPU support; GPU work will use torch", faiss.__version__)
        return 0
    try:
        count = int(get_num_gpus())
    except Exception as exc:  # noqa: BLE001 - any failure here means "no usable faiss GPU"
        logger.log(level, "faiss could not count GPUs (%s); GPU work will use torch", exc)
        return 0
    if count <= 0:
        logger.log(level, "faiss %s reports no GPUs; GPU work will use torch", faiss.__version__)
        return 0
    for gpu in range(count):
        try:
            _faiss_gpu_smoke_test(faiss, gpu)
        except Exception as exc:  # noqa: BLE001 - e.g. missing sm_90 kernels on H100
            logger.info(
                "faiss GPU %d failed a smoke test (%s: %s); GPU work will use torch instead "
                "(faiss GPU wheels may lack kernels for this GPU architecture)",
                gpu,
                type(exc).__name__,
                exc,
            )
            return 0
    logger.debug("faiss can use %d GPU(s)", count)
    return count
