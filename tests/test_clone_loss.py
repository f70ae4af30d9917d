"""clone_loss: the fused Triton path (interpreted on CPU) against the eager reference, on the loss,
the per-term values and every gradient (students and P)."""
import pytest
import torch

import lrkd_fast
from lrkd_fast.kernels.clone_loss import grouped_mse, projected_mse
from lrkd_fast.ops.clone_loss import CloneLoss, clone_loss, clone_loss_reference, clone_mse
from tests.conftest import DEVICE, DTYPES, assert_close_rel


def _layer(lead, dtype, seed=0, widths=(37, 53, 97), proj=((61, 29), (45, 29))):
    """A layer's worth of pairs: direct pairs of the given widths, projected (d_T, d_S) pairs."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    pairs = [(r(*lead, d).requires_grad_(), r(*lead, d)) for d in widths]
    for d_t, d_s in proj:
        pairs.append((r(*lead, d_s).requires_grad_(), r(*lead, d_t), r(d_t, d_s, scale=d_t ** -0.5).requires_grad_()))
    return pairs


def _trainable(pairs):
    out = []
    for p in pairs:
        out.append(p[0])
        if len(p) == 3:
            out.append(p[2])
    return out


def _run(pairs, backend, factor=1.0, **kw):
    for x in _trainable(pairs):
        x.grad = None
    with lrkd_fast.set_backend(backend):
        loss, terms = clone_loss(pairs, return_terms=True, **kw)
    (loss * factor).backward()
    return loss.detach(), terms, [x.grad.clone() for x in _trainable(pairs)]


def _compare(pairs, dtype, factor=1.0, **kw):
    loss, terms, grads = _run(pairs, "triton", factor, **kw)
    ref_loss, ref_terms, ref_grads = _run(pairs, "eager", factor, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert not terms.requires_grad
    assert_close_rel(loss, ref_loss, dtype, "loss")
    assert_close_rel(terms, ref_terms, dtype, "terms")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == dtype
        assert_close_rel(a, e, dtype, f"grad {i}")
    return loss, terms, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(41,), (2, 19)], ids=["2d", "3d"])
def test_matches_reference(dtype, lead):
    pairs = _layer(lead, dtype)
    loss, terms, _ = _compare(pairs, dtype, alpha=0.7, weights=[1.0, 0.5, 2.0, 1.5, 0.25], factor=3.5)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25], device=terms.device)
    torch.testing.assert_close(loss, 0.7 * (w * terms).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mask_and_reductions(dtype, reduction):
    pairs = _layer((2, 19), dtype, seed=1)
    mask = torch.rand(2, 19, generator=torch.Generator().manual_seed(2)) > 0.4
    _, _, grads = _compare(pairs, dtype, mask=mask.to(DEVICE), reduction=reduction, alpha=0.2)
    # padded rows get exactly zero gradient
    for gr in grads[0:3]:
        assert (gr[~mask.to(DEVICE)] == 0).all()
    # a 0/1 float mask over the flattened tokens means the same
    _compare(pairs, dtype, mask=mask.reshape(-1).to(DEVICE, torch.float32), reduction=reduction, alpha=0.2)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_all_masked(backend):
    pairs = _layer((3, 7), torch.float32, widths=(37,), proj=((53, 21),))
    mask = torch.zeros(3, 7, dtype=torch.bool, device=DEVICE)
    loss, terms, grads = _run(pairs, backend, mask=mask)
    assert loss.item() == 0.0 and (terms == 0).all()
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()


def test_deterministic():
    pairs = _layer((2, 23), torch.float32, seed=3)
    mask = (torch.rand(2, 23, generator=torch.Generator().manual_seed(4)) > 0.3).to(DEVICE)
    a = _run(pairs, "triton", 2.0, mask=mask)
    b = _run(pairs, "triton", 2.0, mask=mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_teacher_gets_no_grad_and_only_needed_grads():
    pairs = _layer((29,), torch.float32, widths=(37,), proj=((53, 21),))
    for p in pairs:
        p[1].requires_grad_()
    pairs[0][0].requires_grad_(False)  # a frozen student: its gradient is never formed
    loss = clone_loss(pairs)
    loss.backward()
    assert all(p[1].grad is None for p in pairs)
    assert pairs[0][0].grad is None and pairs[1][0].grad is not None and pairs[1][2].grad is not None
    ref = clone_loss_reference(pairs)
    torch.testing.assert_close(loss, ref)


def test_shared_proj_and_clone_mse_and_module():
    s1, t1, P = _layer((31,), torch.float32, widths=(), proj=((53, 21),))[0]
    s2, t2 = torch.randn(31, 21, device=DEVICE).requires_grad_(), torch.randn(31, 53, device=DEVICE)
    pairs = [(s1, t1, P), (s2, t2, P)]
    _compare(pairs, torch.float32, weights=[1.0, 3.0])
    one = clone_mse(s1, t1, P, weight=2.0)
    torch.testing.assert_close(one, 2.0 * clone_loss_reference([(s1, t1, P)]))
    mod = CloneLoss(alpha=0.5, reduction="sum", weights=[1.0, 3.0])
    torch.testing.assert_close(mod(pairs), clone_loss_reference(pairs, 0.5, reduction="sum", weights=[1.0, 3.0]))
    assert "alpha=0.5" in repr(mod)


def test_float64_runs_eagerly_and_gradcheck():
    pairs = _layer((2, 5), torch.float64, widths=(7,), proj=((6, 4),))
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 1, 1]], device=DEVICE)
    loss = clone_loss(pairs, mask=mask)  # auto backend: fp64 is not a Triton dtype
    assert loss.dtype == torch.float64
    (s1, t1), (s2, t2, P) = pairs

    def f(s1, s2, P):
        return clone_loss_reference([(s1, t1), (s2, t2, P)], alpha=0.3, mask=mask, weights=[1.0, 2.0])
    assert torch.autograd.gradcheck(f, (s1, s2, P))


def test_compile_fullgraph():
    pairs = _layer((23,), torch.float32, widths=(37,), proj=((45, 21),))
    (s1, t1), (s2, t2, P) = pairs
    mask = torch.rand(23, generator=torch.Generator().manual_seed(5)).to(DEVICE) > 0.3

    def f(s1, t1, s2, t2, P, mask):
        return clone_loss([(s1, t1), (s2, t2, P)], alpha=0.5, mask=mask)
    # aot_eager traces through dynamo + AOTAutograd (the fake impl and the registered autograd)
    # without inductor's C++ build, which alone takes ~25 s on two CPU cores.
    with lrkd_fast.set_backend("triton"):
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(s1, t1, s2, t2, P, mask)
    loss.backward()
    got = [s1.grad, s2.grad, P.grad]
    for x in (s1, s2, P):
        x.grad = None
    ref = clone_loss_reference([(s1, t1), (s2, t2, P)], alpha=0.5, mask=mask)
    ref.backward()
    assert_close_rel(loss, ref)
    for a, x in zip(got, (s1, s2, P)):
        assert_close_rel(a, x.grad)


def test_kernels_directly():
    """The launchers on their own: mixed widths in one grouped launch, non-contiguous inputs."""
    S = [torch.randn(37, 13).t(), torch.randn(13, 1030), torch.randn(13, 5)]
    T = [torch.randn(37, 13).t(), torch.randn(13, 1030), torch.randn(13, 5)]
    mask = (torch.rand(13) > 0.5).to(torch.uint8)
    sums, grads = grouped_mse(S, T, torch.tensor([1.0, 2.0, 3.0]), mask, [True, False, True])
    assert grads[1] is None
    keep = mask.bool()[:, None]
    for i, (s, t) in enumerate(zip(S, T)):
        d = torch.where(keep, s - t, 0.0)
        torch.testing.assert_close(sums[i], d.square().sum())
        if grads[i] is not None:
            torch.testing.assert_close(grads[i], (i + 1.0) * d)
    s, t, P = torch.randn(50, 21), torch.randn(53, 50).t(), torch.randn(21, 53).t()
    total, G = projected_mse(s, t, P, torch.tensor([0.5]))
    d = s - t @ P
    torch.testing.assert_close(total, d.square().sum(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(G, 0.5 * d, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        grouped_mse([S[0]], [T[1]], torch.ones(1))


def test_bad_inputs():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    s2, t2, P = torch.randn(4, 3), torch.randn(4, 6), torch.randn(6, 3)
    with pytest.raises(ValueError, match="empty"):
        clone_loss([])
    with pytest.raises(ValueError, match=r"pairs\[1\] student shape"):
        clone_loss([(s, t), (torch.randn(4, 7), t)])
    with pytest.raises(ValueError, match=r"pairs\[0\] proj must have shape"):
        clone_loss([(s2, t2, torch.randn(3, 6))])
    with pytest.raises(ValueError, match="leading"):
        clone_loss([(s2, torch.randn(5, 6), P)])
    with pytest.raises(TypeError, match=r"pairs\[0\] teacher has dtype"):
        clone_loss([(s, t.half())])
    with pytest.raises(ValueError, match=r"pairs\[0\] teacher is on meta"):
        clone_loss([(s, t.to("meta"))])
    with pytest.raises(ValueError, match=r"pairs\[1\] student is on meta"):
        clone_loss([(s, t), (s.to("meta"), t.to("meta"))])
    with pytest.raises(ValueError, match="mask shape"):
        clone_loss([(s, t)], mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights has 1"):
        clone_loss([(s, t), (s, t)], weights=[1.0])
    with pytest.raises(ValueError, match="reduction"):
        clone_loss([(s, t)], reduction="none")
    with pytest.raises(TypeError, match=r"pairs\[0\] must be"):
        clone_loss([(s,)])
    with pytest.raises(TypeError, match=r"pairs\[0\] student must be a floating"):
        clone_loss([(torch.ones(4, 8, dtype=torch.long), t)])


def test_autocast_bf16():
    """Under autocast a projected pair runs in the autocast dtype (an fp32 P is cast, as t @ P would
    be); on CPU this also exercises the bf16 kernels (dot operands upcast when interpreted)."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(40, 21, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    t = torch.randn(40, 53, generator=g).to(DEVICE, torch.bfloat16)
    P = (torch.randn(53, 21, generator=g) * 53 ** -0.5).to(DEVICE).requires_grad_()
    s2 = torch.randn(40, 30, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    t2 = torch.randn(40, 30, generator=g).to(DEVICE, torch.bfloat16)
    pairs = [(s, t, P), (s2, t2)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, _, grads = _run(pairs, "triton")
        ref, _, ref_grads = _run(pairs, "eager")
    assert P.grad.dtype == torch.float32
    assert_close_rel(loss, ref, torch.bfloat16, "loss")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close_rel(a, e, torch.bfloat16, f"grad {i}")


@pytest.mark.parametrize("proj", [(), ((61, 29),)], ids=["direct-only", "projected-only"])
def test_direct_only_and_projected_only_groups(proj):
    # a layer with no projected pair (or only projected pairs) must backpropagate too
    widths = (37, 53) if not proj else ()
    pairs = _layer((23,), torch.float32, widths=widths, proj=proj)
    _compare(pairs, torch.float32, factor=2.0)


def test_masked_rows_wider_than_a_program_block():
    # rows of 1500 elements span program blocks (1024 elements interpreted, 8192 on a GPU): the
    # in-kernel row index (fp32 quotient with exact correction) must still pick the right mask entry
    pairs = _layer((13,), torch.float32, widths=(1500, 7), proj=())
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 1], dtype=torch.bool, device=DEVICE)
    _compare(pairs, torch.float32, mask=mask, factor=0.5)


def test_second_derivatives_and_a_second_backward_raise_instead_of_being_wrong():
    pairs = _layer((9,), torch.float32)
    with lrkd_fast.set_backend("triton"):
        loss = clone_loss(pairs)
        with pytest.raises(RuntimeError, match="second derivatives"):
            torch.autograd.grad(loss, [pairs[0][0]], create_graph=True)
        loss = clone_loss(pairs)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="one backward per forward|modified by an inplace operation"):
            loss.backward()
    # the eager reference gives the true Hessian-vector product: 2 / numel per element for a direct term
    s, t = pairs[0][0], pairs[0][1]
    with lrkd_fast.set_backend("eager"):
        (g,) = torch.autograd.grad(clone_loss([(s, t)]), [s], create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), [s])
    assert torch.allclose(hv, torch.full_like(s, 2.0 / s.numel()))


def test_per_term_constants_are_made_once_per_value():
    from lrkd_fast.ops.clone_loss import _CONSTANTS, _device_constants

    pairs = _layer((9,), torch.float32)
    with lrkd_fast.set_backend("triton"):
        clone_loss(pairs, alpha=0.3).backward()
        before = len(_CONSTANTS)
        clone_loss(pairs, alpha=0.3).backward()  # a second step copies nothing new to the device
    assert len(_CONSTANTS) == before
    a = _device_constants((1.0, 2.0), torch.device(DEVICE))
    assert a is _device_constants((1.0, 2.0), torch.device(DEVICE))
    assert a.tolist() == [1.0, 2.0] and a.dtype == torch.float64


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_empty_batch_without_mask_is_zero_on_every_backend(backend):
    s = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    with lrkd_fast.set_backend(backend):
        loss = clone_loss([(s, torch.randn(0, 5, device=DEVICE))])
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, 5)
