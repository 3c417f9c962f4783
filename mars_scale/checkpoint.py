"""Plain-dict checkpoints, written atomically by rank 0 and read without unpickling objects.

A checkpoint holds tensors and primitives only: model and optimiser state, landmarks, loader
state, the phase and epoch reached, the resolved configuration, the gene ids and versions.
``torch.load(weights_only=True)`` reads it, so a checkpoint file cannot execute code.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mars_scale.errors import CheckpointMismatchError

__all__ = ["save_checkpoint", "load_checkpoint", "check_genes"]

logger = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """Numpy scalars and arrays become Python numbers and tensors (loadable with weights_only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    payload = _plain(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointMismatchError
        If the file is missing or is not a mars-scale checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointMismatchError(f"{path}: no such checkpoint (train first, or check the run directory)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointMismatchError(f"{path}: not a readable mars-scale checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != "mars-scale-checkpoint":
        raise CheckpointMismatchError(f"{path}: not a mars-scale checkpoint")
    return payload


def check_genes(saved: list[str], store_genes: list[str], *, where: str) -> None:
    """Refuse a store whose genes (names and order) differ from the model's.

    Raises
    ------
    CheckpointMismatchError
        Naming how many genes differ and the first difference.
    """
    if list(saved) == list(store_genes):
        return
    if len(saved) != len(store_genes):
        detail = f"the model has {len(saved)} genes, the store {len(store_genes)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(saved, store_genes)) if a != b)
        detail = f"gene {i} is {saved[i]!r} in the model but {store_genes[i]!r} in the store"
    raise CheckpointMismatchError(
        f"{where}: the store's genes do not match the model's ({detail}); "
        "ingest the data with the model's gene list or train a new model"
    )
