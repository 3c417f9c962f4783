"""The user-facing model: ``Mars(store, unannotated=..., n_clusters=...).train()``.

It wraps the torch modules (:mod:`mars_scale.nn`) and the training loop
(:mod:`mars_scale.train`), in the manner of scvi-tools' model classes: ``save`` writes one run
directory that knows its genes, and ``load`` refuses a store whose genes differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mars_scale.checkpoint import check_store, describe_checkpoint, load_checkpoint, restart_point, save_checkpoint
from mars_scale.config import RunConfig, config_from_dict, override
from mars_scale.device import resolve_device
from mars_scale.distributed import DistInfo
from mars_scale.errors import CheckpointMismatchError, InputError
from mars_scale.nn import Autoencoder
from mars_scale.store import Atlas, as_store, atomic_file
from mars_scale.train import CHECKPOINT_NAME, embed, experiment_names, fit, plan_training

__all__ = ["Mars", "MODEL_NAME"]

logger = logging.getLogger(__name__)

MODEL_NAME = "model.pt"


class Mars:
    """MARS on an atlas store.

    Parameters
    ----------
    store
        An opened store or its path.
    unannotated
        The experiment whose cell types are to be discovered (its labels are never used), or
        several, which then share the unannotated landmarks (one new study of several donors).
    n_clusters
        Number of unannotated landmarks K, or ``"auto"``: chosen after the warm-up as the best
        silhouette of K-means on the new cells' embedding, and at least the number of reference
        types that take 1% of them (recorded as ``n_clusters_choice`` in the model).
    config
        Model and training options (:class:`~mars_scale.config.RunConfig`).
    reference_only
        Train a reference instead (no unannotated experiment): the network after pretraining
        on the annotated experiments and the supervised warm-up, and the annotated landmarks.
    reference
        A reference's run directory (or model file) to start from: its network, genes and
        annotated landmarks are reused, and only the unannotated landmarks and the fine-tuning
        are trained, over the new experiments and a sample of the reference of their size
        (``annotated_cells_per_epoch``, unless configured), drawn once and held in memory; the
        fine-tuning stops once fewer than 0.5% of the new cells change landmark in an epoch
        (``finetune_epochs`` at most; docs/scaling.md). The model section of ``config`` is the
        reference's.

    Examples
    --------
    >>> model = Mars("atlas.zarr", unannotated="donor3", n_clusters=12)  # doctest: +SKIP
    >>> model.train(run_dir="run")  # doctest: +SKIP
    >>> model.save("run")  # doctest: +SKIP
    >>> Mars("atlas.zarr", reference_only=True).train(run_dir="ref").save("ref")  # doctest: +SKIP
    >>> Mars("atlas.zarr", unannotated="donor7", n_clusters=12, reference="ref").train(run_dir="run")  # doctest: +SKIP

    Raises
    ------
    InputError
        For a bad choice of experiments or K, or both or neither of ``unannotated`` and
        ``reference_only``.
    CheckpointMismatchError
        If ``reference`` is not a finished reference, or its genes, store spec, gene selection
        or annotated experiments do not match the store and ``config``.
    """

    def __init__(
        self,
        store: Atlas | str | os.PathLike,
        *,
        unannotated: str | Sequence[str] = (),
        n_clusters: int | str | None = None,
        config: RunConfig | None = None,
        reference_only: bool = False,
        reference: str | os.PathLike | None = None,
    ) -> None:
        self.store = as_store(store)
        self.config = config or RunConfig()
        if reference_only == bool(experiment_names(unannotated)):
            raise InputError("name the unannotated experiment(s) to discover, or train a reference (reference_only), "
                             "one of the two")
        if reference_only and reference is not None:
            raise InputError("a reference is trained from the store alone: reference_only does not take a reference")
        self.reference = None
        annotated = None
        if reference is not None:
            self.reference = _load_reference(reference, self.store, self.config)
            annotated = self.reference[1]["annotated"]
            self.config = _query_config(self.config, self.reference[1])
        self.plan = plan_training(self.store, unannotated=unannotated, n_clusters=n_clusters, annotated=annotated)
        if self.reference is not None and self.config.train.annotated_cells_per_epoch is None:
            # a bounded sample of the reference per epoch: the cost follows the new experiments' size
            self.config = override(self.config, annotated_cells_per_epoch=max(self.plan.n_unannotated,
                                                                              self.config.train.batch_size))
        self.state: dict[str, Any] | None = None
        self._encoder: torch.nn.Module | None = None

    # -- training -----------------------------------------------------------------------------
    def train(
        self,
        *,
        run_dir: str | os.PathLike | None = None,
        resume: bool = False,
        overwrite: bool = False,
        info: DistInfo | None = None,
        stop_after_epoch: int | None = None,
    ) -> "Mars":
        """Pretrain, initialise landmarks and fine-tune (see :func:`mars_scale.train.fit`).

        Parameters
        ----------
        run_dir
            Checkpoints go to ``run_dir/checkpoint.pt`` after every epoch.
        resume
            Continue from the checkpoint in ``run_dir``: start from the beginning if there is
            none yet, and do nothing if the run there has finished
            (:func:`~mars_scale.checkpoint.restart_point`).
        overwrite
            Start over even if ``run_dir`` holds a model or an unfinished run.
        info
            Rank and world size under torchrun (default: one process).
        stop_after_epoch
            Stop after this many epochs in total (for resume tests).

        Raises
        ------
        InputError
            If ``run_dir`` holds a model or an unfinished run and neither ``resume`` nor
            ``overwrite`` is set.
        CheckpointMismatchError
            If the checkpoint to resume from does not fit the store.
        """
        info = info or DistInfo()
        device = resolve_device(self.config.train.device)
        run_path = Path(run_dir) if run_dir is not None else None
        start = restart_point(run_path, resume=resume, overwrite=overwrite, checkpoint_name=CHECKPOINT_NAME,
                              model_name=MODEL_NAME)
        checkpoint = None
        if start is not None:
            source, checkpoint = start
            check_store(checkpoint, self.store, source=source)
            if checkpoint.get("phase") == "done":
                self.state, self._encoder = checkpoint, None
                self.plan = dataclasses.replace(self.plan, n_clusters=checkpoint["n_clusters"])
                return self
        self.state = fit(
            self.store, self.plan, self.config, device=device, info=info, run_dir=run_path,
            checkpoint=checkpoint, reference=self.reference, stop_after_epoch=stop_after_epoch,
        )
        self.plan = dataclasses.replace(self.plan, n_clusters=self.state["n_clusters"])  # K chosen when "auto"
        self._encoder = None
        return self

    @property
    def is_trained(self) -> bool:
        return self.state is not None and self.state.get("phase") == "done"

    def _require_trained(self) -> dict[str, Any]:
        if not self.is_trained:
            raise InputError("the model is not trained yet (call train() or Mars.load())")
        return self.state  # type: ignore[return-value]

    @property
    def encoder(self) -> torch.nn.Module:
        state = self._require_trained()
        if self._encoder is None:
            genes = state.get("gene_index")  # absent from models of all genes and older ones
            g = len(state["gene_ids"]) if genes is None else len(genes)
            model = Autoencoder.from_config(
                g, self.config.model, mean=np.zeros(g), std=np.ones(g), rng=0
            )
            model.load_state_dict(state["model"])
            model.encoder.gene_index = None if genes is None else np.asarray(genes, dtype=np.int64)
            self._encoder = model.encoder.eval()
        return self._encoder

    @property
    def unannotated_landmarks(self) -> np.ndarray | None:
        """K x d; ``None`` for a reference."""
        landmarks = self._require_trained()["unannotated_landmarks"]
        return None if landmarks is None else landmarks.numpy()

    @property
    def annotated_landmarks(self) -> tuple[np.ndarray, list[str], list[str]]:
        """Annotated landmarks with the experiment and cell type of each."""
        state = self._require_trained()
        pairs = state["annotated_pairs"].numpy()
        exps = [state["experiments"][e] for e in pairs[:, 0]]
        types = [state["cell_types"][t] for t in pairs[:, 1]]
        return state["annotated_landmarks"].numpy(), exps, types

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self._require_trained()["history"])

    # -- inference ---------------------------------------------------------------------------
    def embed(
        self,
        store: Atlas | str | os.PathLike | None = None,
        *,
        experiments: list[str] | None = None,
        batch_size: int = 4096,
        device: str = "auto",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed cells in memory: ``(row indices, embeddings)``; for atlases use ``annotate``."""
        store = self._check_store(store)
        dev = resolve_device(device)
        encoder = self.encoder.to(dev)
        idx, zs = [], []
        for index, _, _, z in embed(encoder, store, experiments=experiments, batch_size=batch_size, device=dev, info=DistInfo()):
            idx.append(index.cpu().numpy())
            zs.append(z.cpu().numpy())
        return np.concatenate(idx), np.concatenate(zs)

    def _check_store(self, store: Atlas | str | os.PathLike | None) -> Atlas:
        store = self.store if store is None else as_store(store)
        check_store(self._require_trained(), store, source="the model")
        return store

    # -- persistence -------------------------------------------------------------------------
    def save(self, run_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``run_dir/model.pt`` (weights, landmarks, genes, config) and ``summary.json``.

        Once ``model.pt`` is written, the training checkpoint ``run_dir/checkpoint.pt`` is
        removed: it holds the same weights plus the optimiser states (twice their size), which
        neither ``annotate`` nor ``--resume`` of a finished run needs.

        Raises
        ------
        InputError
            If ``run_dir/model.pt`` exists and ``overwrite`` is false.
        """
        state = self._require_trained()
        run_dir = Path(run_dir)
        target = run_dir / MODEL_NAME
        if target.exists() and not overwrite:
            raise InputError(f"{target}: already exists (pass overwrite=True / --overwrite)")
        keep = {k: v for k, v in state.items() if k not in ("optimizer", "landmark_optimizer")}
        save_checkpoint(target, keep)
        summary = {
            "unannotated": state["unannotated"],
            "annotated": state["annotated"],
            "n_clusters": state["n_clusters"],
            "n_clusters_choice": state.get("n_clusters_choice"),
            "n_landmarks_kept": len(state["unannotated_landmarks"]) if state.get("unannotated_landmarks") is not None else 0,
            "reference": state.get("reference"),
            "landmark_usage": [int(v) for v in (state.get("landmark_usage") if state.get("landmark_usage") is not None else [])],
            "n_genes": len(state["gene_ids"]) if state.get("gene_index") is None else len(state["gene_index"]),
            "history": state["history"],
            "train_seconds": state.get("train_seconds"),
            "config": state["config"],
        }
        with atomic_file(run_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        checkpoint = run_dir / CHECKPOINT_NAME
        if checkpoint.exists():
            size = checkpoint.stat().st_size
            checkpoint.unlink()
            logger.info("removed %s (%.1f MB): %s holds the finished model", checkpoint, size / 1e6, target.name)
        return target

    @classmethod
    def load(cls, run_dir: str | os.PathLike, store: Atlas | str | os.PathLike) -> "Mars":
        """Load a saved model and attach it to ``store``.

        Raises
        ------
        CheckpointMismatchError
            If the file is missing or not a model, or the store's genes or spec version differ
            from the model's (:func:`~mars_scale.checkpoint.check_store`).
        """
        path = Path(run_dir)
        if path.is_dir() and not (path / MODEL_NAME).exists() and (path / CHECKPOINT_NAME).exists():
            raise CheckpointMismatchError(
                f"{path}: training did not finish ({describe_checkpoint(path / CHECKPOINT_NAME)}; "
                "resume it with \"mars-scale train ... --resume\")"
            )
        path = path / MODEL_NAME if path.is_dir() else path
        state = load_checkpoint(path)
        if state.get("phase") != "done":
            raise CheckpointMismatchError(f"{path}: training did not finish (resume it with --resume)")
        store = as_store(store)
        check_store(state, store, source=path)
        config = config_from_dict(state["config"], source=str(path))
        obj = cls.__new__(cls)
        obj.store, obj.config, obj.state, obj._encoder = store, config, state, None
        obj.plan = plan_training(store, unannotated=state["unannotated"], n_clusters=state["n_clusters"],
                                 annotated=state["annotated"])
        obj.reference = None
        return obj

    def __repr__(self) -> str:
        status = "trained" if self.is_trained else "untrained"
        if self.plan.reference_only:
            return f"Mars(reference_only=True, annotated={self.plan.annotated!r}, {status})"
        unannotated = self.plan.unannotated[0] if len(self.plan.unannotated) == 1 else list(self.plan.unannotated)
        return f"Mars(unannotated={unannotated!r}, n_clusters={self.plan.n_clusters}, {status})"


def _load_reference(reference: str | os.PathLike, store: Atlas, config: RunConfig) -> tuple[Path, dict[str, Any]]:
    """A finished reference (``Mars(reference_only=True)``) that fits ``store`` and ``config``.

    Raises
    ------
    CheckpointMismatchError
        If it is missing, unfinished or not a reference, or its genes, store spec or gene
        selection differ.
    """
    path = Path(reference)
    path = path / MODEL_NAME if path.is_dir() else path
    state = load_checkpoint(path)
    if state.get("phase") != "done" or state.get("unannotated") not in ([], (), None) or state.get("n_clusters"):
        raise CheckpointMismatchError(f"{path}: not a finished reference (train one with --reference-only)")
    check_store(state, store, source=path)
    saved = config_from_dict(state["config"], source=str(path))
    if config.train.n_top_genes not in (None, saved.train.n_top_genes):
        raise CheckpointMismatchError(
            f"{path}: the reference was trained on {saved.train.n_top_genes or 'all'} genes, not "
            f"--n-top-genes {config.train.n_top_genes} (leave it out to use the reference's genes)")
    return path, state


def _query_config(config: RunConfig, reference: dict[str, Any]) -> RunConfig:
    """``config`` with the reference's network and gene selection."""
    saved = config_from_dict(reference["config"])
    return override(dataclasses.replace(config, model=saved.model), n_top_genes=saved.train.n_top_genes)

