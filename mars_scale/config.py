"""Run configuration: frozen dataclasses per stage, read from TOML, overridden by CLI flags.

Example ``mars.toml``::

    [model]
    hidden = [1000]
    n_latent = 100

    [train]
    pretrain_epochs = 25
    finetune_epochs = 30
    batch_size = 256
    lam = 0.2
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mars_scale.errors import ConfigError, positive_int

__all__ = ["ModelConfig", "TrainConfig", "RunConfig", "load_config", "config_to_dict", "config_from_dict"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the MARS autoencoder.

    Parameters
    ----------
    hidden
        Widths of the hidden layers from the input side, e.g. ``(1000,)`` as in MARS. The
        decoder uses them in reverse order. May be empty.
    n_latent
        Dimension of the embedding (MARS: 100).
    dropout
        Dropout probability after each ELU (MARS: 0). ``0`` adds no dropout module.
    decoder_output
        ``"block"`` (default, as the MARS reference: the decoder's last layer is Linear ->
        LayerNorm -> ELU like every other) or ``"linear"`` (a plain linear map). Measured on
        the shipped data, ``"block"`` gives clearly better pretrained embeddings (K-means ARI
        0.83 against 0.59 on mesc batch3; see docs/algorithm.md).

    Raises
    ------
    ConfigError
        If a width is not a positive integer or ``dropout`` is outside ``[0, 1)``.
    """

    hidden: tuple[int, ...] = (1000,)
    n_latent: int = 100
    dropout: float = 0.0
    decoder_output: str = "block"

    def __post_init__(self) -> None:
        if self.decoder_output not in ("block", "linear"):
            raise ConfigError(
                f"ModelConfig.decoder_output must be 'block' or 'linear', got {self.decoder_output!r}."
            )
        if isinstance(self.hidden, (str, bytes)) or not isinstance(self.hidden, Sequence):
            raise ConfigError(
                f"ModelConfig.hidden must be a sequence of positive integers, got {self.hidden!r}."
            )
        hidden = tuple(positive_int(h, name="ModelConfig.hidden") for h in self.hidden)
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "n_latent", positive_int(self.n_latent, name="ModelConfig.n_latent"))
        dropout = self.dropout
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, numbers.Real)
            or not 0.0 <= float(dropout) < 1.0
        ):
            raise ConfigError(f"ModelConfig.dropout must be a number in [0, 1), got {dropout!r}.")
        object.__setattr__(self, "dropout", float(dropout))


@dataclass(frozen=True)
class TrainConfig:
    """Training options (defaults follow the paper's Methods).

    Parameters
    ----------
    pretrain_epochs, finetune_epochs
        Epochs of autoencoder pretraining and of MARS fine-tuning (paper: 25 and 30).
    batch_size
        Cells per minibatch per rank, for each of the annotated and unannotated streams.
    lr
        Adam learning rate of pretraining (paper: 1e-3).
    finetune_lr
        Adam learning rate of the encoder during fine-tuning. The paper uses 1e-3 after 25
        full-batch pretraining steps; after the longer minibatch pretraining done here, 1e-3
        lets the unannotated term collapse similar cell types onto one landmark (mesc batch3:
        ARI 0.97 after initialisation, 0.53 after fine-tuning), so the default is lower. See
        docs/algorithm.md for the measurements.
    landmark_lr
        Adam learning rate of the unannotated landmarks (paper: 1e-3).
    warmup_epochs, warmup_lr
        Epochs (and the encoder's Adam learning rate) of a supervised warm-up between
        pretraining and the landmark initialisation: the annotated term of eq. 3 alone, so that
        K-means initialises the unannotated landmarks on an embedding already shaped by the
        reference annotations rather than on the autoencoder's. Not in the paper. ``None``
        (default, auto): with at least 3 annotated experiments, up to 10 epochs, stopping as
        soon as the annotated experiments agree (each annotated cell is nearest to its own
        type's mean in the other annotated experiments for 99% of cells, or that fraction
        gains less than 0.005 in an epoch); none with 1 or 2 (mesc batch3, 1 annotated
        experiment: ARI 0.55 with 10 epochs, 0.97 without; with 2, a type missing from the
        reference was no longer called new). Past that point the warm-up only memorises
        the reference (CellBench Drop-seq held out after four CEL-seq2 experiments: K-means
        ARI 0.94 after 1 epoch, 0.88 after 10). A number runs exactly that many epochs; 0
        skips it (docs/algorithm.md).
    lam
        Weight of the landmark separation terms (lambda, paper: 0.2).
    annotated_contrast
        Weight of a prototypical-network cross-entropy on the annotated cells (each cell's
        softmax over the negative squared distances to its experiment's landmarks), added to
        the annotated term in the warm-up and fine-tuning. Not in the paper; 0 (default) is the
        paper's objective. It separates close sibling types that the paper's term leaves
        overlapping (docs/algorithm.md).
    tau
        Weight of the unannotated experiment's term in eq. 3. ``None`` (default): the number of
        annotated experiments M, so the new experiment weighs as much as the whole reference;
        ``1.0`` is the paper's setting, where it weighs as much as one annotated experiment.
        With many annotated experiments the paper's weight lets the annotated terms pull a new
        type onto a known one (simulated atlas, 3 annotated experiments: ARI 0.83 with 1.0,
        0.99 with M; docs/algorithm.md).
    pretrain_on
        ``"unannotated"`` (the paper's default) or ``"all"`` experiments.
    kmeans_n_init
        K-means restarts for the unannotated landmarks, best by inertia (paper: 10).
    kmeans_max_points
        Cap on the embeddings kept in memory for K-means (a uniform subsample beyond it).
    min_steps_per_epoch
        Pretraining on a small experiment still takes this many optimiser steps per epoch
        (the loader cycles); 1 gives plain epochs. Measured on mesc batch3, K-means on the
        pretrained embedding reaches ARI 0.97 with 4 full-batch steps per epoch against 0.83
        with 1.
    annotated_cells_per_epoch
        Cap on the annotated cells visited per fine-tuning epoch, by the training stream and by
        the pass that sets the annotated landmarks (a uniform random subset of blocks, new each
        epoch), and per pretraining epoch where pretraining sees the annotated experiments (a
        reference, ``pretrain_on="all"``). ``None`` visits them all. With a large reference atlas and a small new
        experiment this keeps an epoch proportional to the new experiment (docs/scaling.md).
        A run ``--from`` a reference defaults it to the new experiments' size and draws that
        sample once, held in memory for every epoch.
    prune_unused
        Drop unannotated landmarks that no cell chooses at the end of fine-tuning.
    seed
        Seeds the weights, the K-means restarts and the loader order.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    blocks_per_buffer
        Row blocks shuffled together by the loader.
    n_top_genes
        Train on this many highly variable genes, chosen from the raw counts over experiments
        as scanpy's ``highly_variable_genes(flavor="seurat_v3", batch_key="experiment")``
        (:func:`mars_scale.stats.highly_variable_genes`) and recorded in the model, so that
        ``annotate`` reads the same genes. ``None`` (default) keeps every gene that passed
        ingest's filters, as the paper did. On the CEL-seq2/Drop-seq file (20,724 genes),
        2,000 genes train several times faster at the same ARI (docs/benchmarks.md).
    rows_per_block
        Rows per loader block (``None``: the store's rows per chunk). Larger blocks read
        faster and mix less: with 4,096-row blocks and ``blocks_per_buffer=4`` the loader ran
        1.1x to 1.4x faster than at its defaults, with 4.6 to 5 blocks per batch instead of 16
        (docs/benchmarks.md).
    """

    pretrain_epochs: int = 25
    finetune_epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    finetune_lr: float = 1e-4
    landmark_lr: float = 1e-3
    warmup_epochs: int | None = None
    warmup_lr: float = 1e-3
    lam: float = 0.2
    annotated_contrast: float = 0.0
    tau: float | None = None
    pretrain_on: str = "unannotated"
    kmeans_n_init: int = 10
    kmeans_max_points: int = 500_000
    min_steps_per_epoch: int = 4
    annotated_cells_per_epoch: int | None = None
    prune_unused: bool = False
    seed: int = 0
    device: str = "auto"
    blocks_per_buffer: int = 16
    rows_per_block: int | None = None
    n_top_genes: int | None = None

    def __post_init__(self) -> None:
        for name in ("pretrain_epochs", "warmup_epochs", "finetune_epochs", "kmeans_max_points"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_top_genes is not None and self.n_top_genes < 1:
            raise ConfigError(f"train.n_top_genes must be >= 1, got {self.n_top_genes}")
        if self.rows_per_block is not None and self.rows_per_block < 1:
            raise ConfigError(f"train.rows_per_block must be >= 1, got {self.rows_per_block}")
        if self.annotated_cells_per_epoch is not None and self.annotated_cells_per_epoch < 1:
            raise ConfigError(f"train.annotated_cells_per_epoch must be >= 1, got {self.annotated_cells_per_epoch}")
        for name in ("batch_size", "kmeans_n_init", "min_steps_per_epoch", "blocks_per_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.annotated_contrast) and self.annotated_contrast >= 0):
            raise ConfigError(f"train.annotated_contrast must be >= 0, got {self.annotated_contrast}")
        if not 0 <= self.lam < 1:
            raise ConfigError(f"train.lam must be in [0, 1), got {self.lam}")
        if (self.tau is not None and self.tau < 0) or min(self.lr, self.finetune_lr, self.landmark_lr, self.warmup_lr) <= 0:
            raise ConfigError("train.tau must be >= 0 and the learning rates > 0")
        if self.pretrain_on not in ("unannotated", "all"):
            raise ConfigError(f"train.pretrain_on must be 'unannotated' or 'all', got {self.pretrain_on!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs besides the data: the model and the training options."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTIONS = {"model": ModelConfig, "train": TrainConfig}


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) == 1:
            return _check_type(value, options[0], where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_check_type(v, inner, where) for v in value)
    if hint in (int, float, str, bool):
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{where} must be of type {hint.__name__}, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Build a :class:`RunConfig` from nested dicts, refusing unknown keys and wrong types."""
    sections = {}
    for name, values in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(_SECTIONS)})")
        cls = _SECTIONS[name]
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {name}.{key} (known: {', '.join(sorted(known))})"
                )
        kwargs = {k: _check_type(v, hints[k], f"{source}: {name}.{k}") for k, v in values.items()}
        try:
            sections[name] = cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return RunConfig(**sections)


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read a TOML file into a :class:`RunConfig`.

    Raises
    ------
    ConfigError
        If the file is missing, is not TOML, or has an unknown key or a value of the wrong type.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(data, source=str(path))


def config_to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict (lists for tuples), for checkpoints and the store's run record."""
    out = {}
    for name in _SECTIONS:
        section = dataclasses.asdict(getattr(config, name))
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
    return out


def override(config: RunConfig, **train_overrides: Any) -> RunConfig:
    """A copy with the given ``train`` fields replaced (``None`` values are ignored)."""
    changes = {k: v for k, v in train_overrides.items() if v is not None}
    if not changes:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))
