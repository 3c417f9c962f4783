"""Rank and world detection, process groups and teardown for ``torchrun`` (or one process).

Single GPU / CPU::

    mars-scale train atlas.zarr --unannotated E -n-clusters K -o run

Several GPUs on one node::

    torchrun --nproc_per_node 8 -m mars_scale train atlas.zarr ...

Several nodes (rendezvous)::

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m mars_scale train atlas.zarr ...
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "shutdown", "all_reduce_sum", "broadcast", "barrier"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank, and whether a group is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, *, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses nccl on CUDA and gloo otherwise. The timeout turns a dead rank into an error in the
    surviving ranks instead of a hang. Outside torchrun (no ``RANK`` and ``MASTER_ADDR`` in the
    environment) this is a single process and no group is created; under torchrun a group is
    created even for one rank, so one GPU runs the same code path as eight.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=timeout_s)
    # device_id binds nccl to this rank's GPU up front (barriers then need no guess).
    dist.init_process_group(
        backend=backend, timeout=timeout, rank=rank, world_size=world,
        device_id=torch.device("cuda", local_rank if device.index is None else device.index)
        if device.type == "cuda" else None,
        store=_attempt_store(world, timeout),
    )
    logger.info("rank %d of %d joined the %s process group", rank, world, backend)
    return DistInfo(rank, world, local_rank, True)


def _attempt_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The agent's store, namespaced by restart, when torchrun's agent hosts it; else ``None``.

    torchrun's static rendezvous (``--master_port``, no ``--rdzv_backend``) keeps one store
    across ``--max-restarts``, so workers of a restart would read the addresses that the dead
    workers published and fail with "connectFullMesh ... Connection refused". Keys under
    ``attempt_<restart count>`` keep each attempt's group apart.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart is None:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"mars_scale/attempt_{restart}", store)


def shutdown(info: DistInfo) -> None:
    """Barrier, then destroy the process group (without the barrier one rank may abort)."""
    if info.initialized and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op for one process); returns it."""
    if info.initialized:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, info: DistInfo, *, src: int = 0) -> torch.Tensor:
    """Copy rank ``src``'s tensor to every rank in place; returns it."""
    if info.initialized:
        dist.broadcast(tensor, src=src)
    return tensor
