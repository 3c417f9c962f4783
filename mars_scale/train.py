"""MARS training: autoencoder pretraining, landmark initialisation, fine-tuning.

One function, :func:`fit`, reads top to bottom:

1. pretrain the autoencoder (MSE on the scaled input) on the unannotated experiment;
2. initialise: unannotated landmarks by K-means on the embedded unannotated cells, annotated
   landmarks from class means;
3. fine-tune for ``finetune_epochs``; each epoch
   a. recomputes the annotated landmarks in closed form from class means (sums and counts
      all-reduced over ranks),
   b. then, per minibatch pair (annotated, unannotated), takes an Adam step on the unannotated
      landmarks with the encoder fixed, then an Adam step on the encoder with all landmarks fixed;
4. rank 0 writes a checkpoint after every epoch (and at the end), atomically.

Under ``torchrun`` every rank runs the same code on its shard of the data; the encoder is wrapped
in DistributedDataParallel and the landmark gradients are averaged by hand.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mars_scale.checkpoint import StopSignals, interrupted_error, load_checkpoint, save_checkpoint
from mars_scale.config import RunConfig, config_to_dict
from mars_scale.distributed import DistInfo, all_reduce_sum, broadcast
from mars_scale.errors import InputError, TrainingError
from mars_scale.landmarks import kmeans, nearest
from mars_scale.loader import Loader
from mars_scale.losses import (
    annotated_cell_loss,
    annotated_contrast_loss,
    annotated_weights,
    closed_form_landmarks,
    unannotated_cell_loss,
    unannotated_landmark_loss,
)
from mars_scale.nn import Autoencoder
from mars_scale.store import Atlas

__all__ = ["TrainPlan", "plan_training", "fit", "embed", "select_genes", "CHECKPOINT_NAME"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class TrainPlan:
    """What to train on, checked against the store before any work starts."""

    unannotated: str
    annotated: tuple[str, ...]
    n_clusters: int
    n_unannotated: int
    n_labelled: dict[str, int]  # labelled cells per annotated experiment
    pairs: tuple[tuple[int, int], ...]  # (experiment code, cell-type code) with labelled cells
    cell_types: tuple[str, ...]
    experiments: tuple[str, ...]


def plan_training(store: Atlas, *, unannotated: str, n_clusters: int) -> TrainPlan:
    """Validate the experiment choice and K against the store.

    Raises
    ------
    InputError
        For an unknown or empty unannotated experiment, no annotated experiment, or
        ``n_clusters`` outside ``1..n_cells``.
    """
    if unannotated not in store.experiment_ranges:
        raise InputError(
            f"{store.path}: unknown experiment {unannotated!r} "
            f"(known: {', '.join(store.experiments)})"
        )
    a, b = store.experiment_ranges[unannotated]
    if b - a == 0:
        raise InputError(f"{store.path}: experiment {unannotated!r} has no cells")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
        raise InputError(f"--n-clusters must be a positive integer, got {n_clusters!r}")
    if n_clusters > b - a:
        raise InputError(
            f"--n-clusters {n_clusters} is larger than the {b - a} cells of experiment {unannotated!r}"
        )
    labelled: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for e, (name, (lo, hi)) in enumerate(store.experiment_ranges.items()):
        if name == unannotated or hi == lo:
            continue
        codes, _ = store.categorical_codes("cell_type", lo, hi)
        n = int((codes >= 0).sum())
        if n:
            labelled[name] = n
            pairs.extend((e, int(t)) for t in np.unique(codes[codes >= 0]))
    if not labelled:
        raise InputError(
            f"{store.path}: no annotated experiment besides {unannotated!r} "
            "(ingest with --label-key, and at least one other experiment with cell types)"
        )
    return TrainPlan(
        unannotated=unannotated,
        annotated=tuple(labelled),
        n_clusters=int(n_clusters),
        n_unannotated=b - a,
        n_labelled=labelled,
        pairs=tuple(pairs),
        cell_types=tuple(store.cell_types),
        experiments=tuple(store.experiments),
    )


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
    was_training = encoder.training
    encoder.eval()
    seen = 0
    for batch in tqdm(loader, desc=progress, disable=None if (progress and info.is_main) else True, leave=False):
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
                 max_cells: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of the embeddings per (annotated experiment, cell type), over all ranks.

    With ``max_cells``, over a uniform random subset of about that many annotated cells.
    """
    n_exp, n_types = len(plan.experiments), len(plan.cell_types)
    sums = torch.zeros(n_exp * n_types, n_latent, dtype=torch.float64, device=device)
    counts = torch.zeros(n_exp * n_types, dtype=torch.float64, device=device)
    per_rank = None if max_cells is None else max(1, max_cells // info.world_size)
    for _, exp, lab, z in embed(encoder, store, experiments=list(plan.annotated), batch_size=batch_size,
                                device=device, info=info, max_rows=per_rank, seed=seed):
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


def _checkpoint_payload(state: dict[str, Any]) -> dict[str, Any]:
    return {"format": "mars-scale-checkpoint", "format_version": 1, **state}


def fit(store: Atlas, plan: TrainPlan, config: RunConfig, **kwargs) -> dict[str, Any]:
    """Train MARS and return the final checkpoint dict (also written to ``run_dir``).

    SIGTERM or SIGINT during training lets the current step finish, writes a checkpoint of
    that point (mid-epoch) and raises :class:`~mars_scale.errors.TrainingInterrupted`;
    ``resume=True`` continues from it to the same model as an uninterrupted run
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
    resume: bool = False,
    stop_after_epoch: int | None = None,
    signals: StopSignals | None = None,
) -> dict[str, Any]:
    """Train MARS and return the final checkpoint dict (also written to ``run_dir``).

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
    resume
        Continue from ``run_dir/checkpoint.pt``.
    stop_after_epoch
        Stop (as if interrupted) after this many epochs in total, pretraining included; for
        tests of resume.
    signals
        Stop requests (see :func:`fit`); ``None``: never stop early.

    Returns
    -------
    dict
        The checkpoint: ``model`` (state dict), ``unannotated_landmarks`` (K x d),
        ``annotated_landmarks`` (L x d) with ``annotated_pairs`` (experiment and cell-type
        codes), ``history``, ``config``, ``gene_ids`` and provenance.
    """
    tc = config.train
    t0 = time.perf_counter()
    ckpt_path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    saved = None
    if resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise InputError(f"{run_dir}: no checkpoint to resume from ({CHECKPOINT_NAME} missing)")
        saved = load_checkpoint(ckpt_path, map_location=device)
    genes = select_genes(store, tc.n_top_genes, saved=None if saved is None else saved.get("gene_index"))
    mean = store.var_column("mean")
    std = store.var_column("std")
    if genes is not None:
        mean, std = mean[genes], std[genes]
    model = Autoencoder.from_config(
        len(mean), config.model, mean=torch.as_tensor(mean), std=torch.as_tensor(std), rng=_generator(tc.seed, 0)
    ).to(device)
    model.encoder.gene_index = genes  # embed() reads these store columns
    state: dict[str, Any] = {
        "phase": "pretrain",
        "epoch": 0,
        "history": [],
        "unannotated_landmarks": None,
        "annotated_landmarks": None,
        "annotated_pairs": None,
        "landmark_optimizer": None,
        "kmeans_init": None,
        "kmeans_pretrained": None,
        "step": 0,  # steps done in the current epoch when a signal stopped it (else 0)
        "partial": None,  # that epoch's loss sums so far
        "torch_rng": None,
    }
    if saved is not None:
        model.load_state_dict(saved["model"])
        state.update({k: saved.get(k) for k in state})
        state["step"] = state["step"] or 0
        if state["torch_rng"] is not None:  # saved in mid-epoch (dropout draws from it)
            torch.set_rng_state(state["torch_rng"])
            state["torch_rng"] = None
        logger.info("resuming from %s (phase %s, epoch %d, step %d)", ckpt_path, state["phase"], state["epoch"],
                    state["step"])

    def make_optimizer(params, phase: str) -> torch.optim.Adam:
        lr = {"pretrain": tc.lr, "warmup": tc.warmup_lr, "finetune": tc.finetune_lr}[phase]
        opt = adam(params, lr=lr)
        if saved is not None and saved["phase"] == phase and saved.get("optimizer"):
            opt.load_state_dict(saved["optimizer"])
        return opt

    optimizer: torch.optim.Adam | None = None
    warmup_epochs = resolve_warmup_epochs(tc.warmup_epochs, n_annotated=len(plan.annotated))
    warmup_stops_early = tc.warmup_epochs is None  # auto: up to warmup_epochs, until aligned

    # What every checkpoint carries besides the training state (the gene ids are read once).
    provenance = {
        "config": config_to_dict(config),
        "gene_ids": [str(g) for g in store.gene_ids],
        "gene_index": None if genes is None else torch.as_tensor(genes),
        "store_spec": store.spec_version,  # checked against the store on load (checkpoint.check_store)
        "unannotated": plan.unannotated,
        "annotated": list(plan.annotated),
        "experiments": list(plan.experiments),
        "cell_types": list(plan.cell_types),
        "n_clusters": plan.n_clusters,
        "versions": {"torch": str(torch.__version__)},
    }

    def payload() -> dict[str, Any]:
        return _checkpoint_payload({
            **state,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            **provenance,
        })

    def save() -> None:
        if ckpt_path is not None and info.is_main:
            save_checkpoint(ckpt_path, payload())

    def stop_requested(step: int, steps: int) -> bool:
        """After ``step`` of ``steps``; under DDP the ranks compare flags every 16 steps and at the last."""
        return signals is not None and signals.requested(distributed=info.initialized, device=device, step=step,
                                                         last=step == steps)

    def stop_now(phase: str, step: int, steps: int, totals: torch.Tensor, n_seen: int) -> Exception:
        """Checkpoint the middle of an epoch (after ``step`` steps) and return the error to raise."""
        state["step"], state["partial"] = step, {"totals": totals.detach().cpu(), "n_seen": n_seen}
        state["torch_rng"] = torch.get_rng_state()
        save()
        return interrupted_error(signals.signum, ckpt_path, phase=phase, epoch=state["epoch"], step=step, steps=steps)

    def resumed_step() -> tuple[int, torch.Tensor | None, int]:
        """Steps already done in this epoch, with their loss sums (0, None, 0 at an epoch start)."""
        step, partial = state["step"], state["partial"]
        state["step"], state["partial"] = 0, None
        if not step:
            return 0, None, 0
        return step, partial["totals"].to(device), int(partial["n_seen"])

    def epochs_done() -> int:
        ran = sum(h["phase"] == "warmup" for h in state["history"])  # the auto warm-up may stop early
        before = {"pretrain": 0, "warmup": tc.pretrain_epochs, "init": tc.pretrain_epochs + ran,
                  "finetune": tc.pretrain_epochs + ran}
        return before.get(state["phase"], 0) + state["epoch"]
    ddp = (lambda m: DistributedDataParallel(m)) if info.initialized else (lambda m: m)
    bs = tc.batch_size
    main = info.is_main

    def training_loader(experiments: list[str], seed: int) -> Loader:
        return Loader(store, batch_size=bs, experiments=experiments, shuffle=True, seed=seed,
                      rank=info.rank, world_size=info.world_size, genes=genes,
                      blocks_per_buffer=tc.blocks_per_buffer, rows_per_block=tc.rows_per_block)

    # ---- 1. pretraining -------------------------------------------------------------------
    if state["phase"] == "pretrain":
        pre_exps = [plan.unannotated] if tc.pretrain_on == "unannotated" else [plan.unannotated, *plan.annotated]
        loader = training_loader(pre_exps, tc.seed)
        net = ddp(model)
        optimizer = make_optimizer(model.parameters(), "pretrain")
        steps = max(len(loader), tc.min_steps_per_epoch)
        for epoch in range(state["epoch"], tc.pretrain_epochs):
            first, total, n_seen = resumed_step()
            stream = _forever(loader, epoch * 1000, skip=first)
            total, started = (torch.zeros((), device=device) if total is None else total), time.perf_counter()
            for step in tqdm(range(first, steps), desc=f"pretrain {epoch + 1}/{tc.pretrain_epochs}", disable=None if main else True, leave=False):
                batch = next(stream).to(device)
                _, recon = net(batch.x)
                loss = torch.nn.functional.mse_loss(recon, model.scaled_target(batch.x))
                _check_finite(loss, phase="pretraining", epoch=epoch, step=step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()  # summed on the device: no host sync per step
                n_seen += batch.n_rows
                if stop_requested(step + 1, steps):  # after the last step too: the resume then only ends the epoch
                    raise stop_now("pretrain", step + 1, steps, total, n_seen)
            mean_loss, seconds = total.item() / steps, time.perf_counter() - started
            state["epoch"] = epoch + 1
            state["history"].append({"phase": "pretrain", "epoch": epoch + 1, "loss": mean_loss})
            if main:
                logger.info("pretrain epoch %d/%d: mse %.4f (%.1f s, %.0f cells/s per rank)",
                            epoch + 1, tc.pretrain_epochs, mean_loss, seconds, n_seen / seconds)
            save()
            if stop_after_epoch is not None and epochs_done() >= stop_after_epoch:
                return state
        del net
        state["phase"], state["epoch"] = ("warmup" if warmup_epochs else "init"), 0

    encoder = model.encoder
    net = ddp(encoder)
    loader_a = training_loader(list(plan.annotated), tc.seed + 1)
    loader_u = training_loader([plan.unannotated], tc.seed + 2)
    n_labelled = torch.zeros(len(plan.experiments), dtype=torch.float32, device=device)
    for name, n in plan.n_labelled.items():
        n_labelled[plan.experiments.index(name)] = n
    n_rows_a = float(sum(store.experiment_ranges[e][1] - store.experiment_ranges[e][0] for e in plan.annotated))
    tau = float(len(plan.annotated)) if tc.tau is None else tc.tau
    steps_a = len(loader_a)
    if tc.annotated_cells_per_epoch is not None:
        steps_a = min(steps_a, -(-tc.annotated_cells_per_epoch // (bs * info.world_size)))
    annotated = None

    def run_epochs(n_epochs: int, p_u: torch.nn.Parameter | None, landmark_opt) -> bool:
        """Epochs of the MARS objective (eq. 3); without ``p_u`` (the warm-up) only its annotated
        part. Returns True when ``stop_after_epoch`` asks to stop.
        """
        nonlocal annotated
        phase, label = ("warmup", "warm-up") if p_u is None else ("finetune", "fine-tune")
        steps = steps_a if p_u is None else max(steps_a, len(loader_u))

        def class_means(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
            return _class_means(encoder, store, plan, batch_size=max(bs, 1024), device=device, info=info,
                                n_latent=config.model.n_latent, max_cells=tc.annotated_cells_per_epoch,
                                seed=tc.seed + 1000 + epoch + (500 if p_u is None else 0))

        next_means = None  # the warm-up's alignment check computes the next epoch's class means
        for epoch in range(state["epoch"], n_epochs):
            first, totals, n_seen = resumed_step()
            # a. annotated landmarks in closed form from the current class means
            annotated = _AnnotatedLandmarks(plan, device)
            if first:  # resumed in mid-epoch: this epoch's landmarks were saved
                annotated.values = state["annotated_landmarks"].to(device)
            else:
                sums, counts = next_means if next_means is not None else class_means(epoch)
                if state["annotated_landmarks"] is not None and len(state["annotated_landmarks"]) == len(annotated.pairs):
                    annotated.values = state["annotated_landmarks"].to(device)
                annotated.update(sums, counts, lam=tc.lam)
            state["annotated_landmarks"] = annotated.values.detach().cpu()
            state["annotated_pairs"] = annotated.pairs.clone()
            p_a = annotated.values
            # b. alternating steps over minibatch pairs (annotated batches alone in the warm-up)
            stream_a = _forever(loader_a, epoch * 1000 + (500 if p_u is None else 0), skip=first)
            stream_u = _forever(loader_u, epoch * 1000, skip=first) if p_u is not None else None
            totals, started = (torch.zeros(3, device=device) if totals is None else totals), time.perf_counter()
            for step in tqdm(range(first, steps), desc=f"{label} {epoch + 1}/{n_epochs}", disable=None if main else True, leave=False):
                ba = next(stream_a).to(device)
                bu = next(stream_u).to(device) if p_u is not None else None
                z = net(ba.x if bu is None else _cat_rows(ba.x, bu.x))
                za, zu = z[: ba.x.shape[0]], z[ba.x.shape[0]:]
                real_u = ~bu.is_padding if bu is not None else None  # padding rows count in no loss
                if p_u is not None:  # landmarks step, encoder fixed
                    landmark_opt.zero_grad(set_to_none=True)
                    loss_p = unannotated_landmark_loss(zu.detach(), p_u, lam=tc.lam, keep=real_u)
                    loss_p.backward()
                    if info.initialized:
                        all_reduce_sum(p_u.grad, info).div_(info.world_size)
                    landmark_opt.step()
                # encoder step, landmarks fixed
                idx = annotated.lookup[ba.experiment, ba.label.clamp(min=0)]
                valid = ((ba.label >= 0) & (idx >= 0) & ~ba.is_padding).float()
                w = annotated_weights(valid, ba.experiment, n_labelled, n_rows_a)
                loss_a = annotated_cell_loss(za, p_a[idx.clamp(min=0)], w)
                if tc.annotated_contrast > 0:
                    loss_a = loss_a + tc.annotated_contrast * annotated_contrast_loss(
                        za, p_a, annotated.experiment_of, ba.experiment, idx, w)
                loss_u = (unannotated_cell_loss(zu, p_u.detach(), keep=real_u)[0] if p_u is not None
                          else torch.zeros((), device=device))
                loss = loss_a + tau * loss_u
                _check_finite(loss, phase="warm-up" if p_u is None else "fine-tuning", epoch=epoch, step=step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals += torch.stack((loss, loss_a, loss_u)).detach()
                n_seen += ba.n_rows + (bu.n_rows if bu is not None else 0)
                if stop_requested(step + 1, steps):
                    if p_u is not None:
                        state["unannotated_landmarks"] = p_u.detach().cpu().clone()
                        state["landmark_optimizer"] = landmark_opt.state_dict()
                    raise stop_now(phase, step + 1, steps, totals, n_seen)
            totals_mean, seconds = totals.cpu().numpy() / steps, time.perf_counter() - started
            state["epoch"] = epoch + 1
            if p_u is not None:
                state["unannotated_landmarks"] = p_u.detach().cpu().clone()
                state["landmark_optimizer"] = landmark_opt.state_dict()
            record = {"phase": phase, "epoch": epoch + 1, "loss": float(totals_mean[0]),
                      "annotated": float(totals_mean[1]), "unannotated": float(totals_mean[2])}
            aligned = False
            if p_u is None and warmup_stops_early:
                next_means = class_means(epoch + 1)
                record["alignment"] = _alignment(
                    encoder, store, plan, *next_means, batch_size=max(bs, 1024), device=device, info=info,
                    max_cells=tc.annotated_cells_per_epoch, seed=tc.seed + 2000 + epoch)
                aligned = warmup_should_stop(
                    [h["alignment"] for h in state["history"] if h["phase"] == "warmup"] + [record["alignment"]])
            state["history"].append(record)
            if main:
                logger.info("%s epoch %d/%d: loss %.4f (annotated %.4f, unannotated %.4f; %.1f s, %.0f cells/s per rank)%s",
                            label, epoch + 1, n_epochs, *totals_mean, seconds, n_seen / seconds,
                            f"; annotated experiments aligned {record['alignment']:.4f}" if "alignment" in record else "")
            if aligned:  # saved as done, so a resume goes on to the landmarks
                state["phase"], state["epoch"] = "init", 0
                if main and epoch + 1 < n_epochs:
                    logger.info("warm-up stops after %d of at most %d epochs: the annotated experiments agree",
                                epoch + 1, n_epochs)
            save()
            if stop_after_epoch is not None and epochs_done() >= stop_after_epoch:
                return True
            if aligned:
                break
        return False

    # ---- 2. supervised warm-up (annotated term only), so K-means sees an informed embedding ----
    if state["phase"] == "warmup":
        if state["kmeans_pretrained"] is None:  # the "K-means on the autoencoder" baseline
            _, state["kmeans_pretrained"] = _init_unannotated(encoder, store, plan, tc, device, info)
        optimizer = make_optimizer(encoder.parameters(), "warmup")
        if run_epochs(warmup_epochs, None, None):
            return state
        state["phase"], state["epoch"] = "init", 0

    # ---- 3. landmark initialisation ---------------------------------------------------------
    if state["phase"] == "init":
        state["unannotated_landmarks"], state["kmeans_init"] = _init_unannotated(encoder, store, plan, tc, device, info)
        state["phase"], state["epoch"] = "finetune", 0
        state["landmark_optimizer"] = None

    # ---- 4. fine-tuning -------------------------------------------------------------------
    p_u = torch.nn.Parameter(state["unannotated_landmarks"].to(device).float())
    landmark_opt = torch.optim.Adam([p_u], lr=tc.landmark_lr)
    if state["landmark_optimizer"] is not None:
        landmark_opt.load_state_dict(state["landmark_optimizer"])
    if state["phase"] == "finetune":
        if main and state["epoch"] == 0 and tc.finetune_epochs:
            logger.info("fine-tuning: the loss logged is the cells' squared distance to their landmarks; it can rise "
                        "while clusters improve, as the lambda terms push the landmarks apart and the embedding "
                        "spreads (docs/algorithm.md, \"Why the fine-tuning loss rises\")")
        optimizer = make_optimizer(encoder.parameters(), "finetune")
        if run_epochs(tc.finetune_epochs, p_u, landmark_opt):
            return state

    # ---- 5. final landmarks, usage, pruning ---------------------------------------------------
    if state["phase"] == "finetune":
        if annotated is None or tc.finetune_epochs == 0:
            sums, counts = _class_means(encoder, store, plan, batch_size=max(bs, 1024), device=device, info=info,
                                        n_latent=config.model.n_latent, max_cells=tc.annotated_cells_per_epoch,
                                        seed=tc.seed)
            annotated = _AnnotatedLandmarks(plan, device)
            annotated.values = (sums[annotated.flat] / counts[annotated.flat].clamp(min=1).unsqueeze(1)).float()
            state["annotated_landmarks"] = annotated.values.cpu()
            state["annotated_pairs"] = annotated.pairs.clone()
        usage = _landmark_usage(encoder, store, plan, p_u.detach(), device=device, info=info, batch_size=max(bs, 1024))
        unused = (usage == 0).nonzero().flatten().tolist()
        if unused and main:
            logger.warning("%d of %d unannotated landmarks have no cells: %s%s", len(unused), len(usage),
                           unused, " (pruned)" if tc.prune_unused else " (pass prune_unused to drop them)")
        landmarks = p_u.detach().cpu()
        if tc.prune_unused and unused:
            landmarks = landmarks[usage.cpu() > 0]
            usage = usage[usage > 0]
        state["unannotated_landmarks"] = landmarks
        state["landmark_usage"] = usage.cpu().long()
        state["phase"] = "done"
        state["train_seconds"] = time.perf_counter() - t0
        save()
    return payload()


def _init_unannotated(encoder, store, plan, tc, device, info) -> torch.Tensor:
    """K-means (faiss, k-means++ seeding, best of n_init) on the embedded unannotated cells.

    Returns the centroids and, on rank 0, the K-means assignment of the clustered points
    (``{"index", "cluster"}``): the "K-means on the pretrained embedding" baseline.

    Each rank keeps a uniform subsample of at most ``kmeans_max_points / world_size`` of its
    embeddings; rank 0 clusters the gathered points and broadcasts the centroids.
    """
    cap = max(1, tc.kmeans_max_points // info.world_size)
    index, chunks = [], []
    for idx, _, _, z in embed(encoder, store, experiments=[plan.unannotated], batch_size=max(tc.batch_size, 1024),
                              device=device, info=info, progress="embed for K-means"):
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
    centroids = torch.zeros(plan.n_clusters, points.shape[1])
    init = None
    if info.is_main:
        t = time.perf_counter()
        result = kmeans(points.numpy(), plan.n_clusters, seed=tc.seed, n_init=tc.kmeans_n_init)
        centroids = torch.as_tensor(result.centroids)
        assignment, _ = nearest(points.numpy(), result.centroids)
        init = {"index": index, "cluster": torch.as_tensor(assignment, dtype=torch.long)}
        logger.info("K-means on %d embeddings, k=%d: inertia %.4g in %.1f s", len(points), plan.n_clusters,
                    result.inertia, time.perf_counter() - t)
    centroids = centroids.to(device)
    broadcast(centroids, info)
    return centroids.cpu(), init


@torch.no_grad()
def _landmark_usage(encoder, store, plan, landmarks, *, device, info, batch_size) -> torch.Tensor:
    usage = torch.zeros(len(landmarks), dtype=torch.float64, device=device)
    for _, _, _, z in embed(encoder, store, experiments=[plan.unannotated], batch_size=batch_size, device=device, info=info):
        assign, _ = nearest(z, landmarks.to(z.device))
        usage += torch.bincount(assign, minlength=len(landmarks)).double()
    all_reduce_sum(usage, info)
    return usage
