"""MARS training: autoencoder pretraining, landmark initialisation, fine-tuning.

:func:`fit` runs four phases, each a function with one plain loop over epochs and steps, over one
:class:`TrainState` (which, with the run's provenance, is the checkpoint); a resume starts the
phase the state names:

1. :func:`pretrain`: the autoencoder (MSE on the scaled input) on the unannotated experiment(s);
2. :func:`warmup` (when it has epochs): the annotated term of eq. 3 alone, so that K-means
   initialises the unannotated landmarks on an embedding shaped by the reference annotations;
3. :func:`init_landmarks`: unannotated landmarks by K-means on the embedded unannotated cells;
4. :func:`finetune` for ``finetune_epochs``; each epoch
   a. recomputes the annotated landmarks in closed form from class means (sums and counts
      all-reduced over ranks),
   b. then, per minibatch pair (annotated, unannotated), takes an Adam step on the unannotated
      landmarks with the encoder fixed, then an Adam step on the encoder with all landmarks fixed;
   and ends with the landmarks' usage and pruning.

Rank 0 writes a checkpoint after every epoch (and at the end), atomically. A reference
(``plan.reference_only``) stops after the warm-up, with its annotated landmarks; a run started
from a reference (a query) begins at step 3 with the reference's network, trains on a sample of
the reference held in memory, and stops fine-tuning once fewer than ``QUERY_STABLE`` of its new
cells change landmark in an epoch.

Under ``torchrun`` every rank runs the same code on its shard of the data; the encoder is wrapped
in DistributedDataParallel and the landmark gradients are averaged by hand.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mars_scale.checkpoint import StopSignals, interrupted_error, save_checkpoint
from mars_scale.config import RunConfig, TrainConfig, config_to_dict
from mars_scale.distributed import DistInfo, all_reduce_sum, broadcast
from mars_scale.errors import CheckpointMismatchError, InputError, TrainingError
from mars_scale.landmarks import ClusterCountChoice, choose_n_clusters, groups_reached, kmeans, nearest
from mars_scale.loader import Loader, MemorySample
from mars_scale.losses import (
    annotated_cell_loss,
    annotated_contrast_loss,
    annotated_weights,
    closed_form_landmarks,
    reconstruction_loss,
    unannotated_cell_loss,
    unannotated_landmark_loss,
)
from mars_scale.nn import Autoencoder
from mars_scale.store import Atlas

__all__ = ["TrainPlan", "TrainState", "plan_training", "experiment_names", "fit", "embed", "select_genes", "CHECKPOINT_NAME"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
#: ``n_clusters`` to choose K after the warm-up (:func:`_choose_k`).
AUTO = "auto"


@dataclass(frozen=True)
class TrainPlan:
    """What to train on, checked against the store before any work starts.

    ``unannotated`` holds the experiments whose cell types are discovered (they share the K
    unannotated landmarks); none for a reference (``reference_only``), which trains only what
    depends on the annotated experiments.
    """

    unannotated: tuple[str, ...]
    annotated: tuple[str, ...]
    n_clusters: int | None  # 0 for a reference; None until chosen for "auto"
    n_unannotated: int
    n_labelled: dict[str, int]  # labelled cells per annotated experiment
    pairs: tuple[tuple[int, int], ...]  # (experiment code, cell-type code) with labelled cells
    cell_types: tuple[str, ...]
    experiments: tuple[str, ...]

    @property
    def reference_only(self) -> bool:
        return not self.unannotated


def experiment_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """One experiment name or several (as a checkpoint records them) as a tuple."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def plan_training(store: Atlas, *, unannotated: str | Sequence[str] = (), n_clusters: int | None = None,
                  annotated: Sequence[str] | None = None) -> TrainPlan:
    """Validate the experiment choice and K against the store.

    Parameters
    ----------
    store
        The atlas.
    unannotated
        The experiment (or experiments, sharing the landmarks) whose cell types are discovered;
        none to plan a reference.
    n_clusters
        Number of unannotated landmarks K (not for a reference), or ``"auto"`` to choose it
        after the warm-up: the best silhouette of K-means on the new cells' embedding, at least
        the number of reference types they reach (:func:`_choose_k`).
    annotated
        The annotated experiments to use (a reference's); default: every other experiment with
        labelled cells.

    Raises
    ------
    InputError
        For an unknown, empty or repeated unannotated experiment, an annotated experiment that
        is unknown, unlabelled or also unannotated, no annotated experiment, or ``n_clusters``
        outside ``1..n_cells`` (and not ``"auto"``).
    """
    names = experiment_names(unannotated)
    for name in names:
        if name not in store.experiment_ranges:
            raise InputError(f"{store.path}: unknown experiment {name!r} (known: {', '.join(store.experiments)})")
        if store.experiment_ranges[name][1] == store.experiment_ranges[name][0]:
            raise InputError(f"{store.path}: experiment {name!r} has no cells")
    if len(set(names)) < len(names):
        raise InputError(f"--unannotated names an experiment twice: {', '.join(names)}")
    n_cells = sum(store.experiment_ranges[e][1] - store.experiment_ranges[e][0] for e in names)
    if names and n_clusters != AUTO:
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise InputError(f"--n-clusters must be a positive integer or {AUTO!r}, got {n_clusters!r}")
        if n_clusters > n_cells:
            raise InputError(f"--n-clusters {n_clusters} is larger than the {n_cells} cells of experiment "
                             f"{', '.join(repr(e) for e in names)}")
    labelled, pairs = _labelled_experiments(store, exclude=names, only=annotated)
    if not labelled:
        raise InputError(
            f"{store.path}: no annotated experiment besides {', '.join(repr(e) for e in names) or 'none'} "
            "(ingest with --label-key, and at least one other experiment with cell types)"
        )
    return TrainPlan(
        unannotated=names,
        annotated=tuple(labelled),
        n_clusters=(None if n_clusters == AUTO else int(n_clusters)) if names else 0,
        n_unannotated=n_cells,
        n_labelled=labelled,
        pairs=tuple(pairs),
        cell_types=tuple(store.cell_types),
        experiments=tuple(store.experiments),
    )


def _labelled_experiments(store: Atlas, *, exclude: tuple[str, ...], only: Sequence[str] | None,
                          ) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Labelled cells per annotated experiment, and the (experiment, cell type) codes present."""
    if only is not None:
        for name in only:
            if name in exclude:
                raise InputError(f"experiment {name!r} is annotated in the reference, so it cannot be unannotated")
            if name not in store.experiment_ranges:
                raise InputError(f"{store.path}: the reference's annotated experiment {name!r} is not in this store")
    labelled: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for e, (name, (lo, hi)) in enumerate(store.experiment_ranges.items()):
        if name in exclude or hi == lo or (only is not None and name not in only):
            continue
        codes, _ = store.categorical_codes("cell_type", lo, hi)
        n = int((codes >= 0).sum())
        if n:
            labelled[name] = n
            pairs.extend((e, int(t)) for t in np.unique(codes[codes >= 0]))
    return labelled, pairs


# ---------------------------------------------------------------------------------------------
# small pieces


def _cat_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack two sparse CSR batches row-wise (one forward pass through DDP per step)."""
    crow = torch.cat([a.crow_indices(), b.crow_indices()[1:] + a.crow_indices()[-1]])
    col = torch.cat([a.col_indices(), b.col_indices()])
    val = torch.cat([a.values(), b.values()])
    return torch.sparse_csr_tensor(crow, col, val, size=(a.shape[0] + b.shape[0], a.shape[1]))


def _forever(loader: Loader, start_epoch: int, skip: int = 0) -> Iterator:
    """Cycle a loader through successive epochs (for the shorter of two streams).

    ``skip`` batches are passed over without being read (resuming in mid-epoch).
    """
    epoch = start_epoch + skip // max(len(loader), 1)
    first = skip % max(len(loader), 1)
    while True:
        loader.set_epoch(epoch)
        if first:
            loader.load_state_dict({**loader.state_dict(), "batches_consumed": first})
            first = 0
        yield from loader
        epoch += 1


def _check_finite(loss: torch.Tensor, *, phase: str, epoch: int, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingError(
            f"the {phase} loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
            "the last good checkpoint is kept (lower the learning rate or check the input)"
        )


def _generator(seed: int, *parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0]))
    return g


@torch.no_grad()
def embed(
    encoder: torch.nn.Module,
    store: Atlas,
    *,
    experiments: list[str] | None,
    batch_size: int,
    device: torch.device,
    info: DistInfo,
    progress: str | None = None,
    max_rows: int | None = None,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Embed this rank's share of the cells: yields (index, experiment, label, z).

    In store order; with ``max_rows``, a uniform random subset of about that many rows per rank
    (whole shuffled blocks, seeded by ``seed``). The encoder reads the store genes at
    ``encoder.gene_index`` when it has one (a model trained with ``n_top_genes``), else all.
    """
    loader = Loader(
        store, batch_size=batch_size, experiments=experiments, shuffle=max_rows is not None,
        seed=seed, rank=info.rank, world_size=info.world_size, genes=getattr(encoder, "gene_index", None),
    )
    batches = tqdm(loader, desc=progress, disable=None if (progress and info.is_main) else True, leave=False)
    yield from _embed_batches(encoder, batches, device=device, max_rows=max_rows)


@torch.no_grad()
def _embed_batches(encoder: torch.nn.Module, batches, *, device: torch.device, max_rows: int | None = None,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(index, experiment, label, z) of each batch, padding rows dropped, the encoder in eval mode;
    stops after the batch that reaches ``max_rows`` rows."""
    was_training = encoder.training
    encoder.eval()
    seen = 0
    for batch in batches:
        if max_rows is not None and seen >= max_rows:
            break
        seen += batch.n_rows
        batch = batch.to(device)
        z = encoder(batch.x)
        if batch.n_padding:  # ranks are padded to equal batch counts: drop the repeats
            real = ~batch.is_padding
            yield batch.index[real], batch.experiment[real], batch.label[real], z[real]
        else:
            yield batch.index, batch.experiment, batch.label, z
    encoder.train(was_training)


def _class_means(encoder, store, plan: TrainPlan, *, batch_size, device, info, n_latent,
                 max_cells: int | None = None, seed: int = 0, sample: MemorySample | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of the embeddings per (annotated experiment, cell type), over all ranks.

    With ``max_cells``, over a uniform random subset of about that many annotated cells; with
    ``sample``, over the annotated cells held in it (a query's, :func:`finetune`).
    """
    n_exp, n_types = len(plan.experiments), len(plan.cell_types)
    sums = torch.zeros(n_exp * n_types, n_latent, dtype=torch.float64, device=device)
    counts = torch.zeros(n_exp * n_types, dtype=torch.float64, device=device)
    per_rank = None if max_cells is None else max(1, max_cells // info.world_size)
    if sample is not None:
        embedded = _embed_batches(encoder, sample.batches(batch_size), device=device)
    else:
        embedded = embed(encoder, store, experiments=list(plan.annotated), batch_size=batch_size, device=device,
                         info=info, max_rows=per_rank, seed=seed)
    for _, exp, lab, z in embedded:
        keep = lab >= 0
        key = exp[keep] * n_types + lab[keep]
        sums.index_add_(0, key, z[keep].double())
        counts.index_add_(0, key, torch.ones_like(key, dtype=torch.float64))
    all_reduce_sum(sums, info)
    all_reduce_sum(counts, info)
    return sums, counts


@torch.no_grad()
def _alignment(encoder, store, plan: TrainPlan, sums: torch.Tensor, counts: torch.Tensor, *, batch_size,
               device, info, max_cells: int | None = None, seed: int = 0) -> float:
    """How well the annotated experiments agree: leave-one-experiment-out nearest-class-mean accuracy.

    Each labelled annotated cell is classified by the nearest of the class means computed from
    the *other* annotated experiments (``sums`` and ``counts`` per (experiment, cell type), from
    :func:`_class_means`); cells whose type no other experiment has are not counted. Returns
    the fraction classified right over all ranks, or NaN when no cell can be scored.
    """
    n_exp, n_types = len(plan.experiments), len(plan.cell_types)
    sums = sums.view(n_exp, n_types, -1)
    counts = counts.view(n_exp, n_types)
    others_n = counts.sum(0, keepdim=True) - counts                                  # E x T
    others = (sums.sum(0, keepdim=True) - sums) / others_n.clamp(min=1).unsqueeze(-1)  # E x T x d
    present = others_n > 0
    tally = torch.zeros(2, dtype=torch.float64, device=device)                        # right, scored
    per_rank = None if max_cells is None else max(1, max_cells // info.world_size)
    for _, exp, lab, z in embed(encoder, store, experiments=list(plan.annotated), batch_size=batch_size,
                                device=device, info=info, max_rows=per_rank, seed=seed):
        keep = (lab >= 0) & present[exp, lab.clamp(min=0)]  # labelled, and its type is elsewhere
        if not keep.any():
            continue
        e, y, z = exp[keep], lab[keep], z[keep].double()
        for code in e.unique():  # per experiment: a cells x types distance table, not x dims too
            rows = e == code
            d = torch.cdist(z[rows], others[code], compute_mode="donot_use_mm_for_euclid_dist")
            d = d.masked_fill(~present[code], float("inf"))
            tally[0] += (d.argmin(1) == y[rows]).sum()
            tally[1] += int(rows.sum())
    all_reduce_sum(tally, info)
    return float(tally[0] / tally[1]) if tally[1] > 0 else float("nan")


class _AnnotatedLandmarks:
    """The annotated landmarks: one per (experiment, cell type) present, with a lookup table."""

    def __init__(self, plan: TrainPlan, device: torch.device) -> None:
        n_exp, n_types = len(plan.experiments), len(plan.cell_types)
        self.pairs = torch.tensor(plan.pairs, dtype=torch.long).reshape(-1, 2)  # experiment, type
        lookup = torch.full((n_exp, n_types), -1, dtype=torch.long)
        lookup[self.pairs[:, 0], self.pairs[:, 1]] = torch.arange(len(self.pairs))
        self.lookup = lookup.to(device)
        self.flat = (self.pairs[:, 0] * n_types + self.pairs[:, 1]).to(device)
        self.experiment_of = self.pairs[:, 0].to(device)
        self.values: torch.Tensor | None = None

    def update(self, sums: torch.Tensor, counts: torch.Tensor, *, lam: float) -> None:
        n = counts[self.flat].unsqueeze(1)
        means = (sums[self.flat] / n.clamp(min=1)).float()
        if self.values is not None:  # a class absent from a capped sample keeps its landmark
            means = torch.where(n > 0, means, self.values)
        new = torch.empty_like(means)
        for e in self.pairs[:, 0].unique():
            rows = (self.pairs[:, 0] == e).nonzero().squeeze(1).to(means.device)
            prev = means[rows] if self.values is None else self.values[rows]
            new[rows] = closed_form_landmarks(means[rows], prev, lam=lam)
        self.values = new


# ---------------------------------------------------------------------------------------------
# the training function


AUTO_WARMUP_EPOCHS = 10
AUTO_WARMUP_MIN_EXPERIMENTS = 3
# The auto warm-up stops once the annotated experiments agree (docs/algorithm.md): when the
# leave-one-experiment-out nearest-class-mean accuracy reaches WARMUP_ALIGNED, or, from the
# second epoch on, gains less than WARMUP_MIN_GAIN over the epoch before.
WARMUP_ALIGNED = 0.99
WARMUP_MIN_GAIN = 0.005
# A query (a run from a reference) stops fine-tuning once its clusters are stable: when fewer than
# QUERY_STABLE of the new cells changed their nearest landmark over the last epoch (the first
# epoch against the K-means initialisation; docs/scaling.md).
QUERY_STABLE = 0.005


def warmup_should_stop(alignment: list[float]) -> bool:
    """Whether the auto warm-up stops, given the alignment after each warm-up epoch so far."""
    if not alignment or math.isnan(alignment[-1]):  # nothing scored: run to the cap
        return False
    if alignment[-1] >= WARMUP_ALIGNED:
        return True
    return len(alignment) >= 2 and alignment[-1] - alignment[-2] < WARMUP_MIN_GAIN


def resolve_warmup_epochs(warmup_epochs: int | None, *, n_annotated: int) -> int:
    """The supervised warm-up epochs to run.

    ``warmup_epochs`` when given; for ``None`` (auto), ``AUTO_WARMUP_EPOCHS`` when the reference
    has at least ``AUTO_WARMUP_MIN_EXPERIMENTS`` annotated experiments, none with one or two
    (measurements in docs/algorithm.md). In auto mode this is a cap: the warm-up stops earlier
    once :func:`warmup_should_stop` says the annotated experiments agree.
    """
    if warmup_epochs is not None:
        return warmup_epochs
    return AUTO_WARMUP_EPOCHS if n_annotated >= AUTO_WARMUP_MIN_EXPERIMENTS else 0


def adam(params, *, lr: float) -> torch.optim.Adam:
    """Adam, fused where torch supports it (8x faster steps on a 20,000 x 1,000 first layer);
    the optimiser of every training phase, and of the training benchmark."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr)


def select_genes(store: Atlas, n_top_genes: int | None, *, saved: Any = None) -> np.ndarray | None:
    """Store positions of the genes a model is trained on: ``None`` for all of them.

    With ``n_top_genes``, the highly variable genes of
    :func:`mars_scale.stats.highly_variable_genes`; when resuming, ``saved``, the ones
    recorded in the checkpoint (its ``gene_index``).
    """
    if n_top_genes is None:
        return None
    if n_top_genes >= store.n_genes:
        logger.info("n_top_genes %d: the store has %d genes, all are kept", n_top_genes, store.n_genes)
        return None
    if saved is not None:  # a tensor, on the training device when resuming
        return torch.as_tensor(saved).cpu().numpy().astype(np.int64)
    from mars_scale.stats import highly_variable_genes

    return highly_variable_genes(store, n_top_genes=int(n_top_genes)).index


# ---------------------------------------------------------------------------------------------
# the state of a run (what its checkpoint holds) and what every phase reads

PHASES = ("pretrain", "warmup", "init", "finetune", "done")
CHECKPOINT_FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where a training run stands; with the run's provenance, this is the checkpoint.

    A run goes through the phases ``pretrain -> warmup -> init -> finetune -> done`` (the
    warm-up only when it has epochs); a resume starts the phase named here. ``epoch`` epochs
    of it are done; when a signal stopped the run inside the next one, ``step`` of its steps
    are done, ``partial`` holds their loss sums and ``torch_rng`` the dropout generator.
    ``model`` and ``optimizer`` (the phase's) are the state dicts as last saved.
    """

    phase: str = "pretrain"
    epoch: int = 0
    step: int = 0
    partial: dict[str, Any] | None = None
    torch_rng: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    landmark_optimizer: dict[str, Any] | None = None
    unannotated_landmarks: torch.Tensor | None = None  # K x d
    annotated_landmarks: torch.Tensor | None = None  # L x d
    annotated_pairs: torch.Tensor | None = None  # L x 2: experiment and cell-type codes
    kmeans_init: dict[str, torch.Tensor] | None = None  # K-means that set the unannotated landmarks
    kmeans_pretrained: dict[str, torch.Tensor] | None = None  # K-means before the warm-up (a baseline)
    landmark_usage: torch.Tensor | None = None
    query_assignment: torch.Tensor | None = None  # a query's new cells' nearest landmarks after the last epoch
    train_seconds: float | None = None

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], *, source: Any = "checkpoint") -> "TrainState":
        """The state saved in a checkpoint payload (:func:`~mars_scale.checkpoint.load_checkpoint`).

        Raises
        ------
        CheckpointMismatchError
            If the payload was written in another checkpoint format version.
        """
        version = payload.get("format_version")
        if version != CHECKPOINT_FORMAT_VERSION or payload.get("phase") not in PHASES:
            raise CheckpointMismatchError(
                f"{source}: checkpoint format version {version} (phase {payload.get('phase')!r}) is not the "
                f"version {CHECKPOINT_FORMAT_VERSION} this mars-scale reads; train a new model"
            )
        state = cls()
        for f in fields(cls):
            if payload.get(f.name) is not None:
                setattr(state, f.name, payload[f.name])
        return state

    def advance(self, phase: str) -> None:
        """Start ``phase`` at its first epoch, with a fresh optimiser."""
        self.phase, self.epoch, self.optimizer = phase, 0, None

    def resume_point(self, device: torch.device) -> tuple[int, torch.Tensor | None, int]:
        """Steps already done in this epoch and their loss sums and rows (0, None, 0 at an epoch start)."""
        step, partial = self.step, self.partial
        self.step, self.partial = 0, None
        if not step:
            return 0, None, 0
        return step, partial["totals"].to(device), int(partial["n_seen"])


@dataclass
class _Run:
    """What every phase reads, fixed for the run: data, options, network, rank, checkpoint file."""

    store: Atlas
    plan: TrainPlan
    config: RunConfig
    model: Autoencoder
    genes: np.ndarray | None
    device: torch.device
    info: DistInfo
    ckpt_path: Path | None
    provenance: dict[str, Any]
    signals: StopSignals | None
    stop_after_epoch: int | None
    started: float
    query: bool = False  # started from a reference: the reference side is a sample held in memory
    _encoder_net: torch.nn.Module | None = None
    _sample: MemorySample | None = None

    @property
    def tc(self) -> TrainConfig:
        return self.config.train

    @property
    def tau(self) -> float:
        """Weight of the unannotated term: the number of annotated experiments unless configured."""
        return float(len(self.plan.annotated)) if self.tc.tau is None else self.tc.tau

    @property
    def eval_batch_size(self) -> int:
        return max(self.tc.batch_size, 1024)

    def ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(module) if self.info.initialized else module

    @property
    def encoder_net(self) -> torch.nn.Module:
        """The encoder as trained in the warm-up and fine-tuning (one DDP wrapper for both)."""
        if self._encoder_net is None:
            self._encoder_net = self.ddp(self.model.encoder)
        return self._encoder_net

    def loader(self, experiments: list[str], seed: int) -> Loader:
        tc = self.tc
        return Loader(self.store, batch_size=tc.batch_size, experiments=experiments, shuffle=True, seed=seed,
                      rank=self.info.rank, world_size=self.info.world_size, genes=self.genes,
                      blocks_per_buffer=tc.blocks_per_buffer, rows_per_block=tc.rows_per_block)

    @property
    def reference_sample(self) -> MemorySample | None:
        """A query's sample of the annotated cells, drawn once (on first use) and held in memory.

        ``annotated_cells_per_epoch`` cells (default: as many as the new experiments have, at
        least one batch), split over the ranks; every fine-tuning epoch trains on it and takes
        the class means over it, reading nothing from the store. ``None`` for other runs.
        """
        if self.query and self._sample is None:
            tc = self.tc
            n = tc.annotated_cells_per_epoch or max(self.plan.n_unannotated, tc.batch_size)
            t = time.perf_counter()
            self._sample = MemorySample(self.loader(list(self.plan.annotated), tc.seed + 1),
                                        max(1, n // self.info.world_size), seed=tc.seed + 1)
            if self.info.is_main:
                logger.info("reference sample: %d annotated cells per rank held in memory (%.0f MB) in %.1f s",
                            self._sample.n_rows, self._sample.nbytes / 2**20, time.perf_counter() - t)
        return self._sample

    def annotated_steps(self, loader: Loader, *, plus_cells: int = 0) -> int:
        """Steps of an epoch over the annotated stream (capped by ``annotated_cells_per_epoch``,
        plus ``plus_cells`` when the stream also holds other cells)."""
        cap = self.tc.annotated_cells_per_epoch
        steps = len(loader)
        per_step = self.tc.batch_size * self.info.world_size
        return steps if cap is None else min(steps, -(-(cap + plus_cells) // per_step))

    def make_optimizer(self, state: TrainState, params, *, lr: float) -> torch.optim.Adam:
        """The phase's Adam, with its saved state when the run resumes inside the phase."""
        opt = adam(params, lr=lr)
        if state.optimizer:
            opt.load_state_dict(state.optimizer)
        return opt

    def class_means(self, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _class_means(self.model.encoder, self.store, self.plan, batch_size=self.eval_batch_size,
                            device=self.device, info=self.info, n_latent=self.config.model.n_latent,
                            max_cells=self.tc.annotated_cells_per_epoch, seed=seed, sample=self.reference_sample)

    def progress(self, steps: range, desc: str):
        return tqdm(steps, desc=desc, disable=None if self.info.is_main else True, leave=False)

    def checkpoint(self, state: TrainState) -> dict[str, Any]:
        """The checkpoint payload: the state (with the current weights) and the provenance."""
        state.model = self.model.state_dict()
        return {"format": "mars-scale-checkpoint", "format_version": CHECKPOINT_FORMAT_VERSION,
                **{f.name: getattr(state, f.name) for f in fields(state)}, **self.provenance}

    def save(self, state: TrainState, optimizer: torch.optim.Optimizer | None) -> None:
        """Keep the phase's optimiser state in ``state``; rank 0 writes the checkpoint."""
        state.optimizer = optimizer.state_dict() if optimizer is not None else None
        if self.ckpt_path is not None and self.info.is_main:
            save_checkpoint(self.ckpt_path, self.checkpoint(state))

    def stop_requested(self, step: int, steps: int) -> bool:
        """After ``step`` of ``steps``; under DDP the ranks compare flags every 16 steps and at the last."""
        return self.signals is not None and self.signals.requested(
            distributed=self.info.initialized, device=self.device, step=step, last=step == steps)

    def stop_now(self, state: TrainState, optimizer, *, step: int, steps: int, totals: torch.Tensor,
                 n_seen: int) -> Exception:
        """Checkpoint the middle of an epoch (after ``step`` steps) and return the error to raise."""
        state.step, state.partial = step, {"totals": totals.detach().cpu(), "n_seen": n_seen}
        state.torch_rng = torch.get_rng_state()
        self.save(state, optimizer)
        return interrupted_error(self.signals.signum, self.ckpt_path, phase=state.phase, epoch=state.epoch,
                                 step=step, steps=steps)

    def end_epoch(self, state: TrainState, optimizer, record: dict[str, Any]) -> bool:
        """Record and save a finished epoch; True when ``stop_after_epoch`` epochs are done."""
        state.history.append(record)  # one record per epoch done
        self.save(state, optimizer)
        return self.stop_after_epoch is not None and len(state.history) >= self.stop_after_epoch


def _start(store: Atlas, plan: TrainPlan, config: RunConfig, *, device, info, run_dir, checkpoint, reference,
           stop_after_epoch, signals) -> tuple[_Run, TrainState]:
    """Build the network (with the checkpoint's or the reference's weights) and the state to start from."""
    tc = config.train
    ckpt_path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    start = "resuming from", ckpt_path
    state_reference = None if checkpoint is None else checkpoint.get("reference")  # a query run resumed
    if checkpoint is not None:
        state = TrainState.from_checkpoint(checkpoint, source=ckpt_path)
    elif reference is not None:
        checkpoint, start = _reference_start(plan, *reference), ("starting from the reference", reference[0])
        state = TrainState.from_checkpoint(checkpoint, source=reference[0])
    else:
        state = TrainState()
    genes = select_genes(store, tc.n_top_genes, saved=None if checkpoint is None else checkpoint.get("gene_index"))
    mean, std = store.var_column("mean"), store.var_column("std")
    if genes is not None:
        mean, std = mean[genes], std[genes]
    model = Autoencoder.from_config(
        len(mean), config.model, mean=torch.as_tensor(mean), std=torch.as_tensor(std), rng=_generator(tc.seed, 0)
    ).to(device)
    model.encoder.gene_index = genes  # embed() reads these store columns
    if checkpoint is not None:
        model.load_state_dict(state.model)
        state.model = None
        if state.torch_rng is not None:  # saved in mid-epoch (dropout draws from it)
            torch.set_rng_state(state.torch_rng)
            state.torch_rng = None
        logger.info("%s %s (phase %s, epoch %d, step %d)", *start, state.phase, state.epoch, state.step)
    provenance = {  # what every checkpoint carries besides the state (the gene ids are read once)
        "config": config_to_dict(config),
        "gene_ids": [str(g) for g in store.gene_ids],
        "gene_index": None if genes is None else torch.as_tensor(genes),
        "store_spec": store.spec_version,  # checked against the store on load (checkpoint.check_store)
        "unannotated": plan.unannotated[0] if len(plan.unannotated) == 1 else list(plan.unannotated),
        "annotated": list(plan.annotated),
        "experiments": list(plan.experiments),
        "cell_types": list(plan.cell_types),
        "n_clusters": plan.n_clusters,
        "reference": state_reference if reference is None else str(reference[0]),
        "versions": {"torch": str(torch.__version__)},
    }
    if plan.n_clusters is None and checkpoint is not None and checkpoint.get("n_clusters"):  # "auto", chosen before
        plan = replace(plan, n_clusters=int(checkpoint["n_clusters"]))
        provenance["n_clusters"], provenance["n_clusters_choice"] = plan.n_clusters, checkpoint.get("n_clusters_choice")
    run = _Run(store=store, plan=plan, config=config, model=model, genes=genes, device=device, info=info,
               ckpt_path=ckpt_path, provenance=provenance, signals=signals, stop_after_epoch=stop_after_epoch,
               started=time.perf_counter(), query=reference is not None or bool(state_reference))
    return run, state


def _reference_start(plan: TrainPlan, path: Path, reference: dict[str, Any]) -> dict[str, Any]:
    """The state a run trained ``--from`` a reference starts in: its network and annotated
    landmarks, at the landmark initialisation.

    Raises
    ------
    CheckpointMismatchError
        If the reference's annotated landmarks are not those of ``plan`` (its annotated
        experiments or their cell types changed).
    """
    names = [(reference["experiments"][e], reference["cell_types"][t]) for e, t in reference["annotated_pairs"].tolist()]
    if names != [(plan.experiments[e], plan.cell_types[t]) for e, t in plan.pairs]:
        raise CheckpointMismatchError(
            f"{path}: the reference's annotated cell types differ from the store's annotated experiments "
            "(train the reference again on this store)")
    return {"format_version": CHECKPOINT_FORMAT_VERSION, "phase": "init", "model": reference["model"],
            "gene_index": reference.get("gene_index"), "annotated_landmarks": reference["annotated_landmarks"],
            "annotated_pairs": torch.as_tensor(plan.pairs, dtype=torch.long).reshape(-1, 2)}


def fit(store: Atlas, plan: TrainPlan, config: RunConfig, **kwargs) -> dict[str, Any]:
    """Train MARS and return the final checkpoint dict (also written to ``run_dir``).

    SIGTERM or SIGINT during training lets the current step finish, writes a checkpoint of
    that point (mid-epoch) and raises :class:`~mars_scale.errors.TrainingInterrupted`;
    resuming from it (``checkpoint=``) ends with the same model as an uninterrupted run
    (:class:`~mars_scale.checkpoint.StopSignals`). Arguments as :func:`_fit`.
    """
    with StopSignals() as signals:
        return _fit(store, plan, config, signals=signals, **kwargs)


def _fit(
    store: Atlas,
    plan: TrainPlan,
    config: RunConfig,
    *,
    device: torch.device,
    info: DistInfo,
    run_dir: Path | None = None,
    checkpoint: dict[str, Any] | None = None,
    reference: tuple[Path, dict[str, Any]] | None = None,
    stop_after_epoch: int | None = None,
    signals: StopSignals | None = None,
) -> dict[str, Any]:
    """Train MARS and return the final checkpoint dict (also written to ``run_dir``).

    The phases run in order from the one the state names, each a plain loop over epochs and
    steps: :func:`pretrain`, :func:`warmup`, :func:`init_landmarks`, :func:`finetune`.

    Parameters
    ----------
    store, plan
        The data and the checked choice of experiments (:func:`plan_training`).
    config
        Model and training options.
    device, info
        Where this rank computes, and its place in the process group.
    run_dir
        Where rank 0 writes ``checkpoint.pt`` after every epoch (``None``: no checkpoints).
    checkpoint
        A checkpoint of this run to continue from (read by the caller, which checked it
        against the store: :meth:`mars_scale.model.Mars.train`); ``None`` starts afresh.
    reference
        ``(path, payload)`` of a trained reference (``--reference-only``) to start from when
        there is no checkpoint: its network and annotated landmarks are reused, pretraining and
        warm-up skipped, and the run begins with the unannotated landmarks.
    stop_after_epoch
        Stop (as if interrupted) after this many epochs in total, pretraining included; for
        tests of resume.
    signals
        Stop requests (see :func:`fit`); ``None``: never stop early.

    Returns
    -------
    dict
        The checkpoint: the :class:`TrainState` fields (``model`` state dict,
        ``unannotated_landmarks`` K x d, ``annotated_landmarks`` L x d with ``annotated_pairs``,
        ``history``, ...) and the provenance (``config``, ``gene_ids``, ``store_spec``, ...).
    """
    run, state = _start(store, plan, config, device=device, info=info, run_dir=run_dir, checkpoint=checkpoint,
                        reference=reference, stop_after_epoch=stop_after_epoch, signals=signals)
    phases = {"pretrain": pretrain, "warmup": warmup, "init": init_landmarks, "finetune": finetune}
    while state.phase != "done":
        if phases[state.phase](run, state):  # stop_after_epoch reached (saved)
            break
    return run.checkpoint(state)


# ---------------------------------------------------------------------------------------------
# the phases: each runs the epochs left of it, saves after every epoch and moves the state on


def pretrain(run: _Run, state: TrainState) -> bool:
    """Autoencoder pretraining: MSE between the decoder's output and the scaled input.

    Returns True when ``stop_after_epoch`` asks the run to stop.
    """
    tc, plan, device = run.tc, run.plan, run.device
    with_annotated = tc.pretrain_on == "all" or plan.reference_only
    experiments = [*plan.unannotated, *plan.annotated] if with_annotated else list(plan.unannotated)
    loader = run.loader(experiments, tc.seed)
    net = run.ddp(run.model)
    optimizer = run.make_optimizer(state, run.model.parameters(), lr=tc.lr)
    # a large reference: each epoch a new random share of its blocks, as in the later phases
    steps = run.annotated_steps(loader, plus_cells=plan.n_unannotated) if with_annotated else len(loader)
    steps = max(steps, tc.min_steps_per_epoch)
    for epoch in range(state.epoch, tc.pretrain_epochs):
        first, total, n_seen = state.resume_point(device)
        stream = _forever(loader, epoch * 1000, skip=first)
        total, started = (torch.zeros((), device=device) if total is None else total), time.perf_counter()
        for step in run.progress(range(first, steps), f"pretrain {epoch + 1}/{tc.pretrain_epochs}"):
            batch = next(stream)
            n_padding = batch.n_padding  # read on the host before the copy: no device sync
            batch = batch.to(device)
            _, recon = net(batch.x)
            loss = reconstruction_loss(recon, run.model.scaled_target(batch.x),
                                       keep=~batch.is_padding if n_padding else None)
            _check_finite(loss, phase="pretraining", epoch=epoch, step=step)
            _optimizer_step(optimizer, loss)
            total += loss.detach()  # summed on the device: no host sync per step
            n_seen += batch.n_rows
            if run.stop_requested(step + 1, steps):  # after the last step too: the resume then only ends the epoch
                raise run.stop_now(state, optimizer, step=step + 1, steps=steps, totals=total, n_seen=n_seen)
        mean_loss, seconds = total.item() / steps, time.perf_counter() - started
        state.epoch = epoch + 1
        if run.info.is_main:
            logger.info("pretrain epoch %d/%d: mse %.4f (%.1f s, %.0f cells/s per rank)",
                        epoch + 1, tc.pretrain_epochs, mean_loss, seconds, n_seen / seconds)
        if run.end_epoch(state, optimizer, {"phase": "pretrain", "epoch": epoch + 1, "loss": mean_loss}):
            return True
    n_warmup = resolve_warmup_epochs(tc.warmup_epochs, n_annotated=len(plan.annotated))
    state.advance("warmup" if n_warmup else "init")
    return False


def warmup(run: _Run, state: TrainState) -> bool:
    """Supervised warm-up: the annotated term of eq. 3 alone, so that K-means initialises the
    unannotated landmarks on an embedding shaped by the reference annotations.

    In auto mode (``warmup_epochs=None``) it stops once the annotated experiments agree
    (:func:`warmup_should_stop`). Returns True when ``stop_after_epoch`` asks the run to stop.
    """
    tc, plan, device, net = run.tc, run.plan, run.device, run.encoder_net
    n_epochs = resolve_warmup_epochs(tc.warmup_epochs, n_annotated=len(plan.annotated))
    stops_early = tc.warmup_epochs is None
    if state.kmeans_pretrained is None and not plan.reference_only:  # the "K-means on the autoencoder" baseline
        _, state.kmeans_pretrained, _ = _init_unannotated(run, state)
    optimizer = run.make_optimizer(state, run.model.encoder.parameters(), lr=tc.warmup_lr)
    loader_a = run.loader(list(plan.annotated), tc.seed + 1)
    weights = _AnnotatedWeights(plan, run.store, device=device)
    steps = run.annotated_steps(loader_a)
    next_means = None  # the alignment check computes the next epoch's class means
    for epoch in range(state.epoch, n_epochs):
        first, totals, n_seen = state.resume_point(device)
        if first:  # resumed inside the epoch: its landmarks were saved
            means = None
        else:
            means = next_means if next_means is not None else run.class_means(seed=tc.seed + 1000 + epoch + 500)
        annotated = _epoch_landmarks(run, state, means)
        stream_a = _forever(loader_a, epoch * 1000 + 500, skip=first)
        totals, started = (torch.zeros(3, device=device) if totals is None else totals), time.perf_counter()
        for step in run.progress(range(first, steps), f"warm-up {epoch + 1}/{n_epochs}"):
            ba = next(stream_a).to(device)
            loss_a = _annotated_loss(run, annotated, weights, ba, net(ba.x))
            loss_u = torch.zeros((), device=device)
            loss = loss_a + run.tau * loss_u
            _check_finite(loss, phase="warm-up", epoch=epoch, step=step)
            _optimizer_step(optimizer, loss)
            totals += torch.stack((loss, loss_a, loss_u)).detach()
            n_seen += ba.n_rows
            if run.stop_requested(step + 1, steps):
                raise run.stop_now(state, optimizer, step=step + 1, steps=steps, totals=totals, n_seen=n_seen)
        state.epoch = epoch + 1
        record = _epoch_record("warmup", epoch, totals, steps)
        aligned = False
        if stops_early:
            next_means = run.class_means(seed=tc.seed + 1000 + epoch + 1 + 500)
            record["alignment"] = _alignment(
                run.model.encoder, run.store, plan, *next_means, batch_size=run.eval_batch_size, device=device,
                info=run.info, max_cells=tc.annotated_cells_per_epoch, seed=tc.seed + 2000 + epoch)
            aligned = warmup_should_stop(
                [h["alignment"] for h in state.history if h["phase"] == "warmup"] + [record["alignment"]])
        _log_epoch(run, "warm-up", epoch, n_epochs, record, started, n_seen)
        if aligned:  # saved as done, so a resume goes on to the landmarks
            state.advance("init")
            if run.info.is_main and epoch + 1 < n_epochs:
                logger.info("warm-up stops after %d of at most %d epochs: the annotated experiments agree",
                            epoch + 1, n_epochs)
        if run.end_epoch(state, optimizer, record):
            return True
        if aligned:
            return False
    state.advance("init")
    return False


def init_landmarks(run: _Run, state: TrainState) -> bool:
    """The unannotated landmarks: K-means on the embedded unannotated cells. A reference (no
    unannotated experiment) ends here, with its annotated landmarks."""
    if run.plan.reference_only:
        _finish(run, state, None)
        run.save(state, None)
        return False
    state.unannotated_landmarks, state.kmeans_init, choice = _init_unannotated(run, state)
    if run.plan.n_clusters is None:  # chosen here: the checkpoint and the model record it
        run.plan = replace(run.plan, n_clusters=len(state.unannotated_landmarks))
        run.provenance["n_clusters"] = run.plan.n_clusters
        if choice is not None:
            run.provenance["n_clusters_choice"] = {
                "n_clusters": choice.n_clusters, "best_silhouette": choice.best, "reference_types_reached": choice.floor,
                "silhouette": {str(k): round(v, 4) for k, v in choice.silhouette.items()}}
    state.advance("finetune")
    state.landmark_optimizer = None
    return False


def finetune(run: _Run, state: TrainState) -> bool:
    """MARS fine-tuning (eq. 3), then the final landmarks, their usage and pruning.

    Each epoch sets the annotated landmarks in closed form from the class means, then per
    minibatch pair (annotated, unannotated) takes an Adam step on the unannotated landmarks
    with the encoder fixed and an Adam step on the encoder with all landmarks fixed.
    Returns True when ``stop_after_epoch`` asks the run to stop.
    """
    tc, plan, device, net = run.tc, run.plan, run.device, run.encoder_net
    p_u = torch.nn.Parameter(state.unannotated_landmarks.to(device).float())
    landmark_opt = torch.optim.Adam([p_u], lr=tc.landmark_lr)
    if state.landmark_optimizer is not None:
        landmark_opt.load_state_dict(state.landmark_optimizer)
    if run.info.is_main and state.epoch == 0 and state.step == 0 and tc.finetune_epochs:
        logger.info("fine-tuning: the loss logged is the cells' squared distance to their landmarks; it can rise "
                    "while clusters improve, as the lambda terms push the landmarks apart and the embedding "
                    "spreads (docs/algorithm.md, \"Why the fine-tuning loss rises\")")
    optimizer = run.make_optimizer(state, run.model.encoder.parameters(), lr=tc.finetune_lr)
    sample = run.reference_sample
    loader_a = run.loader(list(plan.annotated), tc.seed + 1) if sample is None else None
    loader_u = run.loader(list(plan.unannotated), tc.seed + 2)
    weights = _AnnotatedWeights(plan, run.store, device=device)
    steps = max(len(sample) if sample is not None else run.annotated_steps(loader_a), len(loader_u))

    def keep_landmarks() -> None:
        state.unannotated_landmarks = p_u.detach().cpu().clone()
        state.landmark_optimizer = landmark_opt.state_dict()

    for epoch in range(state.epoch, tc.finetune_epochs):
        if state.history and state.history[-1].get("stable"):  # a query resumed after it stopped
            break
        first, totals, n_seen = state.resume_point(device)
        means = None if first else run.class_means(seed=tc.seed + 1000 + epoch)  # None: resumed, as saved
        annotated = _epoch_landmarks(run, state, means)
        p_a = annotated.values
        stream_a = _forever(loader_a, epoch * 1000, skip=first) if sample is None else sample.stream(epoch, skip=first)
        stream_u = _forever(loader_u, epoch * 1000, skip=first)
        totals, started = (torch.zeros(3, device=device) if totals is None else totals), time.perf_counter()
        for step in run.progress(range(first, steps), f"fine-tune {epoch + 1}/{tc.finetune_epochs}"):
            ba, bu = next(stream_a).to(device), next(stream_u).to(device)
            z = net(_cat_rows(ba.x, bu.x))  # one forward pass through DDP per step
            za, zu = z[: ba.x.shape[0]], z[ba.x.shape[0]:]
            real_u = ~bu.is_padding  # padding rows count in no loss
            # landmarks step, encoder fixed
            landmark_opt.zero_grad(set_to_none=True)
            unannotated_landmark_loss(zu.detach(), p_u, lam=tc.lam, keep=real_u).backward()
            if run.info.initialized:
                all_reduce_sum(p_u.grad, run.info).div_(run.info.world_size)
            landmark_opt.step()
            # encoder step, landmarks fixed
            loss_a = _annotated_loss(run, annotated, weights, ba, za, landmarks=p_a)
            loss_u = unannotated_cell_loss(zu, p_u.detach(), keep=real_u)[0]
            loss = loss_a + run.tau * loss_u
            _check_finite(loss, phase="fine-tuning", epoch=epoch, step=step)
            _optimizer_step(optimizer, loss)
            totals += torch.stack((loss, loss_a, loss_u)).detach()
            n_seen += ba.n_rows + bu.n_rows
            if run.stop_requested(step + 1, steps):
                keep_landmarks()
                raise run.stop_now(state, optimizer, step=step + 1, steps=steps, totals=totals, n_seen=n_seen)
        state.epoch = epoch + 1
        keep_landmarks()
        record = _epoch_record("finetune", epoch, totals, steps)
        if run.query:
            record["changed"], record["stable"] = _query_stability(run, state, p_u.detach())
        _log_epoch(run, "fine-tune", epoch, tc.finetune_epochs, record, started, n_seen)
        if record.get("stable") and run.info.is_main and epoch + 1 < tc.finetune_epochs:
            logger.info("fine-tuning stops after %d of at most %d epochs: %.2f%% of the new cells changed landmark "
                        "in the last one", epoch + 1, tc.finetune_epochs, 100 * record["changed"])
        if run.end_epoch(state, optimizer, record):
            return True
        if record.get("stable"):
            break
    _finish(run, state, p_u.detach())
    run.save(state, optimizer)
    return False


def _finish(run: _Run, state: TrainState, landmarks: torch.Tensor | None) -> None:
    """Final annotated landmarks (plain class means when there was no fine-tuning), the cells per
    unannotated landmark, and pruning of the unused ones (a reference has no ``landmarks``)."""
    if state.annotated_landmarks is None or (run.tc.finetune_epochs == 0 and not run.plan.reference_only):
        state.annotated_landmarks, state.annotated_pairs = _plain_annotated_landmarks(run, seed=run.tc.seed)
    if landmarks is None:  # a reference
        state.phase, state.train_seconds = "done", time.perf_counter() - run.started
        return
    if state.query_assignment is not None:  # a query's, after its last epoch: the final network and landmarks
        assigned = state.query_assignment[state.query_assignment >= 0]
        usage, state.query_assignment = torch.bincount(assigned, minlength=len(landmarks)).double(), None
    else:
        usage = _landmark_usage(run.model.encoder, run.store, run.plan, landmarks, device=run.device, info=run.info,
                                batch_size=run.eval_batch_size)
    unused = (usage == 0).nonzero().flatten().tolist()
    if unused and run.info.is_main:
        logger.warning("%d of %d unannotated landmarks have no cells: %s%s", len(unused), len(usage), unused,
                       " (pruned)" if run.tc.prune_unused else " (pass prune_unused to drop them)")
    landmarks = landmarks.cpu()
    if run.tc.prune_unused and unused:
        landmarks = landmarks[usage.cpu() > 0]
        usage = usage[usage > 0]
    state.unannotated_landmarks = landmarks
    state.landmark_usage = usage.cpu().long()
    state.phase, state.train_seconds = "done", time.perf_counter() - run.started


# ---------------------------------------------------------------------------------------------
# pieces the warm-up and fine-tuning share


class _AnnotatedWeights:
    """The minibatch weights ``N_A / (B N_e)`` of the annotated cell term for a batch
    (:func:`~mars_scale.losses.annotated_weights`): labelled rows whose landmark exists, padding
    rows dropped; ``N_e`` the labelled cells of each annotated experiment, ``N_A`` their rows."""

    def __init__(self, plan: TrainPlan, store: Atlas, *, device: torch.device) -> None:
        ranges = store.experiment_ranges
        self.n_labelled = torch.zeros(len(plan.experiments), dtype=torch.float32, device=device)
        for name, n in plan.n_labelled.items():
            self.n_labelled[plan.experiments.index(name)] = n
        self.n_rows = float(sum(ranges[e][1] - ranges[e][0] for e in plan.annotated))

    def __call__(self, batch, landmark: torch.Tensor) -> torch.Tensor:
        """Weights of the rows of ``batch`` given each row's landmark index (-1: none)."""
        real = ~batch.is_padding  # padding rows weigh 0 and count not in B
        valid = ((batch.label >= 0) & (landmark >= 0) & real).float()
        return annotated_weights(valid, batch.experiment, self.n_labelled, self.n_rows, n_rows=real.sum())


def _annotated_loss(run: _Run, annotated: "_AnnotatedLandmarks", weights: _AnnotatedWeights, batch,
                    z: torch.Tensor, *, landmarks: torch.Tensor | None = None) -> torch.Tensor:
    """The annotated term of a batch: weighted distance to its own landmark, plus the contrast term."""
    p_a = annotated.values if landmarks is None else landmarks
    idx = annotated.lookup[batch.experiment, batch.label.clamp(min=0)]
    w = weights(batch, idx)
    loss = annotated_cell_loss(z, p_a[idx.clamp(min=0)], w)
    if run.tc.annotated_contrast > 0:
        loss = loss + run.tc.annotated_contrast * annotated_contrast_loss(
            z, p_a, annotated.experiment_of, batch.experiment, idx, w)
    return loss


def _epoch_landmarks(run: _Run, state: TrainState, means: tuple[torch.Tensor, torch.Tensor] | None,
                     ) -> "_AnnotatedLandmarks":
    """The epoch's annotated landmarks: in closed form from the class means (sums and counts),
    or, for ``None`` (the run resumes inside the epoch), as saved. Kept in ``state``."""
    annotated = _AnnotatedLandmarks(run.plan, run.device)
    if means is None:
        annotated.values = state.annotated_landmarks.to(run.device)
    else:
        sums, counts = means
        if state.annotated_landmarks is not None and len(state.annotated_landmarks) == len(annotated.pairs):
            annotated.values = state.annotated_landmarks.to(run.device)
        annotated.update(sums, counts, lam=run.tc.lam)
    state.annotated_landmarks = annotated.values.detach().cpu()
    state.annotated_pairs = annotated.pairs.clone()
    return annotated


def _optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _epoch_record(phase: str, epoch: int, totals: torch.Tensor, steps: int) -> dict[str, Any]:
    mean = totals.cpu().numpy() / steps
    return {"phase": phase, "epoch": epoch + 1, "loss": float(mean[0]), "annotated": float(mean[1]),
            "unannotated": float(mean[2])}


def _log_epoch(run: _Run, label: str, epoch: int, n_epochs: int, record: dict[str, Any], started: float,
               n_seen: int) -> None:
    if not run.info.is_main:
        return
    seconds = time.perf_counter() - started
    aligned = f"; annotated experiments aligned {record['alignment']:.4f}" if "alignment" in record else ""
    aligned += f"; {100 * record['changed']:.2f}% of the new cells changed landmark" if "changed" in record else ""
    logger.info("%s epoch %d/%d: loss %.4f (annotated %.4f, unannotated %.4f; %.1f s, %.0f cells/s per rank)%s",
                label, epoch + 1, n_epochs, record["loss"], record["annotated"], record["unannotated"], seconds,
                n_seen / seconds, aligned)



def _init_unannotated(run: _Run, state: TrainState) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None,
                                                           ClusterCountChoice | None]:
    """K-means (faiss, k-means++ seeding, best of n_init) on the embedded unannotated cells.

    Returns the centroids and, on rank 0, the K-means assignment of the clustered points
    (``{"index", "cluster"}``): the "K-means on the pretrained embedding" baseline. Without a
    K (``n_clusters="auto"``) it is chosen here (:func:`_choose_k`); the choice is returned on
    rank 0.

    Each rank keeps a uniform subsample of at most ``kmeans_max_points / world_size`` of its
    embeddings; rank 0 clusters the gathered points and broadcasts the centroids.
    """
    tc, plan, info = run.tc, run.plan, run.info
    reference = _reference_landmarks(run, state) if plan.n_clusters is None else None  # collective: all ranks
    cap = max(1, tc.kmeans_max_points // info.world_size)
    index, chunks = [], []
    for idx, _, _, z in embed(run.model.encoder, run.store, experiments=list(plan.unannotated),
                              batch_size=run.eval_batch_size, device=run.device, info=info,
                              progress="embed for K-means"):
        index.append(idx.cpu())
        chunks.append(z.float().cpu())
    index, points = torch.cat(index), torch.cat(chunks)
    if len(points) > cap:
        keep = torch.randperm(len(points), generator=_generator(tc.seed, 3, info.rank))[:cap]
        index, points = index[keep], points[keep]
    if info.initialized:
        import torch.distributed as dist

        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, (index, points))
        index = torch.cat([g[0] for g in gathered])
        points = torch.cat([g[1] for g in gathered])
    # Store order, whatever the number of ranks: K-means sees the same points in the same order.
    order = torch.argsort(index)
    index, points = index[order], points[order]
    k, choice = torch.tensor([plan.n_clusters or 0], dtype=torch.long), None
    if reference is not None and info.is_main:
        choice = _choose_k(points.numpy(), *reference, seed=tc.seed)
        k[0] = choice.n_clusters
    if reference is not None:
        k = k.to(run.device)
        broadcast(k, info)
    centroids = torch.zeros(int(k[0]), points.shape[1])
    init = None
    if info.is_main:
        t = time.perf_counter()
        result = kmeans(points.numpy(), len(centroids), seed=tc.seed, n_init=tc.kmeans_n_init)
        centroids = torch.as_tensor(result.centroids)
        assignment, _ = nearest(points.numpy(), result.centroids)
        init = {"index": index, "cluster": torch.as_tensor(assignment, dtype=torch.long)}
        logger.info("K-means on %d embeddings, k=%d: inertia %.4g in %.1f s", len(points), len(centroids),
                    result.inertia, time.perf_counter() - t)
    centroids = centroids.to(run.device)
    broadcast(centroids, info)
    return centroids.cpu(), init, choice


def _reference_landmarks(run: _Run, state: TrainState) -> tuple[np.ndarray, np.ndarray]:
    """The annotated landmarks and their cell-type codes: the state's (after a warm-up or from a
    reference), or the class means of the current embedding."""
    if state.annotated_landmarks is not None and state.annotated_pairs is not None:
        return state.annotated_landmarks.float().numpy(), state.annotated_pairs[:, 1].numpy()
    values, pairs = _plain_annotated_landmarks(run, seed=run.tc.seed + 4000)
    return values.numpy(), pairs[:, 1].numpy()


def _plain_annotated_landmarks(run: _Run, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The annotated landmarks as plain class means of the current embedding (on the CPU), and
    their (experiment, cell type) codes."""
    sums, counts = run.class_means(seed=seed)
    annotated = _AnnotatedLandmarks(run.plan, run.device)
    means = sums[annotated.flat] / counts[annotated.flat].clamp(min=1).unsqueeze(1)
    return means.float().cpu(), annotated.pairs.clone()


#: "auto" K: the smallest cluster worth a landmark (annotate's default ``min_cluster_cells``)
#: and the share of the new cells a reference type must take to count as present.
AUTO_K_MIN_CELLS = 10
AUTO_K_MIN_SHARE = 0.01


def _choose_k(points: np.ndarray, landmarks: np.ndarray, types: np.ndarray, *, seed: int) -> ClusterCountChoice:
    """K for ``n_clusters="auto"``: the best silhouette of K-means on the new cells' embedding,
    at least the number of reference types they reach; K up to twice the reference's types
    (at least 10) and no more than one landmark per ``AUTO_K_MIN_CELLS`` cells."""
    n = len(points)
    floor = groups_reached(points, landmarks, types, min_points=max(AUTO_K_MIN_CELLS, math.ceil(AUTO_K_MIN_SHARE * n)))
    k_max = max(2, min(max(10, 2 * len(np.unique(types))), n // AUTO_K_MIN_CELLS, n - 1))
    if n < 3:
        return ClusterCountChoice(n_clusters=max(1, min(floor, n)), best=1, floor=floor, silhouette={})
    return choose_n_clusters(points, k_max=k_max, seed=seed, floor=max(floor, 1))


def _assign_positions(store, plan, index: torch.Tensor) -> torch.Tensor:
    """Positions of the store rows ``index`` among the unannotated cells (their rows in store order)."""
    ranges = sorted(store.experiment_ranges[e] for e in plan.unannotated)
    starts = torch.tensor([a for a, _ in ranges], dtype=torch.long)
    offsets = torch.tensor(np.cumsum([0] + [b - a for a, b in ranges])[:-1], dtype=torch.long)
    index = index.cpu()
    k = torch.searchsorted(starts, index, right=True) - 1
    return index - starts[k] + offsets[k]


@torch.no_grad()
def _assign_new_cells(encoder, store, plan, landmarks, *, device, info, batch_size) -> torch.Tensor:
    """The nearest landmark of every unannotated cell, over all ranks: int64, one entry per
    cell in store order of the unannotated experiments' rows (-1 for none)."""
    out = torch.zeros(plan.n_unannotated, dtype=torch.long, device=device)
    for index, _, _, z in embed(encoder, store, experiments=list(plan.unannotated), batch_size=batch_size,
                                device=device, info=info):
        assign, _ = nearest(z, landmarks.to(z.device))
        out[_assign_positions(store, plan, index).to(device)] = assign.long() + 1
    all_reduce_sum(out, info)  # the ranks hold disjoint cells
    return out.cpu() - 1


def _landmark_usage(encoder, store, plan, landmarks, *, device, info, batch_size) -> torch.Tensor:
    """Unannotated cells per landmark (float64, on ``device``), over all ranks."""
    assign = _assign_new_cells(encoder, store, plan, landmarks, device=device, info=info, batch_size=batch_size)
    return torch.bincount(assign[assign >= 0], minlength=len(landmarks)).double().to(device)


def _query_stability(run: _Run, state: TrainState, landmarks: torch.Tensor) -> tuple[float, bool]:
    """After a query's fine-tuning epoch: the fraction of its new cells whose nearest landmark
    changed over the epoch (the first epoch against the K-means initialisation), and whether
    that is below ``QUERY_STABLE``. Keeps the assignment in ``state``; the same on every rank."""
    assignment = _assign_new_cells(run.model.encoder, run.store, run.plan, landmarks, device=run.device, info=run.info,
                                   batch_size=run.eval_batch_size)
    previous = state.query_assignment
    if previous is None:  # the K-means assignment, held by rank 0, given to every rank
        previous = torch.zeros_like(assignment, device=run.device)
        if run.info.is_main and state.kmeans_init is not None:
            whole = _assign_positions(run.store, run.plan, state.kmeans_init["index"])
            previous[whole.to(run.device)] = state.kmeans_init["cluster"].to(run.device) + 1
        all_reduce_sum(previous, run.info)
        previous = previous.cpu() - 1
    both = (assignment >= 0) & (previous >= 0)
    changed = float((assignment[both] != previous[both]).double().mean()) if both.any() else 1.0
    state.query_assignment = assignment
    return changed, changed < QUERY_STABLE
