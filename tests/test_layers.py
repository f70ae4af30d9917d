"""LowRankLinear: SVD init (Eckart-Young), round trips, rank bounds."""
import pytest
import torch
from torch import nn

from lrkd_fast import LowRankLinear
from tests.conftest import assert_close_rel


def test_svd_error_is_next_singular_value():
    lin = nn.Linear(40, 25).double()
    s = torch.linalg.svdvals(lin.weight.detach())
    for r in (1, 5, 24):
        lr = LowRankLinear.from_linear(lin, r)
        err = torch.linalg.matrix_norm(lin.weight - lr.weight, ord=2)
        assert torch.isclose(err, s[r], rtol=1e-9), (r, err.item(), s[r].item())
    full = LowRankLinear.from_linear(lin, 25)
    assert torch.allclose(full.weight, lin.weight, atol=1e-12)
    x = torch.randn(7, 40, dtype=torch.float64)
    assert torch.allclose(full(x), lin(x), atol=1e-12)


def test_singular_values_split_evenly():
    lin = nn.Linear(30, 20)
    lr = LowRankLinear.from_linear(lin, 6)
    # U^T U and V V^T both equal diag(S_r): the scale is shared between the factors
    utu = lr.U.double().t() @ lr.U.double()
    vvt = lr.V.double() @ lr.V.double().t()
    assert torch.allclose(utu, vvt, atol=1e-4)
    assert torch.allclose(utu, torch.diag(torch.diagonal(utu)), atol=1e-4)


def test_to_linear_round_trip():
    lin = nn.Linear(33, 18)
    lr = LowRankLinear.from_linear(lin, 18)
    back = lr.to_linear()
    assert isinstance(back, nn.Linear) and back.weight.shape == lin.weight.shape
    assert_close_rel(back.weight, lin.weight)
    assert torch.equal(back.bias, lin.bias)
    x = torch.randn(4, 33)
    assert_close_rel(back(x), lr(x))
    # low rank: to_linear is exactly the function the factors compute
    lr5 = LowRankLinear.from_linear(lin, 5)
    assert_close_rel(lr5.to_linear()(x), lr5(x))


def test_random_init_has_linear_like_scale_and_keeps_bias():
    lin = nn.Linear(256, 128)
    lr = LowRankLinear.from_linear(lin, 32, init="random")
    assert torch.equal(lr.bias, lin.bias)
    x = torch.randn(512, 256)
    ratio = (lr(x) - lr.bias).std() / (lin(x) - lin.bias).std()
    assert 0.5 < ratio < 2.0


def test_rank_bounds_and_repr():
    for bad in (0, -1, 21, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            LowRankLinear(30, 20, bad)
    with pytest.raises(ValueError, match="in_features"):
        LowRankLinear(0, 20, 1)
    with pytest.raises(TypeError, match="nn.Linear"):
        LowRankLinear.from_linear(nn.Conv1d(3, 3, 1), 2)
    with pytest.raises(ValueError, match="init"):
        LowRankLinear.from_linear(nn.Linear(4, 4), 2, init="whatever")
    layer = LowRankLinear(100, 50, 10, bias=False)
    assert layer.num_factor_params == 1500 and layer.bias is None
    assert "rank=10" in repr(layer) and "70.0% saved" in repr(layer)


def test_dtype_device_kwargs():
    layer = LowRankLinear(12, 8, 3, dtype=torch.float16)
    assert layer.U.dtype == layer.V.dtype == layer.bias.dtype == torch.float16
    lin = nn.Linear(12, 8).half()
    assert LowRankLinear.from_linear(lin, 3).U.dtype == torch.float16
