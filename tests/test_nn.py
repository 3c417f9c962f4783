"""Torch modules: the folded sparse first layer against dense references on real data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from conftest import shared_file
from mars_scale import nn as nn_module
from mars_scale.errors import ConfigError, InputError
from mars_scale.nn import (
    MLP,
    Autoencoder,
    Decoder,
    Encoder,
    FCBlock,
    ModelConfig,
    SparseScaledLinear,
    dense_scaled_target,
)
from mars_scale.preprocess import fold_scaling, normalize_log1p

pytestmark = pytest.mark.filterwarnings(
    "ignore:Sparse CSR tensor support is in beta:UserWarning",
    "ignore:Sparse invariant checks are implicitly disabled:UserWarning",
)

N_OUT = 24


# ------------------------------------------------------------------------------- helpers


def _read_counts(name: str) -> sp.csr_matrix:
    anndata = pytest.importorskip("anndata")
    return sp.csr_matrix(anndata.read_h5ad(shared_file(name)).X)


def _lognorm(counts: sp.csr_matrix) -> sp.csr_matrix:
    """Reference log-normalisation, dense numpy, returned as float64 CSR."""
    dense = counts.toarray().astype(np.float64)
    totals = dense.sum(axis=1, keepdims=True)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    return sp.csr_matrix(np.log1p(dense * scale))


def _with_extreme_genes(x: sp.csr_matrix) -> sp.csr_matrix:
    """Append genes scaled beyond ±10 (a rare gene, a zero in a common gene) and constant ones."""
    n = x.shape[0]
    rare = np.zeros(n)
    rare[[3, 17]] = [4.0, 5.0]
    common = np.full(n, 6.0)
    common[5] = 0.0
    constant = np.full(n, 2.0)
    silent = np.zeros(n)
    extra = np.column_stack([rare, common, constant, silent])
    return sp.csr_matrix(sp.hstack([x, sp.csr_matrix(extra)]))


def _case(name: str) -> sp.csr_matrix:
    if name == "mesc":
        return _lognorm(_read_counts("mesc_kolodziejczyk2015_mini.h5ad"))
    x = _lognorm(_read_counts("cellbench_3cl_3protocols_panel.h5ad"))
    if name == "cellbench":
        return x
    return _with_extreme_genes(x[::3])  # "cellbench+extreme"


CASES = ["mesc", "cellbench", "cellbench+extreme"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    x = _case(request.param)
    dense = x.toarray()
    mean = dense.mean(axis=0)
    std = dense.std(axis=0)  # ddof=0
    unclipped = (dense - mean) / np.where(std == 0, 1.0, std)
    scaled = np.clip(unclipped, -10.0, 10.0)
    rng = np.random.default_rng(42)
    w = rng.normal(scale=1 / np.sqrt(x.shape[1]), size=(N_OUT, x.shape[1]))
    b = rng.normal(size=N_OUT)
    return {
        "name": request.param,
        "x": x,
        "mean": mean,
        "std": std,
        "unclipped": unclipped,
        "scaled": scaled,
        "w": w,
        "b": b,
    }


def _csr(x: sp.csr_matrix, dtype=torch.float32, index_dtype=torch.int32) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        torch.from_numpy(x.indptr).to(index_dtype),
        torch.from_numpy(x.indices).to(index_dtype),
        torch.from_numpy(x.data).to(dtype),
        size=x.shape,
    )


def _layer(case, dtype) -> SparseScaledLinear:
    layer = SparseScaledLinear(
        case["x"].shape[1],
        N_OUT,
        mean=case["mean"],
        std=case["std"],
        max_value=10.0,
        rng=0,
        dtype=dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(case["w"].T))
        layer.bias.copy_(torch.from_numpy(case["b"]))
    return layer


# ------------------------------------------------------------------------------- the first layer


def test_cases_exercise_the_clip(case):
    if case["name"] == "cellbench":
        # this real panel stays within ±10: the constructed case covers it
        assert np.abs(case["unclipped"]).max() <= 10
    else:
        assert case["unclipped"].max() > 10
    if case["name"] == "cellbench+extreme":
        assert case["unclipped"].min() < -10


def test_sparse_scaled_linear_matches_dense_float64(case):
    layer = _layer(case, torch.float64)
    out = layer(_csr(case["x"], torch.float64)).detach().numpy()
    reference = case["scaled"] @ case["w"].T + case["b"]
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, reference, rtol=1e-10, atol=1e-10)
    if case["name"] != "cellbench":
        unclipped_reference = case["unclipped"] @ case["w"].T + case["b"]
        assert not np.allclose(out, unclipped_reference, rtol=1e-4, atol=1e-4)


def test_sparse_scaled_linear_matches_dense_float32(case):
    layer = _layer(case, torch.float32)
    out = layer(_csr(case["x"], torch.float32)).detach().numpy()
    assert out.dtype == np.float32
    reference = case["scaled"] @ case["w"].T + case["b"]
    scale = np.abs(reference).max()
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * scale)
    assert np.linalg.norm(out - reference) <= 1e-4 * np.linalg.norm(reference)


def test_sparse_scaled_linear_weight_gradient_matches_dense(case):
    layer = _layer(case, torch.float64)
    cotangent = torch.from_numpy(
        np.random.default_rng(1).normal(size=(case["x"].shape[0], N_OUT))
    )
    (layer(_csr(case["x"], torch.float64)) * cotangent).sum().backward()

    w = torch.from_numpy(case["w"]).requires_grad_()
    b = torch.from_numpy(case["b"]).requires_grad_()
    ((torch.from_numpy(case["scaled"]) @ w.T + b) * cotangent).sum().backward()

    np.testing.assert_allclose(layer.weight.grad.numpy(), w.grad.numpy().T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.bias.grad.numpy(), b.grad.numpy(), rtol=1e-6, atol=1e-6)


def _csc(x: sp.csr_matrix, dtype=torch.float64) -> torch.Tensor:
    c = x.tocsc()
    return torch.sparse_csc_tensor(
        torch.from_numpy(c.indptr).long(),
        torch.from_numpy(c.indices).long(),
        torch.from_numpy(c.data).to(dtype),
        size=c.shape,
    )


def _assert_matches_dense(case, layer, *, with_csc: bool, seed: int) -> None:
    """Output and weight/bias gradients of ``layer`` against dense float64 autograd."""
    x = case["x"]
    cotangent = torch.from_numpy(np.random.default_rng(seed).normal(size=(x.shape[0], N_OUT)))
    out = layer(_csr(x, torch.float64), x_csc=_csc(x) if with_csc else None)
    assert out.grad_fn is not None
    (out * cotangent).sum().backward()

    w = torch.from_numpy(case["w"]).requires_grad_()
    b = torch.from_numpy(case["b"]).requires_grad_()
    reference = torch.from_numpy(case["scaled"]) @ w.T + b
    (reference * cotangent).sum().backward()

    np.testing.assert_allclose(out.detach().numpy(), reference.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(layer.weight.grad.numpy(), w.grad.numpy().T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.bias.grad.numpy(), b.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_sparse_scaled_linear_column_gradient_matches_dense(case):
    """With a CSC copy, the weight gradient comes from a column-wise embedding_bag."""
    _assert_matches_dense(case, _layer(case, torch.float64), with_csc=True, seed=2)


def test_sparse_scaled_linear_rejects_mismatched_csc_copy():
    x = sp.random(5, 6, density=0.4, random_state=0, format="csr")
    layer = SparseScaledLinear(6, 2, mean=np.zeros(6), std=np.ones(6), rng=0, dtype=torch.float64)
    with pytest.raises(InputError, match="x_csc must hold the same batch"):
        layer(_csr(x, torch.float64), x_csc=_csc(x[:4]))
    with pytest.raises(InputError, match="sparse_csc_tensor"):
        layer(_csr(x, torch.float64), x_csc=_csr(x, torch.float64))


@pytest.mark.parametrize("with_csc", [False, True])
def test_sparse_scaled_linear_blocked_gather_matches_dense(case, monkeypatch, with_csc):
    """The forward gathers in gene blocks on CPU when the weight exceeds a block."""
    monkeypatch.setattr(nn_module, "_GATHER_BLOCK_BYTES", 7 * N_OUT * 8)  # 7 genes per block
    layer = _layer(case, torch.float64)
    assert nn_module._gather_block(layer.weight) == 7
    _assert_matches_dense(case, layer, with_csc=with_csc, seed=3)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block", [1, 3, 8, 64])
def test_blocked_embedding_bag_matches_embedding_bag(index_dtype, block):
    rng = np.random.default_rng(block)
    dense = rng.random((9, 20)) * (rng.random((9, 20)) < 0.3)
    dense[4] = 0  # an empty row
    x = sp.csr_matrix(dense)
    crow = torch.from_numpy(x.indptr).to(index_dtype)
    col = torch.from_numpy(x.indices).to(index_dtype)
    row = torch.repeat_interleave(torch.arange(9, dtype=index_dtype), crow.diff())
    values = torch.from_numpy(x.data)
    weight = torch.from_numpy(rng.normal(size=(20, 5)))
    got = nn_module._blocked_embedding_bag(weight, col, row, values, 9, block)
    expected = torch.from_numpy(x.toarray()) @ weight
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    empty = nn_module._blocked_embedding_bag(
        weight, col[:0], row[:0], values[:0], 3, block
    )
    torch.testing.assert_close(empty, torch.zeros(3, 5, dtype=torch.float64))


def test_sparse_scaled_linear_gradcheck():
    """Weight and bias gradients of the sparse path, by finite differences in float64."""
    rng = np.random.default_rng(4)
    dense = 30 * rng.random((6, 8)) * (rng.random((6, 8)) < 0.4)  # some values clip at 10
    dense[2] = 0  # an empty row: only the constant term
    x = sp.csr_matrix(dense)
    mean = np.linspace(0.1, 1.0, 8)
    std = np.linspace(0.5, 2.0, 8)
    layer = SparseScaledLinear(8, 3, mean=mean, std=std, rng=1, dtype=torch.float64)
    assert (layer.scale(torch.from_numpy(dense)).abs() == 10).any()
    batch = _csr(x, torch.float64)

    def apply(weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (batch,))

    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(apply, (weight, bias))


def test_sparse_scaled_linear_gradient_reaches_input_values(case):
    """Values that require a gradient go through plain autograd and get the dense gradient."""
    layer = _layer(case, torch.float64)
    x = case["x"][:40]
    batch = _csr(x, torch.float64)
    values = batch.values().clone().requires_grad_()
    batch = torch.sparse_csr_tensor(batch.crow_indices(), batch.col_indices(), values, x.shape)
    cotangent = torch.from_numpy(np.random.default_rng(5).normal(size=(x.shape[0], N_OUT)))
    (layer(batch) * cotangent).sum().backward()

    dense = torch.from_numpy(x.toarray()).requires_grad_()
    (layer(dense) * cotangent).sum().backward()
    coo = x.tocoo()
    np.testing.assert_allclose(
        values.grad.numpy(), dense.grad.numpy()[coo.row, coo.col], rtol=1e-10, atol=1e-10
    )
    assert values.grad.abs().sum() > 0


def test_sparse_scaled_linear_dense_and_coo_input_agree(case):
    layer = _layer(case, torch.float64)
    x = case["x"][:50]
    sparse_out = layer(_csr(x, torch.float64, index_dtype=torch.int64))
    dense_out = layer(torch.from_numpy(x.toarray()))
    coo_out = layer(torch.from_numpy(x.toarray()).to_sparse())
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(coo_out, dense_out, rtol=1e-10, atol=1e-10)


def test_sparse_scaled_linear_empty_rows():
    x = sp.csr_matrix(
        np.array(
            [[0.0, 0.0, 0.0], [1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]
        )
    )
    layer = SparseScaledLinear(
        3, 4, mean=[0.5, 1.0, 0.2], std=[0.5, 0.0, 0.1], rng=3, dtype=torch.float64
    )
    out = layer(_csr(x, torch.float64))
    torch.testing.assert_close(out, layer(torch.from_numpy(x.toarray())))
    zero_row = layer.bias + layer.zero_value @ layer.weight
    for row in (0, 2, 4):
        torch.testing.assert_close(out[row], zero_row)
    # a batch without any non-zero, and a batch without rows
    empty = sp.csr_matrix((2, 3))
    torch.testing.assert_close(layer(_csr(empty, torch.float64)), zero_row.expand(2, 4))
    assert layer(_csr(sp.csr_matrix((0, 3)), torch.float64)).shape == (0, 4)


def test_sparse_scaled_linear_rejects_bad_input():
    layer = SparseScaledLinear(3, 2, mean=np.zeros(3), std=np.ones(3), rng=0)
    with pytest.raises(InputError, match="shape"):
        layer(torch.zeros(2, 4))
    with pytest.raises(InputError, match="n_genes"):
        SparseScaledLinear(4, 2, mean=np.zeros(3), std=np.ones(3))
    with pytest.raises(ConfigError, match="n_out"):
        SparseScaledLinear(3, 0, mean=np.zeros(3), std=np.ones(3))


def test_sparse_scaled_linear_state_dict_holds_scaling():
    layer = SparseScaledLinear(3, 2, mean=[1.0, 2.0, 3.0], std=[1.0, 0.0, 2.0], rng=0)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "mean", "std", "zero_value"}
    torch.testing.assert_close(state["std"], torch.tensor([1.0, 1.0, 2.0]))
    params = layer.scaling_params()
    np.testing.assert_allclose(params.zero_value, [-1.0, -2.0, -1.5])


def test_normalize_then_layer_end_to_end():
    """Raw counts through normalize_log1p and the layer equal the dense pipeline."""
    counts = _read_counts("mesc_kolodziejczyk2015_mini.h5ad")
    reference_x = _lognorm(counts)
    dense = reference_x.toarray()
    mean, std = dense.mean(axis=0), dense.std(axis=0)
    data = normalize_log1p(counts.indptr, counts.indices, counts.data, dtype=np.float64)
    x = sp.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape)
    layer = SparseScaledLinear(x.shape[1], 8, mean=mean, std=std, rng=5, dtype=torch.float64)
    scaled = np.clip((dense - mean) / np.where(std == 0, 1, std), -10, 10)
    w = layer.weight.detach().numpy()
    reference = scaled @ w + layer.bias.detach().numpy()
    np.testing.assert_allclose(
        layer(_csr(x, torch.float64)).detach().numpy(), reference, rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------- dense target


def test_dense_scaled_target_matches_dense(case):
    x = case["x"]
    params = fold_scaling(case["mean"], case["std"], max_value=10.0)
    for source in (params, _layer(case, torch.float64)):
        got = dense_scaled_target(_csr(x, torch.float64), source)
        assert got.shape == x.shape
        np.testing.assert_allclose(got.numpy(), case["scaled"], rtol=1e-12, atol=1e-12)
    got32 = dense_scaled_target(_csr(x, torch.float32), params)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), case["scaled"], rtol=1e-5, atol=1e-5)
    dense = dense_scaled_target(torch.from_numpy(x.toarray()), params)
    np.testing.assert_allclose(dense.numpy(), case["scaled"], rtol=1e-12, atol=1e-12)


def test_dense_scaled_target_zeros_give_zero_value():
    params = fold_scaling([2.0, 50.0], [1.0, 1.0], max_value=10.0)
    x = sp.csr_matrix(np.array([[0.0, 0.0], [3.0, 0.0]]))
    got = dense_scaled_target(_csr(x, torch.float64), params)
    expected = torch.tensor([[-2.0, -10.0], [1.0, -10.0]], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    with pytest.raises(InputError, match="params"):
        dense_scaled_target(_csr(x), object())


# ------------------------------------------------------------------------------- networks


def _stats(n_genes: int):
    rng = np.random.default_rng(0)
    return rng.random(n_genes), rng.random(n_genes) + 0.1


def test_encoder_decoder_shapes_and_blocks():
    mean, std = _stats(40)
    encoder = Encoder(40, hidden=(16, 8), n_latent=4, mean=mean, std=std, rng=0)
    decoder = Decoder(4, 40, hidden=(16, 8), rng=0)
    blocks = [encoder.input_block, *encoder.hidden_blocks]
    assert [type(b.linear) for b in blocks] == [SparseScaledLinear, nn.Linear, nn.Linear]
    for block in blocks:  # LayerNorm + ELU on every encoder layer, the last included
        assert isinstance(block, FCBlock)
        assert isinstance(block.norm, nn.LayerNorm)
        assert isinstance(block.activation, nn.ELU)
    assert [b.norm.normalized_shape[0] for b in blocks] == [16, 8, 4]
    # the decoder mirrors the widths; by default its last layer is a full block, as in the
    # MARS reference, and output="linear" gives a plain Linear
    assert [b.linear.out_features for b in decoder.hidden_blocks] == [8, 16]
    assert all(isinstance(b.norm, nn.LayerNorm) for b in decoder.hidden_blocks)
    assert isinstance(decoder.output, FCBlock) and isinstance(decoder.output.norm, nn.LayerNorm)
    assert (decoder.output.linear.in_features, decoder.output.linear.out_features) == (16, 40)
    assert list(decoder.children())[-1] is decoder.output
    plain = Decoder(4, 40, hidden=(16, 8), output="linear", rng=0)
    assert isinstance(plain.output, nn.Linear) and plain.output.out_features == 40

    x = sp.random(7, 40, density=0.2, random_state=0, format="csr")
    z = encoder(_csr(x))
    assert z.shape == (7, 4)
    assert decoder(z).shape == (7, 40)
    assert (z > -1).all()  # ELU output
    # the default architecture is MARS's G -> 1000 -> 100
    default = Encoder(40, mean=mean, std=std, rng=0)
    assert default.input_layer.n_out == 1000
    assert default.hidden_blocks[-1].linear.out_features == 100


def test_encoder_without_hidden_layers():
    mean, std = _stats(10)
    encoder = Encoder(10, hidden=(), n_latent=3, mean=mean, std=std, rng=0)
    assert len(encoder.hidden_blocks) == 0
    assert encoder(torch.rand(2, 10)).shape == (2, 3)
    decoder = Decoder(3, 10, hidden=(), rng=0)
    assert decoder(torch.rand(2, 3)).shape == (2, 10)


def test_autoencoder_forward_backward_and_target():
    counts = _read_counts("mesc_kolodziejczyk2015_mini.h5ad")
    x = _lognorm(counts)
    dense = x.toarray()
    mean, std = dense.mean(axis=0), dense.std(axis=0)
    model = Autoencoder.from_config(
        x.shape[1], ModelConfig(hidden=(32,), n_latent=6), mean=mean, std=std, rng=0
    )
    batch = _csr(x[:64])
    z, reconstruction = model(batch)
    assert z.shape == (64, 6)
    assert reconstruction.shape == (64, x.shape[1])
    target = model.scaled_target(batch)
    np.testing.assert_allclose(
        target.numpy(),
        np.clip((dense[:64] - mean) / std, -10, 10),
        rtol=1e-5,
        atol=1e-5,
    )
    loss = torch.nn.functional.mse_loss(reconstruction, target)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    _, reconstruction_csc = model(batch, x_csc=_csc(x[:64], torch.float32))
    torch.nn.functional.mse_loss(reconstruction_csc, target).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-6)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert model.encoder.input_layer.weight.grad.abs().sum() > 0


def test_construction_is_seeded_and_leaves_global_rng_alone():
    mean, std = _stats(30)
    config = ModelConfig(hidden=(12,), n_latent=5)
    state = torch.get_rng_state()
    a = Autoencoder.from_config(30, config, mean=mean, std=std, rng=7)
    b = Autoencoder.from_config(30, config, mean=mean, std=std, rng=np.random.default_rng(7))
    c = Autoencoder.from_config(30, config, mean=mean, std=std, rng=8)
    assert torch.equal(torch.get_rng_state(), state)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.encoder.input_layer.weight, c.encoder.input_layer.weight)
    bound = 1 / np.sqrt(30)
    assert a.encoder.input_layer.weight.abs().max() <= bound


def test_mlp_builder():
    mlp = MLP([6, 5, 4], dropout=0.1, rng=0)
    assert len(mlp) == 2
    assert isinstance(mlp[0].dropout, nn.Dropout)
    assert mlp(torch.rand(3, 6)).shape == (3, 4)
    with pytest.raises(ConfigError, match="widths"):
        MLP([], rng=0)
    with pytest.raises(ConfigError, match="widths"):
        MLP([4, 0], rng=0)


def test_autoencoder_rejects_mismatched_parts():
    mean, std = _stats(10)
    encoder = Encoder(10, hidden=(8,), n_latent=3, mean=mean, std=std, rng=0)
    with pytest.raises(ConfigError, match="equal sizes"):
        Autoencoder(encoder, Decoder(4, 10, hidden=(8,), rng=0))
    with pytest.raises(ConfigError, match="ModelConfig"):
        Autoencoder.from_config(10, {"hidden": (8,)}, mean=mean, std=std)


# ------------------------------------------------------------------------------- config


def test_model_config_defaults_and_normalisation():
    config = ModelConfig()
    assert config.hidden == (1000,)
    assert config.n_latent == 100
    assert config.dropout == 0.0
    assert ModelConfig(hidden=[64, np.int64(32)]).hidden == (64, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_latent = 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": (0,)}, "ModelConfig.hidden"),
        ({"hidden": (-5,)}, "ModelConfig.hidden"),
        ({"hidden": (1.5,)}, "ModelConfig.hidden"),
        ({"hidden": (True,)}, "ModelConfig.hidden"),
        ({"hidden": "1000"}, "ModelConfig.hidden"),
        ({"hidden": 1000}, "ModelConfig.hidden"),
        ({"n_latent": 0}, "ModelConfig.n_latent"),
        ({"n_latent": 10.0}, "ModelConfig.n_latent"),
        ({"dropout": 1.0}, "ModelConfig.dropout"),
        ({"dropout": -0.1}, "ModelConfig.dropout"),
    ],
)
def test_model_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)
    with pytest.raises(ConfigError):
        ModelConfig(**kwargs)
