"""kd_loss: the fused path (Triton, interpreted on CPU) against the eager reference, value and
every student gradient; the reference against the LRC formula and gradcheck; bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import lrkd_fast
from lrkd_fast.ops.kd_loss import KDLoss, kd_loss, kd_loss_reference

from .conftest import DEVICE, DTYPES, assert_close_rel

D_S, D_T = 24, 40


def make(N=16, V=1037, V_T=None, dtype=torch.float32, lead=None, bias=True, ignore_every=4, scale=1.0):
    """Student/teacher tensors on DEVICE; the student ones require grad."""
    g = torch.Generator().manual_seed(1234)
    V_T = V_T or V

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(DEVICE, dtype)

    hs = r(N, D_S, s=scale).requires_grad_()
    ws = r(V, D_S, s=0.4).requires_grad_()
    bs = r(V, s=0.1).requires_grad_() if bias else None
    ht, wt = r(N, D_T), r(V_T, D_T, s=0.4)
    bt = r(V_T, s=0.1) if bias else None
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    if ignore_every:
        labels[::ignore_every] = -100
    if lead is not None:
        hs = hs.detach().reshape(*lead, D_S).requires_grad_()
        ht = ht.reshape(*lead, D_T)
        labels = labels.reshape(lead)
    return dict(student_hidden=hs, student_weight=ws, student_bias=bs, labels=labels,
                teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt)


def student(inp):
    return [inp[k] for k in ("student_hidden", "student_weight", "student_bias") if inp[k] is not None]


def run(fn, inp, grad_scale=1.0, **opts):
    """Loss and student gradients of fn(**inp, **opts) * grad_scale (grad_scale != 1: grad_output != 1)."""
    loss = fn(inp["student_hidden"], inp["student_weight"], inp["labels"],
              **{k: v for k, v in inp.items() if k not in ("student_hidden", "student_weight", "labels")}, **opts)
    grads = torch.autograd.grad(loss * grad_scale, student(inp))
    return loss.detach(), grads


def upcast(inp):
    """fp32 leaf copies of the same (already rounded) values: the reference's input."""
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().float().requires_grad_(v.requires_grad)
        out[k] = v
    return out


def fused(*args, **kw):
    with lrkd_fast.set_backend("triton"):
        return kd_loss(*args, **kw)


def check(inp, dtype=torch.float32, grad_scale=1.0, **opts):
    loss, grads = run(fused, inp, grad_scale, **opts)
    ref_opts = {k: v for k, v in opts.items() if k not in ("chunk_size", "teacher_vocab", "grad_weight_fp32")}
    ref_inp = upcast(inp)
    ref_loss, ref_grads = run(kd_loss_reference, ref_inp, grad_scale, **ref_opts)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_rel(loss, ref_loss, dtype, "loss")
    for name, g, rg, t in zip(("grad student_hidden", "grad student_weight", "grad student_bias"), grads, ref_grads,
                              student(inp)):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close_rel(g, rg, dtype, name)
    return loss, grads


# ---------------------------------------------------------------------------- fused vs reference

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,V", [(1.0, 1000), (2.0, 1037), (40.0, 1037)])
def test_matches_reference(dtype, T, V):
    # several chunks (chunk_size 6 over 16 rows, last one partial), ignored rows, biases, grad_output 1.7
    check(make(V=V, dtype=dtype), dtype, grad_scale=1.7, temperature=T, chunk_size=6)


OPTIONS = [
    dict(reduction="sum"),
    dict(reduction="batchmean", batch_size=4),
    dict(reduction="batchmean", ce_reduction="sum", batch_size=3),
    dict(kl_weight=0.3, ce_weight=2.5),
    dict(ce_weight=0.0),
    dict(kl_on_ignored=True),
    dict(kl_on_ignored=True, reduction="batchmean", batch_size=2),
    dict(t2_scale=True, temperature=4.0),
    dict(reverse=True, temperature=2.0),
    dict(reverse=True, kl_on_ignored=True, reduction="sum", temperature=40.0),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options(opts):
    check(make(N=12), grad_scale=0.6, chunk_size=5, **opts)


def test_batch_seq_leading_dims_and_inferred_batch_size():
    inp = make(N=12, lead=(3, 4))
    loss, grads = check(inp, reduction="batchmean", chunk_size=5)
    assert grads[0].shape == (3, 4, D_S)
    # batch_size defaults to B for (B, L, d) inputs
    flat = make(N=12)
    loss_flat, _ = run(fused, flat, reduction="batchmean", batch_size=3)
    assert_close_rel(loss, loss_flat)


def test_no_labels_means_kl_only_on_every_row():
    inp = make(N=10)
    inp["labels"] = None
    loss, _ = check(inp, temperature=2.0, ce_weight=5.0)
    inp2 = make(N=10)
    inp2["labels"][:] = 0
    ref, _ = run(kd_loss_reference, upcast(inp2), temperature=2.0, ce_weight=0.0)
    assert_close_rel(loss, ref)


@pytest.mark.parametrize("kl_on_ignored", [False, True])
def test_all_rows_ignored(kl_on_ignored):
    inp = make(N=9)
    inp["labels"][:] = -100
    loss, grads = run(fused, inp, chunk_size=4, kl_on_ignored=kl_on_ignored)
    ref_loss, ref_grads = run(kd_loss_reference, upcast(inp), kl_on_ignored=kl_on_ignored)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    if kl_on_ignored:
        assert loss > 0
        for g, rg in zip(grads, ref_grads):
            assert_close_rel(g, rg)
    else:
        assert loss.item() == 0.0 and ref_loss.item() == 0.0
        assert all((g == 0).all() for g in grads) and all((g == 0).all() for g in ref_grads)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_int32_labels_and_empty_batch(backend):
    inp = make(N=6, V=300)
    ref, _ = run(kd_loss_reference, upcast(inp), temperature=2.0)
    inp["labels"] = inp["labels"].to(torch.int32)
    with lrkd_fast.set_backend(backend):
        loss, _ = run(kd_loss, inp, temperature=2.0)
        assert_close_rel(loss, ref)
        empty = make(N=0, V=300)
        loss, grads = run(kd_loss, empty)
    assert loss.item() == 0.0 and grads[1].abs().sum() == 0


def test_chunk_sizes_agree():
    inp = make(N=13)
    results = [run(fused, inp, temperature=3.0, chunk_size=c) for c in (1, 4, 13, None)]
    for loss, grads in results[1:]:
        assert_close_rel(loss, results[0][0])
        for g, g0 in zip(grads, results[0][1]):
            assert_close_rel(g, g0)


def test_grad_weight_fp32_accumulation():
    inp = make(N=12, dtype=torch.float16)
    check(inp, torch.float16, chunk_size=3, grad_weight_fp32=True, temperature=2.0)


# ---------------------------------------------------------------------------- teacher forms

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_precomputed_teacher_logits(dtype):
    inp = make(N=12, V=1000, dtype=dtype)
    with torch.no_grad():
        logits = F.linear(inp.pop("teacher_hidden").float(), inp.pop("teacher_weight").float(),
                          inp.pop("teacher_bias").float())
    inp["teacher_logits"] = logits  # fp32 teacher logits beside a (possibly) half-precision student
    check(inp, dtype, temperature=2.0, chunk_size=5)


def test_teacher_vocab_larger_than_student():
    inp = make(N=12, V=1000, V_T=1037)
    loss, _ = check(inp, temperature=2.0, chunk_size=5)
    # identical to a teacher that never had the extra rows: the first V logits, renormalized
    cut = dict(inp, teacher_weight=inp["teacher_weight"][:1000], teacher_bias=inp["teacher_bias"][:1000])
    loss_cut, _ = run(fused, cut, temperature=2.0)
    assert_close_rel(loss, loss_cut)
    # and the precomputed-logits form with the padded vocabulary agrees
    logits = F.linear(inp["teacher_hidden"], inp["teacher_weight"], inp["teacher_bias"])
    as_logits = {k: v for k, v in inp.items() if not k.startswith("teacher")}
    loss_logits, _ = run(fused, dict(as_logits, teacher_logits=logits), temperature=2.0, chunk_size=5)
    assert_close_rel(loss_logits, loss)
    with pytest.raises(ValueError, match="teacher_vocab='strict'"):
        run(fused, inp, teacher_vocab="strict")


def test_teacher_gets_no_gradient():
    inp = make(N=8)
    inp["teacher_hidden"].requires_grad_()
    inp["teacher_weight"].requires_grad_()
    loss = fused(inp["student_hidden"], inp["student_weight"], inp["labels"], teacher_hidden=inp["teacher_hidden"],
                 teacher_weight=inp["teacher_weight"])
    loss.backward()
    assert inp["teacher_hidden"].grad is None and inp["teacher_weight"].grad is None
    assert inp["student_hidden"].grad is not None


# ---------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("T", [1.0, 40.0])
def test_large_magnitude_logits_fp16(T):
    """Logits of ~1e4 in fp16 (exp overflows fp16 beyond ~11): built from small integers so that
    every logit is exactly representable and fused and reference see the same values."""
    g = torch.Generator().manual_seed(7)
    N, V, d = 10, 1037, 16
    hs = torch.randint(-4, 5, (N, d), generator=g).to(DEVICE, torch.float16).requires_grad_()
    ws = (16 * torch.randint(-20, 21, (V, d), generator=g)).to(DEVICE, torch.float16).requires_grad_()
    ht = torch.randint(-4, 5, (N, d), generator=g).to(DEVICE, torch.float16)
    wt = (16 * torch.randint(-20, 21, (V, d), generator=g)).to(DEVICE, torch.float16)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    s = (hs.detach() @ ws.detach().t())
    assert s.abs().max() > 5000 and torch.isinf(torch.exp(s)).any()  # naive fp16 softmax would overflow
    inp = dict(student_hidden=hs, student_weight=ws, student_bias=None, labels=labels, teacher_hidden=ht,
               teacher_weight=wt, teacher_bias=None)
    check(inp, torch.float16, temperature=T, chunk_size=4)


def test_reference_is_the_lrc_formula():
    """batchmean KL (sum over tokens and vocabulary / B) + token-mean CE, as in the LRC code."""
    B, L, V, T = 2, 5, 50, 40.0
    hs = torch.randn(B, L, D_S, dtype=torch.float64)
    ws, ht, wt = torch.randn(V, D_S, dtype=torch.float64), torch.randn(B, L, D_T, dtype=torch.float64), \
        torch.randn(V, D_T, dtype=torch.float64)
    labels = torch.randint(0, V, (B, L))
    s, t = hs @ ws.t(), ht @ wt.t()
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                        reduction="batchmean") + F.cross_entropy(s.reshape(-1, V), labels.reshape(-1))
    got = kd_loss_reference(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, temperature=T,
                            reduction="batchmean")
    torch.testing.assert_close(got, expected)
    with lrkd_fast.set_backend("eager"):  # the public function's eager path is the reference
        torch.testing.assert_close(kd_loss(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, temperature=T,
                                           reduction="batchmean"), expected)


@pytest.mark.parametrize("opts", [dict(temperature=3.0), dict(reverse=True, temperature=2.0, kl_on_ignored=True),
                                  dict(reduction="sum", t2_scale=True, temperature=2.0)])
def test_reference_gradcheck(opts):
    g = torch.Generator().manual_seed(3)
    N, V, ds, dt = 5, 11, 4, 6
    hs = torch.randn(N, ds, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, ds, generator=g, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(N, dt, generator=g, dtype=torch.float64), torch.randn(V + 2, dt, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = -100
    assert torch.autograd.gradcheck(
        lambda a, b, c: kd_loss_reference(a, b, labels, teacher_hidden=ht, teacher_weight=wt, student_bias=c, **opts),
        (hs, ws, bs))


# ---------------------------------------------------------------------------- modes and API

def test_no_grad_and_frozen_weight():
    inp = make(N=8)
    ref, _ = run(kd_loss_reference, upcast(inp), temperature=2.0)
    with torch.no_grad():
        loss = fused(inp["student_hidden"], inp["student_weight"], inp["labels"], teacher_hidden=inp["teacher_hidden"],
                     teacher_weight=inp["teacher_weight"], student_bias=inp["student_bias"],
                     teacher_bias=inp["teacher_bias"], temperature=2.0)
    assert not loss.requires_grad
    assert_close_rel(loss, ref)
    # only the hidden states train (frozen head): the weight gets no gradient
    ws = inp["student_weight"].detach()
    loss = fused(inp["student_hidden"], ws, inp["labels"], teacher_hidden=inp["teacher_hidden"],
                 teacher_weight=inp["teacher_weight"], temperature=2.0, student_bias=inp["student_bias"],
                 teacher_bias=inp["teacher_bias"])
    (gh,) = torch.autograd.grad(loss, inp["student_hidden"])
    _, ref_grads = run(kd_loss_reference, upcast(inp), temperature=2.0)
    assert_close_rel(gh, ref_grads[0])


def test_module():
    inp = make(N=8)
    mod = KDLoss(temperature=2.0, kl_weight=0.5, reduction="sum", chunk_size=3)
    assert "temperature=2.0" in repr(mod)
    with lrkd_fast.set_backend("triton"):
        loss = mod(inp["student_hidden"], inp["student_weight"], inp["labels"], teacher_hidden=inp["teacher_hidden"],
                   teacher_weight=inp["teacher_weight"])
    ref = kd_loss_reference(inp["student_hidden"], inp["student_weight"], inp["labels"],
                            teacher_hidden=inp["teacher_hidden"], teacher_weight=inp["teacher_weight"],
                            temperature=2.0, kl_weight=0.5, reduction="sum")
    assert_close_rel(loss, ref)


def test_torch_compile_fullgraph():
    inp = make(N=8, V=300)

    def f(hs, ws, labels, ht, wt):
        return kd_loss(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, temperature=2.0, chunk_size=3)

    args = (inp["student_hidden"], inp["student_weight"], inp["labels"], inp["teacher_hidden"], inp["teacher_weight"])
    with lrkd_fast.set_backend("triton"):
        loss = torch.compile(f, fullgraph=True)(*args)
        grads = torch.autograd.grad(loss * 2.0, args[:2])
    ref = kd_loss_reference(*args[:3], teacher_hidden=args[3], teacher_weight=args[4], temperature=2.0)
    ref_grads = torch.autograd.grad(ref * 2.0, args[:2])
    assert_close_rel(loss, ref)
    for g, rg in zip(grads, ref_grads):
        assert_close_rel(g, rg)


# ---------------------------------------------------------------------------- bad inputs

def _bad(name):
    inp = make(N=6, V=50, lead=(2, 3))
    hs, ws, lab = inp["student_hidden"], inp["student_weight"], inp["labels"]
    T = dict(teacher_hidden=inp["teacher_hidden"], teacher_weight=inp["teacher_weight"])
    logits = torch.randn(2, 3, 50, device=DEVICE)
    return {
        "width": ((hs[..., :-1], ws, lab), T, ValueError, "student_hidden has 23 features"),
        "label_range": ((hs, ws, torch.full_like(lab, 50)), T, ValueError, "labels must lie in"),
        "label_negative": ((hs, ws, torch.full_like(lab, -3)), T, ValueError, "labels must lie in"),
        "label_dtype": ((hs, ws, lab.float()), T, TypeError, "labels must be an integer"),
        "label_shape": ((hs, ws, lab.reshape(-1)), T, ValueError, "labels shape"),
        "temperature": ((hs, ws, lab), dict(T, temperature=0.0), ValueError, "temperature"),
        "temperature_neg": ((hs, ws, lab), dict(T, temperature=-1.0), ValueError, "temperature"),
        "no_teacher": ((hs, ws, lab), {}, ValueError, "a teacher is required"),
        "both_teachers": ((hs, ws, lab), dict(T, teacher_logits=logits), ValueError, "not both"),
        "half_teacher": ((hs, ws, lab), dict(teacher_hidden=T["teacher_hidden"]), ValueError, "without teacher_weight"),
        "batchmean": ((hs.reshape(6, D_S), ws, lab.reshape(6)),
                      dict(teacher_hidden=T["teacher_hidden"].reshape(6, D_T), teacher_weight=T["teacher_weight"]),
                      ValueError, "batch_size is required"),
        "teacher_rows": ((hs, ws, lab), dict(T, teacher_hidden=T["teacher_hidden"][:, :2]), ValueError,
                         "teacher_hidden rows"),
        "teacher_width": ((hs, ws, lab), dict(T, teacher_weight=T["teacher_weight"][:, :-1]), ValueError,
                          "teacher_weight has d_T"),
        "logits_rows": ((hs, ws, lab), dict(teacher_logits=logits[:1]), ValueError, "teacher_logits rows"),
        "teacher_vocab_small": ((hs, ws, lab), dict(teacher_logits=logits[..., :49]), ValueError,
                                "smaller than the student"),
        "reduction": ((hs, ws, lab), dict(T, reduction="avg"), ValueError, "reduction must be"),
        "weight_dtype": ((hs, ws.double(), lab), T, TypeError, "student_weight has dtype"),
        "bias_shape": ((hs, ws, lab), dict(T, student_bias=torch.zeros(49, device=DEVICE)), ValueError, "student_bias"),
    }[name] + (name,)


BAD = ["width", "label_range", "label_negative", "label_dtype", "label_shape", "temperature", "temperature_neg",
       "no_teacher", "both_teachers", "half_teacher", "batchmean", "teacher_rows", "teacher_width", "logits_rows",
       "teacher_vocab_small", "reduction", "weight_dtype", "bias_shape"]


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs(name):
    args, kw, exc, match, _ = _bad(name)
    if name == "batchmean":
        kw = dict(kw, reduction="batchmean")
    with pytest.raises(exc, match=match):
        kd_loss(*args, **kw)


def test_second_derivatives_and_a_second_backward_raise():
    inp = make(N=8)
    loss = fused(inp["student_hidden"], inp["student_weight"], inp["labels"], teacher_hidden=inp["teacher_hidden"],
                 teacher_weight=inp["teacher_weight"], temperature=2.0)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(loss, [inp["student_hidden"]], create_graph=True)
    loss = fused(inp["student_hidden"], inp["student_weight"], inp["labels"], teacher_hidden=inp["teacher_hidden"],
                 teacher_weight=inp["teacher_weight"], temperature=2.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward|modified by an inplace operation"):
        loss.backward()


def test_chunk_rows_fill_the_memory_budget_at_the_canonical_shape():
    from lrkd_fast.ops.kd_loss import KD_MEMORY_BUDGET, _auto_chunk_rows

    N, V, d_s, d_t = 8192, 128256, 1536, 3072
    grad_bytes = 2 * N * d_s + 2 * V * d_s  # dh and dW in bf16
    rows = _auto_chunk_rows(N, V, d_s, d_t, 2, grad_bytes)
    assert rows % 128 == 0
    used = grad_bytes + rows * (2 * 2 * V + 4)
    assert used <= KD_MEMORY_BUDGET < used + 128 * (2 * 2 * V + 4)  # the largest 128-row multiple that fits
    assert -(-N // rows) <= 8  # the heads are re-read at most 8 times (22 with 384-row chunks)
    # small problems: one chunk; a budget smaller than the gradients still makes progress
    assert _auto_chunk_rows(16, 1037, 24, 40, 4, 0) == 16
    assert _auto_chunk_rows(1000, V, d_s, d_t, 2, 2 * KD_MEMORY_BUDGET) == 128


@pytest.mark.parametrize("reverse", [False, True])
def test_masked_teacher_vocabulary_of_minus_inf(reverse):
    # a teacher that rules tokens out (-inf logits, including a whole first vocabulary block):
    # 0 log 0 = 0, so the loss and every gradient stay finite and match the reference
    inp = make(N=6, V=600)
    t = inp["student_hidden"].new_tensor(torch.randn(6, 600)).detach()
    t[:, :40] = float("-inf")
    t[0, :300] = float("-inf")
    inp = dict(inp, teacher_hidden=None, teacher_weight=None, teacher_bias=None, teacher_logits=t)
    if not reverse:
        loss, _ = check(inp, temperature=2.0, chunk_size=4)
        assert torch.isfinite(loss)
        return
    # reverse: the student puts mass where the teacher has none, so KL(q || p) is infinite on both
    for backend in ("eager", "triton"):
        with lrkd_fast.set_backend(backend):
            r = kd_loss(inp["student_hidden"], inp["student_weight"], inp["labels"], teacher_logits=t,
                        student_bias=inp["student_bias"], temperature=2.0, reverse=True, chunk_size=4)
        assert torch.isinf(r) and r > 0, backend


@pytest.mark.parametrize("T", [float("inf"), float("nan"), 0.0, -1.0])
def test_non_finite_or_non_positive_temperature_is_rejected(T):
    inp = make(N=4)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        kd_loss(inp["student_hidden"], inp["student_weight"], inp["labels"], teacher_hidden=inp["teacher_hidden"],
                teacher_weight=inp["teacher_weight"], temperature=T)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        KDLoss(temperature=T)
