"""lowrank_linear: Triton kernels (interpreted on CPU) against the eager reference."""
import pytest
import torch

import lrkd_fast
from lrkd_fast import LowRankLinear, lowrank_linear, lowrank_linear_reference
from lrkd_fast.kernels import chain_matmul, matmul
from tests.conftest import DEVICE, DTYPES, assert_close_rel


def _make(shape_x, d_in, r, d_out, dtype, bias=True):
    x = torch.randn(*shape_x, d_in, device=DEVICE).to(dtype).requires_grad_()
    U = (torch.randn(d_in, r, device=DEVICE) * d_in**-0.5).to(dtype).requires_grad_()
    V = (torch.randn(r, d_out, device=DEVICE) * r**-0.5).to(dtype).requires_grad_()
    b = torch.randn(d_out, device=DEVICE).to(dtype).requires_grad_() if bias else None
    return x, U, V, b


def _run(backend, x, U, V, b, gy):
    for t in (x, U, V, b):
        if t is not None:
            t.grad = None
    with lrkd_fast.set_backend(backend):
        y = lowrank_linear(x, U, V, b)
    y.backward(gy)
    return y.detach(), [t.grad.clone() if t is not None else None for t in (x, U, V, b)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 3, 17, 64])
@pytest.mark.parametrize("lead,bias", [((29,), True), ((2, 13), False)])
def test_triton_matches_eager(dtype, r, lead, bias):
    d_in, d_out = 97, 53
    r = min(r, 53)
    x, U, V, b = _make(lead, d_in, r, d_out, dtype, bias)
    gy = torch.randn(*lead, d_out, device=DEVICE).to(dtype)
    y_t, g_t = _run("triton", x, U, V, b, gy)
    # oracle: the eager reference in float64
    x64, U64, V64 = (t.detach().double().requires_grad_() for t in (x, U, V))
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y64 = lowrank_linear_reference(x64, U64, V64, b64)
    y64.backward(gy.double())
    assert_close_rel(y_t, y64, dtype, "y")
    for name, g, ref in zip("xUVb", g_t, (x64, U64, V64, b64)):
        if ref is not None:
            assert_close_rel(g, ref.grad, dtype, f"d{name}")
    # and the eager path in the same dtype agrees too
    y_e, _ = _run("eager", x, U, V, b, gy)
    assert_close_rel(y_t, y_e, dtype, "y vs eager same dtype")


def test_non_contiguous_input_and_big_rank_path():
    # a transposed view as x, and r > the single-kernel limit (falls back to two tiled products)
    base = torch.randn(40, 300, device=DEVICE)
    x = base.t().requires_grad_()  # (300, 40), strides (1, 300)
    assert not x.is_contiguous()
    U = torch.randn(40, 33, device=DEVICE, requires_grad=True)
    V = torch.randn(33, 300, device=DEVICE, requires_grad=True)
    with lrkd_fast.set_backend("triton"):
        y = lowrank_linear(x, U, V)
    assert_close_rel(y, (x @ U) @ V)
    x3 = torch.randn(2, 3, 300, device=DEVICE).transpose(0, 1)  # 3-D non-contiguous
    U2 = torch.randn(300, 290, device=DEVICE) * 0.05
    V2 = torch.randn(290, 24, device=DEVICE) * 0.05
    with lrkd_fast.set_backend("triton"):
        y3 = lowrank_linear(x3, U2, V2)
    assert y3.shape == (3, 2, 24)
    assert_close_rel(y3, (x3 @ U2) @ V2)


def test_only_some_inputs_need_grad():
    x, U, V, b = _make((21,), 30, 5, 19, torch.float32)
    x.requires_grad_(False)
    V.requires_grad_(False)
    with lrkd_fast.set_backend("triton"):
        lowrank_linear(x, U, V, b).sum().backward()
    assert x.grad is None and V.grad is None
    assert_close_rel(U.grad, x.t() @ torch.ones(21, 19) @ V.t())
    assert_close_rel(b.grad, torch.full((19,), 21.0))


def test_empty_batch():
    x, U, V, b = _make((0,), 20, 4, 9, torch.float32)
    with lrkd_fast.set_backend("triton"):
        y = lowrank_linear(x, U, V, b)
        assert y.shape == (0, 9)
        y.sum().backward()
    assert torch.equal(U.grad, torch.zeros_like(U)) and torch.equal(V.grad, torch.zeros_like(V))
    assert torch.equal(b.grad, torch.zeros_like(b))
    with lrkd_fast.set_backend("eager"):
        assert lowrank_linear(torch.empty(3, 0, 20), U, V).shape == (3, 0, 9)


def test_split_k_matmul_is_deterministic_and_correct():
    a = torch.randn(203, 700, device=DEVICE)
    b = torch.randn(700, 37, device=DEVICE)
    r1 = matmul(a, b, split_k=4)
    r2 = matmul(a, b, split_k=4)
    assert torch.equal(r1, r2)
    assert_close_rel(r1, a.double() @ b.double())
    assert_close_rel(matmul(a.t().contiguous().t(), b, split_k=1), a @ b)


def test_chain_matmul_stores_intermediate():
    a, b, c = torch.randn(45, 31), torch.randn(31, 7), torch.randn(7, 66)
    out, t = chain_matmul(a, b, c, store_t=True)
    assert_close_rel(t, a @ b)
    assert_close_rel(out, (a @ b) @ c)


def test_gradcheck_reference_float64():
    x = torch.randn(4, 3, 7, dtype=torch.float64, requires_grad=True)
    U = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lowrank_linear_reference, (x, U, V, b))
    # float64 under "auto" takes the eager path, so gradcheck through the public op works too
    assert torch.autograd.gradcheck(lowrank_linear, (x, U, V, b))


def test_bad_inputs_name_the_argument():
    x, U, V, b = _make((5,), 8, 3, 6, torch.float32)
    with pytest.raises(ValueError, match="U has d_in=8"):
        lowrank_linear(torch.randn(5, 9), U, V)
    with pytest.raises(ValueError, match="V must have r=3"):
        lowrank_linear(x, U, torch.randn(4, 6))
    with pytest.raises(ValueError, match="bias must have d_out=6"):
        lowrank_linear(x, U, V, torch.randn(7))
    with pytest.raises(TypeError, match="V has dtype torch.float16"):
        lowrank_linear(x, U, V.detach().half())
    with pytest.raises(ValueError, match="U is on meta"):
        lowrank_linear(x, torch.empty(8, 3, device="meta"), V)
    with pytest.raises(ValueError, match="U must be 2-D"):
        lowrank_linear(x, torch.randn(8, 3, 1), V)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        lowrank_linear(torch.ones(5, 8, dtype=torch.long), U, V)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lowrank_linear([1.0] * 8, U, V)


def test_backend_selection(monkeypatch):
    assert lrkd_fast.get_backend() == "auto"
    with lrkd_fast.set_backend("eager") as name:
        assert name == "eager" and lrkd_fast.get_backend() == "eager"
    assert lrkd_fast.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        lrkd_fast.set_backend("cuda")
    x = torch.randn(3, 4, dtype=torch.float64)
    with lrkd_fast.set_backend("triton"), pytest.raises(lrkd_fast.BackendUnavailableError, match="dtype torch.float64"):
        lowrank_linear(x, torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        from lrkd_fast.backend import use_triton

        assert use_triton(torch.randn(2)) is False  # auto: falls back to eager
        with lrkd_fast.set_backend("triton"), pytest.raises(lrkd_fast.BackendUnavailableError,
                                                              match="Triton interpreter is off"):
            use_triton(torch.randn(2), op="lowrank_linear")


def test_backend_environment_variable():
    import subprocess
    import sys

    code = "import lrkd_fast; print(lrkd_fast.get_backend())"
    env = {**__import__("os").environ, "LRKD_FAST_BACKEND": "eager"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "eager"
    env["LRKD_FAST_BACKEND"] = "gpu"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "LRKD_FAST_BACKEND" in bad.stderr


def test_autocast_runs_in_autocast_dtype():
    x, U, V, b = _make((6,), 16, 4, 8, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = lowrank_linear(x, U, V, b)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, lowrank_linear_reference(x, U, V, b), torch.bfloat16)


def test_torch_compile_fullgraph():
    layer = LowRankLinear(37, 29, 6).to(DEVICE)
    x = torch.randn(2, 11, 37, device=DEVICE, requires_grad=True)
    with lrkd_fast.set_backend("triton"):
        compiled = torch.compile(layer, fullgraph=True)
        y = compiled(x)
        y.square().sum().backward()
    grads = [p.grad.clone() for p in (x, layer.U, layer.V, layer.bias)]
    for p in (x, layer.U, layer.V, layer.bias):
        p.grad = None
    with lrkd_fast.set_backend("eager"):
        y_ref = layer(x)
        y_ref.square().sum().backward()
    assert_close_rel(y, y_ref)
    for g, p in zip(grads, (x, layer.U, layer.V, layer.bias)):
        assert_close_rel(g, p.grad)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(m=st.integers(0, 70), d_in=st.integers(1, 90), r=st.integers(1, 40), d_out=st.integers(1, 70),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_any_shape_matches_float64(m, d_in, r, d_out, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d_in, generator=g, requires_grad=True)
    U = torch.randn(d_in, r, generator=g, requires_grad=True)
    V = torch.randn(r, d_out, generator=g, requires_grad=True)
    b = torch.randn(d_out, generator=g, requires_grad=True) if bias else None
    with lrkd_fast.set_backend("triton"):
        y = lowrank_linear(x, U, V, b)
    gy = torch.randn(m, d_out, generator=g)
    y.backward(gy)
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, U, V, b)]
    y64 = lowrank_linear_reference(*ref)
    y64.backward(gy.double())
    if m:
        assert_close_rel(y, y64, torch.float32, "y")
        for t, r64 in zip((x, U, V, b), ref):
            if t is not None:
                assert_close_rel(t.grad, r64.grad, torch.float32, "grad")
    else:
        assert y.shape == (0, d_out) and not U.grad.any() and not V.grad.any()
