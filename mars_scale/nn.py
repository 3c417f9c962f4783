"""Torch building blocks of the MARS network: small modules that know nothing of stores.

The network is MARS's: Linear -> LayerNorm -> ELU blocks, ``n_genes -> 1000 -> 100``, and a
mirror decoder whose last layer is a plain Linear back to the genes. The encoder's first layer
is a :class:`SparseScaledLinear`: it takes sparse log1p-normalised rows and applies scanpy's
scale-and-clip transform folded into the layer (see :mod:`mars_scale.preprocess`), so the
scaled matrix is never built. Its cost grows with the non-zeros of a batch, not with genes.

Parameters are initialised as :class:`torch.nn.Linear` does (uniform in
``±1/sqrt(fan_in)``), from a generator derived from the ``rng`` argument; the global torch
random state is never read or seeded at construction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import skip_init

from mars_scale.config import ModelConfig
from mars_scale.errors import ConfigError, InputError, positive_int
from mars_scale.rng import RNGLike, SeedLike
from mars_scale.preprocess import ScalingParams, fold_scaling

__all__ = [
    "Autoencoder",
    "Decoder",
    "Encoder",
    "FCBlock",
    "MLP",
    "ModelConfig",
    "SparseScaledLinear",
    "dense_scaled_target",
]

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# configuration


def _torch_generator(rng: SeedLike | RNGLike | torch.Generator | None) -> torch.Generator:
    """Normalise ``rng`` (:mod:`mars_scale.rng`; ``None`` draws fresh entropy) to a CPU torch
    generator, once per constructor; a given torch generator is used as is."""
    if isinstance(rng, torch.Generator):
        return rng
    seed = int(np.random.default_rng(rng).integers(2**63 - 1))
    return torch.Generator().manual_seed(seed)


def _init_uniform_(
    tensors: Sequence[torch.Tensor], fan_in: int, generator: torch.Generator
) -> None:
    """Fill ``tensors`` uniformly in ``±1/sqrt(fan_in)``, as ``torch.nn.Linear`` does."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        for tensor in tensors:
            tensor.uniform_(-bound, bound, generator=generator)


def _linear(
    n_in: int, n_out: int, generator: torch.Generator, dtype: torch.dtype | None
) -> nn.Linear:
    """A ``torch.nn.Linear`` initialised from ``generator`` (the global RNG is not used)."""
    layer = skip_init(nn.Linear, n_in, n_out, dtype=dtype)
    _init_uniform_((layer.weight, layer.bias), n_in, generator)
    return layer


# --------------------------------------------------------------------------------------------
# the sparse first layer


class SparseScaledLinear(nn.Module):
    """Linear layer on sparse rows with scanpy's scale-and-clip transform folded in.

    Computes ``clip((x - mean) / std, -max_value, max_value) @ W.T + b`` for each row ``x``
    of log1p-normalised values. For a sparse CSR batch this is evaluated as
    ``(b + c @ W.T) + sum over non-zeros of (clip((x_nz - mean) / std) - c) * W[:, nz]`` with
    ``c = clip(-mean / std)`` (the value of a zero): exact, and in time proportional to the
    batch's non-zeros. The sparse sum is an ``embedding_bag`` over the rows; the weight
    gradient is an ``embedding_bag`` over the columns of the batch, plus the rank-one term of
    ``c`` (see :class:`_SparseScaledMatmul`).

    Parameters
    ----------
    n_genes
        Number of input genes.
    n_out
        Number of outputs.
    mean, std
        Per-gene mean and standard deviation of the log1p-normalised values (``std == 0`` is
        replaced by 1).
    max_value
        Clipping bound of the scaled values, or ``None`` for no clipping.
    rng
        Source of the initial weights.
    dtype
        Floating dtype of parameters and buffers (default: torch's default dtype). Give
        ``torch.float64`` here rather than calling ``.double()`` later, which would keep the
        statistics rounded to float32.

    Attributes
    ----------
    weight : torch.nn.Parameter
        Shape ``(n_genes, n_out)``: the transpose of a ``torch.nn.Linear`` weight, so that a
        gene's row is what ``embedding_bag`` gathers.
    bias : torch.nn.Parameter
        Shape ``(n_out,)``.
    mean, std, zero_value : torch.Tensor
        Buffers of shape ``(n_genes,)``, saved in the state dict.

    Raises
    ------
    ConfigError
        If a size or ``max_value`` is invalid.
    InputError
        If ``mean`` or ``std`` does not have ``n_genes`` finite entries.
    """

    def __init__(
        self,
        n_genes: int,
        n_out: int,
        *,
        mean: npt.ArrayLike | torch.Tensor,
        std: npt.ArrayLike | torch.Tensor,
        max_value: float | None = 10.0,
        rng: SeedLike | RNGLike | torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.n_genes = positive_int(n_genes, name="n_genes")
        self.n_out = positive_int(n_out, name="n_out")
        params = fold_scaling(_to_numpy(mean), _to_numpy(std), max_value=max_value)
        if params.n_genes != self.n_genes:
            raise InputError(
                f"mean and std must have n_genes ({self.n_genes}) entries, got {params.n_genes}."
            )
        self.max_value = params.max_value
        dtype = torch.get_default_dtype() if dtype is None else dtype
        for name in ("mean", "std", "zero_value"):
            values = torch.from_numpy(np.array(getattr(params, name), dtype=np.float64))
            self.register_buffer(name, values.to(dtype))
        self.weight = nn.Parameter(torch.empty(self.n_genes, self.n_out, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.n_out, dtype=dtype))
        _init_uniform_((self.weight, self.bias), self.n_genes, _torch_generator(rng))

    def extra_repr(self) -> str:
        """Sizes and clipping bound, shown by ``repr``."""
        return f"n_genes={self.n_genes}, n_out={self.n_out}, max_value={self.max_value}"

    def forward(self, x: torch.Tensor, *, x_csc: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the scaled linear map.

        Parameters
        ----------
        x
            Log1p-normalised rows, shape ``(n_rows, n_genes)``: a ``torch.sparse_csr_tensor``
            (canonical: no duplicate column within a row), a sparse COO tensor (converted to
            CSR), or a dense tensor (scaled and clipped densely; for tests and small data).
        x_csc
            Optional ``torch.sparse_csc_tensor`` copy of the same sparse batch (e.g. made by
            the loader with scipy). The weight gradient needs the batch's non-zeros ordered
            by column; without this copy the layer sorts the column indices itself, which
            costs about as much as scaling the copy's values, so the copy is not needed for
            speed. It is not compared with ``x`` beyond shape and number of values: it must
            hold the same entries.

        Returns
        -------
        torch.Tensor
            Shape ``(n_rows, n_out)``, in the dtype of the layer's weight. Gradients reach
            ``weight`` and ``bias``; they reach the values of a sparse ``x`` only if those
            require a gradient (then through plain autograd, which is slower).

        Raises
        ------
        InputError
            If ``x`` has the wrong shape or an unsupported layout.
        """
        x = _check_rows(x, self.n_genes)
        if x.layout == torch.strided:
            return self.scale(x) @ self.weight + self.bias
        crow, col = _csr_index(x, _index_dtype(x.values().numel(), self.n_genes))
        per_value = self._scaled_minus_zero(col, x.values())
        if per_value.requires_grad:
            # a gradient for the input values: let autograd differentiate every step
            sparse_part = F.embedding_bag(
                col,
                self.weight,
                crow,
                mode="sum",
                per_sample_weights=per_value,
                include_last_offset=True,
            )
            return sparse_part + torch.addmv(self.bias, self.weight.t(), self.zero_value)
        by_column: tuple[torch.Tensor | None, ...] = (None, None, None)
        if x_csc is not None and torch.is_grad_enabled() and self.weight.requires_grad:
            by_column = self._column_order_from_csc(x_csc, x, col.dtype)
        return _SparseScaledMatmul.apply(
            self.weight,
            self.bias,
            self.zero_value,
            crow,
            col,
            per_value,
            *by_column,
            _gather_block(self.weight),
        )

    def _column_order_from_csc(
        self, x_csc: torch.Tensor, x: torch.Tensor, index_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Column pointer, row indices and sparse-term weights of the CSC copy of ``x``."""
        if not isinstance(x_csc, torch.Tensor) or x_csc.layout != torch.sparse_csc:
            raise InputError("x_csc must be a torch.sparse_csc_tensor copy of the batch.")
        if tuple(x_csc.shape) != tuple(x.shape) or x_csc.values().numel() != x.values().numel():
            raise InputError(
                f"x_csc must hold the same batch as x, got shape {tuple(x_csc.shape)} and "
                f"{x_csc.values().numel()} values for {tuple(x.shape)} and "
                f"{x.values().numel()}."
            )
        ccol = x_csc.ccol_indices().to(index_dtype)
        row = x_csc.row_indices().to(index_dtype)
        col_of_value = torch.repeat_interleave(
            torch.arange(self.n_genes, device=ccol.device, dtype=index_dtype), ccol.diff()
        )
        return ccol, row, self._scaled_minus_zero(col_of_value, x_csc.values())

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Scale and clip values densely: ``clip((x - mean) / std)``.

        Parameters
        ----------
        x
            Dense tensor whose last axis runs over genes.

        Returns
        -------
        torch.Tensor
            The scaled values in the dtype of the layer's weight.
        """
        return _clamp((x.to(self.weight.dtype) - self.mean) / self.std, self.max_value)

    def scaling_params(self) -> ScalingParams:
        """The layer's scaling constants as a :class:`~mars_scale.preprocess.ScalingParams`.

        Returns
        -------
        ScalingParams
            Float64 copies of the buffers and the clipping bound.
        """
        return fold_scaling(
            self.mean.detach().cpu().double().numpy(),
            self.std.detach().cpu().double().numpy(),
            max_value=self.max_value,
        )

    def _scaled_minus_zero(self, col: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``clip((values - mean[col]) / std[col]) - c[col]`` per stored value."""
        values = values.to(self.weight.dtype)
        mean = self.mean.index_select(0, col)
        std = self.std.index_select(0, col)
        zero = self.zero_value.index_select(0, col)
        return _clamp((values - mean) / std, self.max_value) - zero


_GATHER_BLOCK_BYTES = 4 * 2**20
"""Bytes of weight rows per gene block of the forward gather (see :func:`_blocked_embedding_bag`),
well inside a CPU's last-level cache. Measured on one core with a 32 MiB L3 (512 rows x 1,000
non-zeros, 20,000 x 1,000 float32 weight): blocks of 2 to 10 MiB all took 32-35 ms, sort
included, against 53 ms for the unblocked gather."""


def _gather_block(weight: torch.Tensor) -> int | None:
    """Genes per block of the forward gather, or ``None`` where blocking does not pay.

    Only CPU weights larger than a block are split; GPUs were not measured.
    """
    row_bytes = weight.shape[1] * weight.element_size()
    if weight.device.type != "cpu" or weight.shape[0] * row_bytes <= _GATHER_BLOCK_BYTES:
        return None
    return max(1, _GATHER_BLOCK_BYTES // row_bytes)


class _SparseScaledMatmul(torch.autograd.Function):
    """``b + c @ W + S @ W`` for a sparse ``S``, with the weight gradient read by columns.

    ``S`` is given in CSR form by ``crow``, ``col`` and ``per_value`` (the sparse-term weights
    ``clip(scaled) - c``). Forward: one ``embedding_bag`` over the rows (in gene blocks on CPU,
    see :func:`_blocked_embedding_bag`) and one matrix-vector product for the constant term.
    Backward: ``grad_W = S.T @ G + outer(c, G.sum(0))``, the first term an ``embedding_bag``
    over the columns of ``S``, gathering rows of the small ``G`` and writing each row of
    ``grad_W`` once (autograd's own ``embedding_bag`` backward sorts and scatters instead);
    the second added in place. The column order comes from ``ccol``, ``row_csc`` and
    ``value_csc`` when given, else from a stable sort of ``col``. No gradient for ``S``.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx, weight, bias, zero_value, crow, col, per_value, ccol, row_csc, value_csc, block
    ):
        row = None  # of each non-zero; needed by the blocked gather and the column sort only
        if block is not None or ccol is None:
            row = torch.repeat_interleave(
                torch.arange(crow.numel() - 1, device=col.device, dtype=col.dtype), crow.diff()
            )
        ctx.save_for_backward(zero_value, col, row, per_value, ccol, row_csc, value_csc)
        ctx.n_genes = weight.shape[0]
        if block is None:
            out = F.embedding_bag(
                col,
                weight,
                crow,
                mode="sum",
                per_sample_weights=per_value,
                include_last_offset=True,
            )
        else:
            out = _blocked_embedding_bag(weight, col, row, per_value, crow.numel() - 1, block)
        return out.add_(torch.addmv(bias, weight.t(), zero_value))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        zero_value, col, row, per_value, ccol, row_csc, value_csc = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        column_sum = grad_out.sum(0)
        grad_weight = None
        if ctx.needs_input_grad[0]:
            if ccol is None:
                ccol, row_csc, value_csc = _column_order(col, row, per_value, ctx.n_genes)
            grad_weight = F.embedding_bag(
                row_csc,
                grad_out,
                ccol,
                mode="sum",
                per_sample_weights=value_csc.to(grad_out.dtype),
                include_last_offset=True,
            )
            grad_weight.addr_(zero_value.to(grad_out.dtype), column_sum)
        grad_bias = column_sum if ctx.needs_input_grad[1] else None
        return grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _blocked_embedding_bag(
    weight: torch.Tensor,
    col: torch.Tensor,
    row: torch.Tensor,
    per_value: torch.Tensor,
    n_rows: int,
    block: int,
) -> torch.Tensor:
    """``out[r] = sum over non-zeros (r, g) of per_value * weight[g]``, gathered in gene blocks.

    Gathering row after row reads genes from the whole weight in turn: when the weight is
    larger than the cache, nearly every read comes from memory. Here the non-zeros are
    regrouped by (gene block, row) with one stable sort, and the rows of each block, which
    then stay in cache, are gathered by one ``embedding_bag``; the blocks' results are summed.

    Parameters
    ----------
    weight
        Shape ``(n_genes, n_out)``.
    col, row
        Gene and row of each non-zero, in one integer dtype.
    per_value
        Weight of each non-zero.
    n_rows
        Number of rows of the result.
    block
        Genes per block.

    Returns
    -------
    torch.Tensor
        Shape ``(n_rows, n_out)``; rows without non-zeros are zero.
    """
    n_blocks = -(-weight.shape[0] // block)
    key_dtype = torch.int64 if n_blocks * n_rows >= 2**31 else col.dtype
    key = torch.div(col, block, rounding_mode="floor").to(key_dtype) * n_rows + row
    order, offsets = _group(key, n_blocks * n_rows, out_int32=col.dtype == torch.int32)
    col, per_value = col.index_select(0, order), per_value.index_select(0, order)
    bounds = offsets[::n_rows].tolist() if n_rows else [0] * (n_blocks + 1)
    out = torch.zeros(n_rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    for k in range(n_blocks):
        start, stop = bounds[k], bounds[k + 1]
        if start == stop:
            continue
        out += F.embedding_bag(
            col[start:stop],
            weight,
            offsets[k * n_rows : (k + 1) * n_rows + 1] - start,
            mode="sum",
            per_sample_weights=per_value[start:stop],
            include_last_offset=True,
        )
    return out


def _column_order(
    col: torch.Tensor, row: torch.Tensor, per_value: torch.Tensor, n_genes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column pointer, rows and values of the non-zeros ordered by gene (a CSC copy)."""
    order, ccol = _group(col, n_genes, out_int32=col.dtype == torch.int32)
    return ccol, row.index_select(0, order), per_value.index_select(0, order)


def _group(
    key: torch.Tensor, n_groups: int, *, out_int32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of ``key`` (values in ``0..n_groups-1``) and where each group starts in it
    (``n_groups + 1`` offsets)."""
    sorted_key, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(
        sorted_key,
        torch.arange(n_groups + 1, device=key.device, dtype=key.dtype),
        out_int32=out_int32,
    )
    return order, offsets


def dense_scaled_target(
    x: torch.Tensor,
    params: ScalingParams | SparseScaledLinear,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Build the dense scaled rows of a batch on the batch's device (the decoder's target).

    Parameters
    ----------
    x
        Log1p-normalised rows, shape ``(n_rows, n_genes)``: sparse CSR (canonical), sparse COO
        or dense.
    params
        The scaling constants: a :class:`~mars_scale.preprocess.ScalingParams`, or the
        encoder's :class:`SparseScaledLinear` (its buffers are used where they are, which
        saves copying the constants to the device on every batch).
    dtype
        Floating dtype of the result; by default that of ``x`` if floating, else torch's
        default dtype.

    Returns
    -------
    torch.Tensor
        Dense ``clip((x - mean) / std)``, shape ``(n_rows, n_genes)``; zeros give
        ``clip(-mean / std)``.

    Raises
    ------
    InputError
        If ``x`` has the wrong shape or an unsupported layout.
    """
    if dtype is None:
        dtype = x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()
    if isinstance(params, SparseScaledLinear):
        n_genes, max_value = params.n_genes, params.max_value
        mean, std, zero = params.mean, params.std, params.zero_value
    elif isinstance(params, ScalingParams):
        n_genes, max_value = params.n_genes, params.max_value
        mean, std, zero = (np.array(a) for a in (params.mean, params.std, params.zero_value))
    else:
        raise InputError(
            f"params must be ScalingParams or SparseScaledLinear, got {type(params).__name__}."
        )
    mean, std, zero = (torch.as_tensor(t, device=x.device, dtype=dtype) for t in (mean, std, zero))
    x = _check_rows(x, n_genes)
    if x.layout == torch.strided:
        return _clamp((x.to(dtype) - mean) / std, max_value)
    crow, col = _csr_index(x)
    n_rows = x.shape[0]
    out = zero.expand(n_rows, n_genes).clone()
    row = torch.repeat_interleave(
        torch.arange(n_rows, device=x.device, dtype=col.dtype), crow.diff()
    )
    values = x.values().to(dtype)
    out[row, col] = _clamp(
        (values - mean.index_select(0, col)) / std.index_select(0, col), max_value
    )
    return out


def _to_numpy(values: npt.ArrayLike | torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of an array or tensor."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _clamp(values: torch.Tensor, max_value: float | None) -> torch.Tensor:
    """Clip to ``[-max_value, max_value]`` when ``max_value`` is set."""
    if max_value is None:
        return values
    return values.clamp(-max_value, max_value)


def _check_rows(x: torch.Tensor, n_genes: int) -> torch.Tensor:
    """Check a batch's shape and layout; convert sparse COO to CSR."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch tensor, got {type(x).__name__}.")
    if x.layout not in (torch.strided, torch.sparse_csr, torch.sparse_coo):
        raise InputError(f"x must be dense, sparse CSR or sparse COO, got layout {x.layout}.")
    if x.dim() != 2 or x.shape[1] != n_genes:
        raise InputError(f"x must have shape (n_rows, {n_genes}), got {tuple(x.shape)}.")
    if x.layout == torch.sparse_coo:
        x = x.coalesce().to_sparse_csr()
    return x


def _csr_index(
    x: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pointer and column indices of a CSR tensor, in one integer dtype (``dtype`` if given)."""
    crow, col = x.crow_indices(), x.col_indices()
    if dtype is not None:
        return crow.to(dtype), col.to(dtype)
    if crow.dtype != col.dtype:
        crow, col = crow.long(), col.long()
    return crow, col


def _index_dtype(n_values: int, n_genes: int) -> torch.dtype:
    """``int32`` when it can index the values and genes (``embedding_bag`` runs faster with
    it), else ``int64``."""
    return torch.int32 if max(n_values, n_genes) < 2**31 else torch.int64


# --------------------------------------------------------------------------------------------
# blocks


class FCBlock(nn.Module):
    """One fully connected block: linear -> LayerNorm -> ELU (-> dropout).

    Parameters
    ----------
    n_in, n_out
        Input and output widths.
    dropout
        Dropout probability after the ELU; ``0`` adds no dropout module.
    linear
        The linear map to use (e.g. a :class:`SparseScaledLinear`); by default a
        ``torch.nn.Linear(n_in, n_out)`` initialised from ``rng``. It must output ``n_out``
        features.
    rng
        Source of the initial weights of the default linear map.
    dtype
        Floating dtype of the parameters (default: torch's default dtype).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        dropout: float = 0.0,
        linear: nn.Module | None = None,
        rng: SeedLike | RNGLike | torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n_in = positive_int(n_in, name="n_in")
        n_out = positive_int(n_out, name="n_out")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}.")
        if linear is None:
            linear = _linear(n_in, n_out, _torch_generator(rng), dtype)
        self.linear = linear
        self.norm = nn.LayerNorm(n_out, dtype=dtype)
        self.activation = nn.ELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, **linear_kwargs) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        x
            Input of shape ``(n_rows, n_in)`` (whatever the linear map accepts).
        **linear_kwargs
            Passed to the linear map (e.g. ``x_csc`` of :class:`SparseScaledLinear`).

        Returns
        -------
        torch.Tensor
            Shape ``(n_rows, n_out)``.
        """
        return self.dropout(self.activation(self.norm(self.linear(x, **linear_kwargs))))


class MLP(nn.Sequential):
    """A stack of :class:`FCBlock` through the given widths.

    Parameters
    ----------
    widths
        ``(n_in, w_1, ..., w_k)``: ``k`` blocks, ``n_in -> w_1 -> ... -> w_k``. A single
        width gives an empty stack (the identity).
    dropout
        Dropout probability of every block.
    rng
        Source of the initial weights.
    dtype
        Floating dtype of the parameters (default: torch's default dtype).

    Raises
    ------
    ConfigError
        If ``widths`` is empty or holds a non-positive width.
    """

    def __init__(
        self,
        widths: Sequence[int],
        *,
        dropout: float = 0.0,
        rng: SeedLike | RNGLike | torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        widths = [positive_int(w, name="widths") for w in widths]
        if not widths:
            raise ConfigError("widths must hold at least the input width.")
        generator = _torch_generator(rng)
        super().__init__(
            *(
                FCBlock(n_in, n_out, dropout=dropout, rng=generator, dtype=dtype)
                for n_in, n_out in zip(widths[:-1], widths[1:])
            )
        )


# --------------------------------------------------------------------------------------------
# encoder, decoder, autoencoder


class Encoder(nn.Module):
    """MARS encoder: every layer is linear -> LayerNorm -> ELU, the first one sparse and scaled.

    Parameters
    ----------
    n_genes
        Number of input genes.
    hidden
        Hidden widths (MARS: ``(1000,)``).
    n_latent
        Embedding dimension (MARS: 100).
    mean, std
        Per-gene scaling statistics of the log1p-normalised values.
    max_value
        Clipping bound of the scaled values, or ``None``.
    dropout
        Dropout probability after each ELU.
    rng
        Source of the initial weights.
    dtype
        Floating dtype of parameters and buffers (default: torch's default dtype).

    Raises
    ------
    ConfigError
        If a size or option is invalid.
    InputError
        If ``mean`` or ``std`` does not fit ``n_genes``.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        hidden: Sequence[int] = (1000,),
        n_latent: int = 100,
        mean: npt.ArrayLike | torch.Tensor,
        std: npt.ArrayLike | torch.Tensor,
        max_value: float | None = 10.0,
        dropout: float = 0.0,
        rng: SeedLike | RNGLike | torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = ModelConfig(hidden=tuple(hidden), n_latent=n_latent, dropout=dropout)
        self.n_genes = positive_int(n_genes, name="n_genes")
        self.n_latent = self.config.n_latent
        widths = (*self.config.hidden, self.n_latent)
        generator = _torch_generator(rng)
        first = SparseScaledLinear(
            self.n_genes,
            widths[0],
            mean=mean,
            std=std,
            max_value=max_value,
            rng=generator,
            dtype=dtype,
        )
        self.input_block = FCBlock(
            self.n_genes, widths[0], dropout=self.config.dropout, linear=first, dtype=dtype
        )
        self.hidden_blocks = MLP(widths, dropout=self.config.dropout, rng=generator, dtype=dtype)

    @property
    def input_layer(self) -> SparseScaledLinear:
        """The first, sparse and scaled, linear layer."""
        return self.input_block.linear

    def forward(self, x: torch.Tensor, *, x_csc: torch.Tensor | None = None) -> torch.Tensor:
        """Embed rows of log1p-normalised values.

        Parameters
        ----------
        x
            Shape ``(n_rows, n_genes)``, sparse CSR, sparse COO or dense.
        x_csc
            Optional CSC copy of a sparse ``x``, for the faster weight gradient (see
            :meth:`SparseScaledLinear.forward`).

        Returns
        -------
        torch.Tensor
            The embedding, shape ``(n_rows, n_latent)``.
        """
        if x_csc is None:
            return self.hidden_blocks(self.input_block(x))
        return self.hidden_blocks(self.input_block(x, x_csc=x_csc))


class Decoder(nn.Module):
    """MARS decoder: the encoder's mirror (``output="block"``) or ending in a plain linear map.

    Parameters
    ----------
    n_latent
        Embedding dimension.
    n_genes
        Number of genes reconstructed.
    hidden
        Hidden widths listed from the input side, as for :class:`Encoder`; the decoder uses
        them in reverse order (``n_latent -> hidden[-1] -> ... -> hidden[0] -> n_genes``).
    dropout
        Dropout probability after each ELU.
    output
        ``"block"``: the last layer is Linear -> LayerNorm -> ELU, as in the MARS reference;
        ``"linear"``: a plain linear map.
    rng
        Source of the initial weights.
    dtype
        Floating dtype of parameters and buffers (default: torch's default dtype).

    Raises
    ------
    ConfigError
        If a size or option is invalid.
    """

    def __init__(
        self,
        n_latent: int,
        n_genes: int,
        *,
        hidden: Sequence[int] = (1000,),
        dropout: float = 0.0,
        output: str = "block",
        rng: SeedLike | RNGLike | torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = ModelConfig(
            hidden=tuple(hidden), n_latent=n_latent, dropout=dropout, decoder_output=output
        )
        self.n_genes = positive_int(n_genes, name="n_genes")
        self.n_latent = self.config.n_latent
        widths = (self.n_latent, *reversed(self.config.hidden))
        generator = _torch_generator(rng)
        self.hidden_blocks = MLP(widths, dropout=self.config.dropout, rng=generator, dtype=dtype)
        if output == "block":
            self.output = FCBlock(widths[-1], self.n_genes, rng=generator, dtype=dtype)
        else:
            self.output = _linear(widths[-1], self.n_genes, generator, dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruct the scaled expression.

        Parameters
        ----------
        z
            Embedding, shape ``(n_rows, n_latent)``.

        Returns
        -------
        torch.Tensor
            Reconstruction of the scaled input, shape ``(n_rows, n_genes)``.
        """
        return self.output(self.hidden_blocks(z))


class Autoencoder(nn.Module):
    """Encoder and decoder pretrained together on the reconstruction of the scaled input.

    Parameters
    ----------
    encoder
        The encoder.
    decoder
        A decoder with the encoder's ``n_latent`` and ``n_genes``.

    Raises
    ------
    ConfigError
        If the encoder and the decoder do not fit together.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        if encoder.n_latent != decoder.n_latent or encoder.n_genes != decoder.n_genes:
            raise ConfigError(
                f"encoder (n_genes={encoder.n_genes}, n_latent={encoder.n_latent}) and decoder "
                f"(n_genes={decoder.n_genes}, n_latent={decoder.n_latent}) must have equal sizes."
            )
        self.encoder = encoder
        self.decoder = decoder

    @classmethod
    def from_config(
        cls,
        n_genes: int,
        config: ModelConfig,
        *,
        mean: npt.ArrayLike | torch.Tensor,
        std: npt.ArrayLike | torch.Tensor,
        max_value: float | None = 10.0,
        rng: SeedLike | RNGLike | torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Autoencoder:
        """Build the encoder and its mirror decoder from a :class:`ModelConfig`.

        Parameters
        ----------
        n_genes
            Number of genes.
        config
            The architecture.
        mean, std
            Per-gene scaling statistics of the log1p-normalised values.
        max_value
            Clipping bound of the scaled values, or ``None``.
        rng
            Source of the initial weights (one generator feeds encoder, then decoder).
        dtype
            Floating dtype of parameters and buffers (default: torch's default dtype).

        Returns
        -------
        Autoencoder
            A freshly initialised model.

        Raises
        ------
        ConfigError
            If ``config`` is not a ``ModelConfig`` or a size is invalid.
        """
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"config must be a ModelConfig, got {type(config).__name__}.")
        generator = _torch_generator(rng)
        encoder = Encoder(
            n_genes,
            hidden=config.hidden,
            n_latent=config.n_latent,
            mean=mean,
            std=std,
            max_value=max_value,
            dropout=config.dropout,
            rng=generator,
            dtype=dtype,
        )
        decoder = Decoder(
            config.n_latent,
            n_genes,
            hidden=config.hidden,
            dropout=config.dropout,
            output=config.decoder_output,
            rng=generator,
            dtype=dtype,
        )
        return cls(encoder, decoder)

    def forward(
        self, x: torch.Tensor, *, x_csc: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed and reconstruct a batch.

        Parameters
        ----------
        x
            Log1p-normalised rows, shape ``(n_rows, n_genes)``, sparse CSR, COO or dense.
        x_csc
            Optional CSC copy of a sparse ``x``, for the faster weight gradient (see
            :meth:`SparseScaledLinear.forward`).

        Returns
        -------
        z : torch.Tensor
            Embedding, shape ``(n_rows, n_latent)``.
        reconstruction : torch.Tensor
            Reconstruction of the scaled rows, shape ``(n_rows, n_genes)``.
        """
        z = self.encoder(x, x_csc=x_csc)
        return z, self.decoder(z)

    def scaled_target(self, x: torch.Tensor) -> torch.Tensor:
        """The dense scaled rows the reconstruction is compared with (MSE pretraining).

        Parameters
        ----------
        x
            The batch given to :meth:`forward`.

        Returns
        -------
        torch.Tensor
            ``clip((x - mean) / std)``, dense, in the dtype of the encoder's weights.
        """
        layer = self.encoder.input_layer
        return dense_scaled_target(x, layer, dtype=layer.weight.dtype)
