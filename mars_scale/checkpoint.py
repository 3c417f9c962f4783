"""Plain-dict checkpoints, written atomically by rank 0 and read without unpickling objects.

A checkpoint holds tensors and primitives only: model and optimiser state, landmarks, loader
state, the phase and epoch reached, the resolved configuration, the gene ids and versions.
``torch.load(weights_only=True)`` reads it, so a checkpoint file cannot execute code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mars_scale.errors import CheckpointMismatchError, InputError, TrainingInterrupted
from mars_scale.store import Atlas, atomic_file, spec_compatible

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "check_genes",
    "check_store",
    "StopSignals",
    "restart_point",
    "describe_checkpoint",
    "interrupted_error",
]

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
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
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


def check_store(state: dict[str, Any], store: Atlas, *, source: str | os.PathLike) -> None:
    """Refuse a store that a checkpoint or saved model does not fit.

    The store's genes must be the model's (:func:`check_genes`), and its spec version must read
    like the one the model was trained on (``state["store_spec"]``; same major version, and
    same minor while the major is 0: :func:`mars_scale.store.spec_compatible`).

    Parameters
    ----------
    state
        A payload read by :func:`load_checkpoint` (or a trained model's state).
    store
        The store the model is to be used with.
    source
        The checkpoint or model file, named in the error.

    Raises
    ------
    CheckpointMismatchError
        If the genes differ, or the store spec is missing from ``state`` or differs from the
        store's.
    """
    saved = state.get("store_spec")
    if saved is None:
        raise CheckpointMismatchError(
            f"{source}: store_spec is missing, so the store it was trained on is unknown "
            "(not written by mars-scale train; train a new model)"
        )
    if not spec_compatible(str(saved), store.spec_version):
        raise CheckpointMismatchError(
            f"{store.path}: store spec {store.spec_version} does not match the store_spec {saved} that "
            f"{source} was trained on (re-ingest the data with the mars-scale release of the model, "
            "or train a new model on this store)"
        )
    check_genes(state["gene_ids"], list(store.gene_ids), where=str(store.path))


# ---------------------------------------------------------------------------------------------
# Stopping on a signal, and run directories that hold an unfinished run


class StopSignals:
    """Turn SIGTERM and SIGINT into a request that training sees between two steps.

    Used as a context manager around training: while inside, the first SIGTERM or SIGINT only
    records the request (:attr:`signum`), so the current step finishes and training can write
    a checkpoint and stop (:func:`interrupted_error`). A second signal of the same kind acts
    as before (the default: the process ends). Outside the main thread (where Python cannot
    install handlers) nothing is installed and :meth:`requested` stays false.

    Under DDP every rank must stop after the same step: :meth:`requested` takes the maximum
    of the ranks' flags with one small all-reduce every ``every`` steps (so a GPU run does not
    wait on the host after every step), and only then answers true.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, the way the signal would have
            previous = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, previous)
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning("%s received: stopping after the current step to write a checkpoint "
                       "(send it again to stop at once)", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self, *, distributed: bool = False, device: torch.device | str = "cpu", step: int = 0,
                  every: int = 16, last: bool = False) -> bool:
        """Whether a signal asked training to stop (on any rank, with ``distributed``).

        With ``distributed`` the ranks compare flags only when ``step % every == 0`` or at the
        ``last`` step of an epoch (every rank calls this after the same steps), and answer
        false in between.
        """
        if not distributed:
            return self.signum is not None
        if step % every and not last:
            return False
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and int(flag.item()):
            self.signum = int(flag.item())
        return self.signum is not None


def interrupted_error(signum: int, path: Path | None, *, phase: str, epoch: int, step: int, steps: int) -> TrainingInterrupted:
    """The one-line error that training raises after a signal, saying how to resume."""
    name = signal.Signals(signum).name
    where = f"{phase} epoch {epoch + 1}, after step {step} of {steps}"
    if path is None:
        return TrainingInterrupted(f"training stopped by {name} at {where}; no run directory, so nothing was saved",
                                   signum=signum)
    return TrainingInterrupted(
        f"training stopped by {name} at {where}; {path} holds that point: run the same command with --resume "
        "to continue (it ends with the same model as an uninterrupted run)",
        signum=signum,
    )


def restart_point(
    run_dir: str | os.PathLike | None,
    *,
    resume: bool,
    overwrite: bool,
    checkpoint_name: str = "checkpoint.pt",
    model_name: str = "model.pt",
) -> tuple[Path, dict[str, Any]] | None:
    """Where a training run in ``run_dir`` starts: the one place that decides between a fresh
    start, a resume and a finished run.

    With ``resume``, the run continues from ``checkpoint_name``; without one yet it starts from
    the beginning (so the same command serves the first start and every ``torchrun
    --max-restarts`` restart), and a finished run (``model_name`` with phase ``done``, the
    checkpoint removed by ``Mars.save``) is returned as it is. Without ``resume`` or
    ``overwrite`` a run directory that holds a model or an unfinished checkpoint is refused.

    Returns
    -------
    tuple or None
        ``(path, payload)`` of the checkpoint or finished model to continue from; ``None`` to
        start from the beginning.

    Raises
    ------
    InputError
        If ``run_dir`` holds a trained model or an unfinished run and neither ``resume`` nor
        ``overwrite`` is set.
    """
    if run_dir is None:
        return None
    checkpoint, model = Path(run_dir) / checkpoint_name, Path(run_dir) / model_name
    if not (resume or overwrite):
        if model.exists():
            raise InputError(f"{run_dir}: already holds a trained model (pass --overwrite to replace it)")
        if checkpoint.exists():
            raise InputError(
                f"{run_dir}: holds an unfinished training run ({describe_checkpoint(checkpoint)}); "
                "pass --resume to continue it or --overwrite to start over"
            )
    if not resume:
        return None
    if checkpoint.exists():
        return checkpoint, load_checkpoint(checkpoint)
    if model.exists():
        payload = load_checkpoint(model)
        if payload.get("phase") == "done":
            logger.info("%s: training already finished; nothing to resume", model)
            return model, payload
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    logger.info("no checkpoint in %s yet: starting from the beginning%s", run_dir,
                f" (attempt {attempt} under torchrun)" if attempt is not None else "")
    return None


def describe_checkpoint(path: Path) -> str:
    """Where a checkpoint stands, e.g. ``checkpoint.pt at pretrain epoch 3``; never raises."""
    try:
        payload = load_checkpoint(path)
        phase, epoch, step = payload.get("phase"), int(payload.get("epoch") or 0), int(payload.get("step") or 0)
    except Exception:  # unreadable: the name is enough
        return path.name
    if step:
        return f"{path.name} at {phase} epoch {epoch + 1}, step {step}"
    return f"{path.name} after {phase} epoch {epoch}" if epoch else f"{path.name} at the start of {phase}"
