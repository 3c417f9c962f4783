"""The MARS objective (paper eq. 1-3) and its minibatch estimate.

Notation: ``z`` embeddings, ``p`` landmarks, ``d`` squared Euclidean distance, ``lam`` the
landmark-separation weight lambda (0.2) and ``tau`` the weight of the unannotated experiment (1).

For an annotated experiment i with N_i cells and K_i landmarks (eq. 1)::

    L_i = 1/N_i sum_j d(z_j, p_{y_j}) - lam / (K_i (K_i - 1)) sum_{k1,k2} d(p_k1, p_k2)

For the unannotated experiment (eq. 2)::

    L_u = 1/N sum_j min_k d(z_j, p_k) - lam / (K (K - 1)) sum_{k1,k2} d(p_k1, p_k2)

and the objective is ``sum_i L_i + tau L_u`` (eq. 3). ``docs/algorithm.md`` explains why the
minibatch form below is an unbiased estimate.
"""

from __future__ import annotations

import torch

__all__ = [
    "squared_distances",
    "reconstruction_loss",
    "landmark_separation",
    "closed_form_landmarks",
    "annotated_weights",
    "annotated_cell_loss",
    "unannotated_cell_loss",
    "unannotated_landmark_loss",
]


def squared_distances(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """All squared Euclidean distances between rows of ``z`` (n, d) and ``p`` (k, d)."""
    return (z.unsqueeze(1) - p.unsqueeze(0)).pow(2).sum(-1)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, *, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The pretraining loss: mean squared error over the rows of ``keep`` (all rows for ``None``).

    Rows outside ``keep`` (the loader's padding rows) count in neither the sum nor the mean.
    """
    if keep is None:
        return torch.nn.functional.mse_loss(recon, target)
    diff = (recon - target)[keep]
    return diff.pow(2).sum() / max(diff.numel(), 1)


def landmark_separation(p: torch.Tensor) -> torch.Tensor:
    """Mean squared distance over ordered pairs of distinct landmarks (0 for one landmark)."""
    k = p.shape[0]
    if k < 2:
        return p.new_zeros(())
    return squared_distances(p, p).sum() / (k * (k - 1))


def closed_form_landmarks(
    class_means: torch.Tensor, previous: torch.Tensor, *, lam: float
) -> torch.Tensor:
    """Annotated landmarks of one experiment in closed form (the reference implementation's).

    ``p_k = (mu_k - lam / (K - 1) * sum_{j != k} p_j) / (1 - lam)`` with the previous
    landmarks in the sum; with one class (or ``lam == 0``) the landmarks are the class means.
    """
    k = class_means.shape[0]
    if k < 2 or lam == 0:
        return class_means.clone()
    others = previous.sum(0, keepdim=True) - previous
    return (class_means - lam / (k - 1) * others) / (1.0 - lam)


def annotated_weights(
    valid: torch.Tensor,
    experiment: torch.Tensor,
    n_labelled: torch.Tensor,
    n_annotated: float,
    n_rows: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The minibatch weights ``w_j = N_A / (B N_{e_j})`` of the annotated cell term.

    Parameters
    ----------
    valid
        Float 0/1 per row of the batch: 1 for a labelled, non-padding cell whose landmark exists.
    experiment
        Experiment code of each row (int64).
    n_labelled
        Labelled cells per experiment code, ``N_e`` (float; 0 for the other experiments).
    n_annotated
        Rows of all the annotated experiments, ``N_A`` (labelled or not): the population the
        batch's ``B`` rows are drawn from.
    n_rows
        ``B``: the rows of the batch that are not loader padding (default: all of its rows).

    Returns
    -------
    torch.Tensor
        ``w`` per row, 0 where ``valid`` is 0. With these, :func:`annotated_cell_loss` is an
        unbiased estimate of the cell part of ``sum_i L_i`` (``docs/algorithm.md``).
    """
    b = valid.shape[0] if n_rows is None else n_rows
    return valid * n_annotated / (b * n_labelled[experiment].clamp(min=1))


def annotated_cell_loss(z: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j w_j d(z_j, p_{y_j})`` with the target landmark of each cell given row-wise.

    With ``w_j = N_A / (B N_{e_j})`` for a batch of B cells drawn uniformly from the N_A
    annotated cells, its expectation is ``sum_i 1/N_i sum_{j in i} d(z_j, p_{y_j})``: the cell
    part of ``sum_i L_i``.
    """
    return (weights * (z - targets).pow(2).sum(-1)).sum()


def annotated_contrast_loss(
    z: torch.Tensor,
    landmarks: torch.Tensor,
    landmark_experiment: torch.Tensor,
    cell_experiment: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``sum_j w_j CE_j``: the prototypical-network cross-entropy of each annotated cell over the
    landmarks of its own experiment, ``-log softmax_k(-d(z_j, p_k))[y_j]`` (not in the paper).

    The paper's annotated term pulls each cell to its own landmark but does not push it away from
    a close sibling's; this term does. Rows with ``w_j = 0`` (unlabelled, padding) add nothing.
    """
    logits = -squared_distances(z, landmarks)
    logits = logits.masked_fill(landmark_experiment.unsqueeze(0) != cell_experiment.unsqueeze(1), float("-inf"))
    own = logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
    ce = torch.logsumexp(logits, dim=1) - own
    return (weights * torch.where(weights > 0, ce, torch.zeros_like(ce))).sum()


def unannotated_cell_loss(
    z: torch.Tensor, landmarks: torch.Tensor, *, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared distance of the batch's cells to their nearest landmark, and the assignment.

    Parameters
    ----------
    z
        Embeddings, shape ``(n, d)``.
    landmarks
        Landmarks, shape ``(k, d)``.
    keep
        Boolean mask of the rows that count, shape ``(n,)``: ``~batch.is_padding`` drops the
        rows the loader repeats to give every rank the same batch count. ``None``: every row.

    Returns
    -------
    loss
        ``mean_j min_k d(z_j, p_k)`` over the kept rows (0 when none is kept, so a batch of
        padding alone adds nothing).
    assign
        Index of the nearest landmark of every row, kept or not, shape ``(n,)``.
    """
    dist = squared_distances(z, landmarks)
    best, assign = dist.min(dim=1)
    if keep is None:
        return best.mean(), assign
    # No boolean indexing: the mask stays on the device (no host sync per step).
    kept = torch.where(keep, best, torch.zeros_like(best)).sum()
    return kept / keep.sum().clamp(min=1).to(best.dtype), assign


def unannotated_landmark_loss(
    z: torch.Tensor, landmarks: torch.Tensor, *, lam: float, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_u`` of eq. 2 on a batch, as a function of the landmarks (``z`` is held fixed).

    Parameters
    ----------
    z, landmarks, keep
        As :func:`unannotated_cell_loss` (``keep``: the rows that count in the cell part).
    lam
        Weight of the landmark separation.

    Returns
    -------
    torch.Tensor
        The scalar loss.
    """
    cell, _ = unannotated_cell_loss(z, landmarks, keep=keep)
    return cell - lam * landmark_separation(landmarks)
