"""Property tests of every public op (lrkd_fast.ops: lowrank_linear, clone_loss, kd_loss): random
small shapes (0- and 1-size dims included), strided operands, fp32 and fp16. The Triton path (the
interpreter on CPU) and the eager path are each checked against a float64 reference written here,
value and gradients, and against each other.

Few examples per property (the interpreter is slow); ``LRKD_PROPERTY_EXAMPLES`` raises the count
for a longer local search.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings, strategies as st

import lrkd_fast
from lrkd_fast import clone_loss, kd_loss, lowrank_linear
from lrkd_fast.ops.cost_model import PATHS
from lrkd_fast.ops.lowrank_linear import lowrank_path
from tests.conftest import DEVICE, RTOL

EXAMPLES = int(os.environ.get("LRKD_PROPERTY_EXAMPLES", "12"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float16])


def close(actual, expected, dtype, what, spread=0.0):
    """max |a - e| <= RTOL[dtype] * max |e| + 10 * spread, where ``spread`` is how far the float64
    reference itself moves when its inputs move by one ulp of ``dtype`` (see :func:`reference`): a
    result that cancels (a small sum of large terms, a KL between nearly equal distributions) is then
    held to what ``dtype`` can resolve, and a reference of exact zeros to exact zeros. Any size, 0 too."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if e.numel() == 0:
        return
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    assert err <= RTOL[dtype] * scale + 10 * spread, \
        f"{what}: max error {err:.3g} vs max |reference| {scale:.3g}, reference spread {spread:.3g} ({dtype})"


def _max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def reference(fn, diff, const, grad_out, dtype, seed):
    """The float64 reference ``fn(*diff, *const)``: (value, gradients for ``diff``, spreads). A spread is
    the largest change of the value (or of each gradient) over two runs with every input multiplied by
    1 +- eps(dtype), random signs: what rounding the inputs or intermediates to ``dtype`` can move."""
    def run(cast):
        d = [None if t is None else cast(t).detach().requires_grad_() for t in diff]
        c = [None if t is None else cast(t) for t in const]
        out = fn(*d, *c)
        return out.detach(), grads(out, d, grad_out.double())

    value, gradients = run(lambda t: t.detach().double())
    eps = torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(seed)

    def jitter(t):
        sign = torch.randint(0, 2, t.shape, generator=g).to(t.device, torch.float64) * 2 - 1
        return t.detach().double() * (1 + eps * sign)

    spreads = [0.0] * (1 + len(diff))
    for _ in range(2):
        v, gs = run(jitter)
        spreads[0] = max(spreads[0], _max_abs(torch.nan_to_num(v - value, posinf=0.0, neginf=0.0)))
        for i, (a, b) in enumerate(zip(gs, gradients)):
            if a is not None:
                spreads[i + 1] = max(spreads[i + 1], _max_abs(a - b))
    return value, gradients, spreads


def strided(g, shape, dtype, how, scale=1.0):
    """A tensor of ``shape`` with values N(0, scale^2) rounded to ``dtype``, laid out as ``how`` says:
    "contiguous", "sliced" (every other element of a wider last dim) or "transposed" (a .t() / .mT view)."""
    shape = tuple(shape)
    if how == "sliced" and shape:
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * scale
        return base.to(DEVICE, dtype)[..., ::2]
    if how == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g) * scale
        return base.to(DEVICE, dtype).transpose(-1, -2)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def grads(out, inputs, grad_out):
    """Gradients of ``out`` (with incoming gradient ``grad_out``) for every input that is not None."""
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, live, grad_out, allow_unused=True)
    got = [torch.zeros_like(t) if g is None else g for t, g in zip(live, got)]
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


def run_backends(fn, inputs, grad_out, **ctx):
    """{backend: (output, gradients)} of ``fn(*inputs)`` on the Triton and the eager path."""
    res = {}
    for backend in ("triton", "eager"):
        live = [None if t is None else t.detach().requires_grad_() if t.is_leaf else t for t in inputs]
        with lrkd_fast.set_backend(backend), lowrank_path(ctx.get("path")):
            out = fn(*live)
        res[backend] = (out.detach(), grads(out, live, grad_out.to(out.dtype)))
    return res


def check_all(res, ref, dtype, names, value_floor=0.0):
    """Both paths against the float64 reference (value, gradients) and against each other.
    ``value_floor``: an absolute error the value may have on top (rounding of intermediates larger than it)."""
    ref_out, ref_grads, spreads = ref
    spreads = [spreads[0] + value_floor / 10] + list(spreads[1:])
    for backend, (out, gs) in res.items():
        close(out, ref_out, dtype, f"{backend}: value", spreads[0])
        for name, g, rg, sp in zip(names, gs, ref_grads, spreads[1:]):
            if rg is not None:
                assert g.dtype == dtype, f"{backend}: d{name} dtype {g.dtype}"
                close(g, rg, dtype, f"{backend}: d{name}", sp)
    (out_t, g_t), (out_e, g_e) = res["triton"], res["eager"]
    close(out_t, out_e, dtype, "triton vs eager: value", 2 * spreads[0])
    for name, a, b, sp in zip(names, g_t, g_e, spreads[1:]):
        if a is not None:
            close(a, b, dtype, f"triton vs eager: d{name}", 2 * sp)


LEAD = st.lists(st.integers(0, 4), min_size=0, max_size=2)
LAYOUT = st.sampled_from(["contiguous", "sliced", "transposed"])


# ------------------------------------------------------------------------------------ lowrank_linear

@PROPERTY
@given(dtype=DTYPES, lead=LEAD, d_in=st.integers(0, 9), r=st.integers(1, 5), d_out=st.integers(0, 9),
       bias=st.booleans(), layouts=st.tuples(LAYOUT, LAYOUT, LAYOUT, LAYOUT), path=st.sampled_from(PATHS),
       seed=st.integers(0, 2**16))
# found by this test: a >2-D x with d_in = 0 failed on the Triton path (reshape(-1, 0))
@example(dtype=torch.float32, lead=[2, 3], d_in=0, r=2, d_out=4, bias=True, layouts=("contiguous",) * 4,
         path="fused", seed=0)
# fp16 cancellation: y (0.008) much smaller than the terms summed into it
@example(dtype=torch.float16, lead=[], d_in=5, r=1, d_out=1, bias=True,
         layouts=("contiguous", "contiguous", "sliced", "contiguous"), path="decode", seed=5)
def test_lowrank_linear_matches_float64(dtype, lead, d_in, r, d_out, bias, layouts, path, seed):
    g = torch.Generator().manual_seed(seed)
    x = strided(g, (*lead, d_in), dtype, layouts[0])
    U = strided(g, (d_in, r), dtype, layouts[1], scale=max(d_in, 1) ** -0.5)
    V = strided(g, (r, d_out), dtype, layouts[2], scale=r ** -0.5)
    b = strided(g, (d_out,), dtype, layouts[3]) if bias else None
    gy = torch.randn(*lead, d_out, generator=g).to(DEVICE)
    res = run_backends(lowrank_linear, [x, U, V, b], gy, path=path)

    def y64(x, U, V, b):  # d_in = 0: y is the bias (or 0)
        return (x @ U) @ V + (b if b is not None else 0.0)

    ref = reference(y64, [x, U, V, b], [], gy, dtype, seed)
    assert res["triton"][0].shape == (*lead, d_out) and res["triton"][0].dtype == dtype
    check_all(res, ref, dtype, "xUVb")


def test_lowrank_linear_rank_zero_is_an_error():
    with pytest.raises(ValueError, match="rank must be at least 1"):
        lowrank_linear(torch.randn(3, 4), torch.randn(4, 0), torch.randn(0, 2))


# ------------------------------------------------------------------------------------ clone_loss

def clone_reference(pairs, mask, reduction, weights, alpha):
    """alpha * sum_i w_i E_i in float64: E_i the sum over kept rows of (s - t [P])^2, divided by the
    kept element count for "mean" (a term over no elements is 0)."""
    terms = []
    for p in pairs:
        s, t = p[0], p[1]
        pred = t if len(p) == 2 else t @ p[2]
        rows, width = s.shape[:-1].numel(), s.shape[-1]
        keep = torch.ones(rows, dtype=torch.bool) if mask is None else mask.reshape(rows).cpu() != 0
        sq = (s - pred).reshape(rows, width)[keep.to(s.device)].square().sum()
        n = int(keep.sum()) * width
        terms.append(sq if reduction == "sum" else (sq / n if n else sq * 0.0))
    return alpha * sum(w * e for w, e in zip(weights, terms)), torch.stack(terms)


@st.composite
def clone_cases(draw):
    lead = draw(LEAD)
    n_direct = draw(st.integers(0, 3))
    n_proj = draw(st.integers(0 if n_direct else 1, 2))
    return dict(lead=lead, direct=[draw(st.integers(0, 7)) for _ in range(n_direct)],
                proj=[(draw(st.integers(0, 7)), draw(st.integers(0, 6))) for _ in range(n_proj)],
                share_proj=draw(st.booleans()), masked=draw(st.booleans()),
                reduction=draw(st.sampled_from(["mean", "sum"])), layouts=draw(st.tuples(LAYOUT, LAYOUT, LAYOUT)),
                alpha=draw(st.sampled_from([1.0, 0.3])), weighted=draw(st.booleans()),
                grad_out=draw(st.sampled_from([1.0, 2.5])), seed=draw(st.integers(0, 2**16)))


CLONE_EMPTY_MASKED = dict(lead=[0], direct=[0], proj=[], share_proj=False, masked=True, reduction="mean",
                          layouts=("contiguous",) * 3, alpha=1.0, weighted=False, grad_out=1.0, seed=0)


@PROPERTY
@given(dtype=DTYPES, case=clone_cases())
@example(dtype=torch.float32, case=CLONE_EMPTY_MASKED)  # found: eager reshape(0, -1) failed
@example(dtype=torch.float16, case={**CLONE_EMPTY_MASKED, "lead": [2, 1], "direct": [3, 1], "proj": [(0, 2), (3, 2)],
                                    "share_proj": True, "weighted": True, "grad_out": 2.5})
def test_clone_loss_grouped_and_masked_matches_float64(dtype, case):
    g = torch.Generator().manual_seed(case["seed"])
    lead, (ls, lt, lp) = case["lead"], case["layouts"]
    pairs = [(strided(g, (*lead, d), dtype, ls), strided(g, (*lead, d), dtype, lt)) for d in case["direct"]]
    shared = None
    for d_t, d_s in case["proj"]:
        if case["share_proj"] and shared is not None and shared.shape[1] == d_s:
            P = shared  # one P used by two pairs: its gradient sums over both
        else:
            P = shared = strided(g, (d_t, d_s), dtype, lp, scale=max(d_t, 1) ** -0.5)
        pairs.append((strided(g, (*lead, d_s), dtype, ls), strided(g, (*lead, P.shape[0]), dtype, lt), P))
    rows = torch.Size(lead).numel()
    mask = (torch.rand(tuple(lead), generator=g) > 0.4).to(DEVICE) if case["masked"] else None
    weights = [0.5 + i for i in range(len(pairs))] if case["weighted"] else [1.0] * len(pairs)
    kw = dict(mask=mask, reduction=case["reduction"], weights=weights, alpha=case["alpha"])

    # students and P as differentiable inputs, in the order they first appear in the pairs
    inputs = []
    for p in pairs:
        for x in (p[0], p[2] if len(p) == 3 else None):
            if x is not None and not any(x is y for y in inputs):
                inputs.append(x)

    def fn(*live):
        sub = {id(a): b for a, b in zip(inputs, live)}
        return clone_loss([tuple(sub.get(id(x), x) for x in p) for p in pairs], **kw)

    res = run_backends(fn, inputs, torch.tensor(case["grad_out"]))
    consts = [x for p in pairs for x in p if not any(x is y for y in inputs)]

    def loss64(*tensors):
        sub = {id(a): b for a, b in zip(inputs + consts, tensors)}
        return clone_reference([tuple(sub[id(x)] for x in p) for p in pairs], mask,
                               **{k: kw[k] for k in ("reduction", "weights", "alpha")})[0]

    ref = reference(loss64, inputs, consts, torch.tensor(case["grad_out"]), dtype, case["seed"])
    for backend in ("triton", "eager"):
        assert res[backend][0].dtype == torch.float32 and res[backend][0].dim() == 0
    check_all(res, ref, dtype, [f"input{i}" for i in range(len(inputs))])
    # the per-term values, for logging
    with lrkd_fast.set_backend("triton"):
        _, terms = clone_loss([tuple(x.detach() for x in p) for p in pairs], return_terms=True, **kw)
    _, terms64 = clone_reference([tuple(x.detach().double() for x in p) for p in pairs], mask,
                                 **{k: kw[k] for k in ("reduction", "weights", "alpha")})
    close(terms, terms64, dtype, "terms", ref[2][0] / max(min(weights) * kw["alpha"], 1e-12))
    if rows == 0 or (mask is not None and not mask.any()):
        assert res["triton"][0].item() == 0.0 and res["eager"][0].item() == 0.0  # documented: loss 0


# ------------------------------------------------------------------------------------ kd_loss

def kd_reference(hs, ws, bs, labels, teacher, *, temperature, kl_weight, ce_weight, reduction, ce_reduction,
                 batch_size, kl_on_ignored, t2_scale, reverse, ignore_index=-100, magnitude=False):
    """kl_weight * KL(softmax(t/T) || softmax(s/T)) (``reverse``: the other way) + ce_weight * CE(s, labels),
    in float64, with 0 log 0 = 0, over the counted rows (label != ignore_index; every row for the KL with
    ``kl_on_ignored`` or without labels). ``magnitude``: the same sums with every log term in absolute
    value (sum_j a_j (|log a_j| + |log b_j|), |logsumexp| + |s_label|): the size of the intermediates whose
    rounding a computation of the loss cannot avoid, however small the loss is."""
    V = ws.shape[0]
    n = hs.shape[:-1].numel()
    s = hs.reshape(n, hs.shape[-1]) @ ws.t() + (bs if bs is not None else 0.0)
    t = teacher.reshape(n, teacher.shape[-1])[:, :V]
    log_q, log_p = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    log_a, log_b = (log_q, log_p) if reverse else (log_p, log_q)
    a = log_a.exp()
    diff = (log_a.abs() + log_b.abs()) if magnitude else (log_a - log_b)
    kl = torch.where(a > 0, a * diff, torch.zeros_like(a)).sum(-1)
    if labels is None:
        counted = torch.ones(n, dtype=torch.bool)
    else:
        counted = labels.reshape(n).cpu() != ignore_index
    kl_rows = torch.ones(n, dtype=torch.bool) if (kl_on_ignored or labels is None) else counted

    def reduce(rows, keep, how):
        total = torch.where(keep.to(rows.device), rows, torch.zeros_like(rows)).sum()
        if how == "sum":
            return total
        if how == "batchmean":
            return total / batch_size
        return total / max(int(keep.sum()), 1)

    loss = kl_weight * (temperature ** 2 if t2_scale else 1.0) * reduce(kl, kl_rows, reduction)
    if labels is not None and (ce_weight != 0 or not magnitude):
        lab = labels.reshape(n).clamp_min(0).to(s.device)
        if magnitude:
            ce = torch.logsumexp(s, -1).abs() + s.gather(1, lab[:, None])[:, 0].abs()
        else:
            ce = -torch.log_softmax(s, -1).gather(1, lab[:, None])[:, 0]
        loss = loss + ce_weight * reduce(ce, counted, ce_reduction)
    return loss


@st.composite
def kd_cases(draw):
    lead = draw(st.lists(st.integers(0, 4), min_size=1, max_size=2))
    V = draw(st.integers(1, 7))
    reduction = draw(st.sampled_from(["mean", "sum", "batchmean"]))
    return dict(lead=lead, d_s=draw(st.integers(0, 6)), d_t=draw(st.integers(0, 6)), V=V,
                V_t=V + draw(st.integers(0, 2)), bias=draw(st.booleans()),
                teacher=draw(st.sampled_from(["hidden", "logits", "masked-logits"])),
                labels=draw(st.sampled_from([None, "some-ignored", "all-ignored"])),
                temperature=draw(st.sampled_from([1.0, 0.5, 2.0, 4.0])), reduction=reduction,
                ce_reduction=draw(st.sampled_from([None, "mean", "sum"])),
                kl_on_ignored=draw(st.booleans()), t2_scale=draw(st.booleans()), reverse=draw(st.booleans()),
                kl_weight=draw(st.sampled_from([1.0, 0.4])), ce_weight=draw(st.sampled_from([1.0, 0.0, 2.0])),
                chunk_size=draw(st.sampled_from([None, 1, 3])), layouts=draw(st.tuples(LAYOUT, LAYOUT, LAYOUT)),
                grad_out=draw(st.sampled_from([1.0, 0.7])), seed=draw(st.integers(0, 2**16)))


KD_CASE = dict(lead=[1], d_s=0, d_t=0, V=1, V_t=1, bias=False, teacher="logits", labels=None, temperature=1.0,
               reduction="mean", ce_reduction=None, kl_on_ignored=False, t2_scale=False, reverse=False, kl_weight=1.0,
               ce_weight=1.0, chunk_size=None, layouts=("contiguous", "contiguous", "sliced"), grad_out=1.0, seed=0)


@PROPERTY
@given(dtype=DTYPES, case=kd_cases())
# found by this test: d_S = 0 failed on both paths (reshape(-1, 0)), and a one-token vocabulary of teacher
# logits with stride 2 was refused by the kernel (.contiguous() keeps a size-1 dim's stride)
@example(dtype=torch.float32, case=KD_CASE)
# fp16: a KL of 2e-4 between nearly equal distributions
@example(dtype=torch.float16, case={**KD_CASE, "d_s": 3, "V": 2, "V_t": 2, "bias": True,
                                    "layouts": ("contiguous", "transposed", "sliced"), "seed": 4248})
# fp32: a KL of 1e-3, below the rounding of the fp32 log-probabilities it is formed from
@example(dtype=torch.float32, case={**KD_CASE, "d_s": 2, "d_t": 1, "V": 4, "V_t": 4, "teacher": "hidden",
                                    "temperature": 2.0, "layouts": ("contiguous", "transposed", "sliced"), "seed": 1})
# a masked (-inf) teacher vocabulary, ignored labels, several chunks, batchmean
@example(dtype=torch.float16, case={**KD_CASE, "lead": [2, 3], "d_s": 4, "V": 6, "V_t": 7, "bias": True,
                                    "teacher": "masked-logits", "labels": "some-ignored", "reduction": "batchmean",
                                    "temperature": 2.0, "chunk_size": 1, "grad_out": 0.7, "seed": 3})
def test_kd_loss_matches_float64(dtype, case):
    g = torch.Generator().manual_seed(case["seed"])
    lead, V, V_t = case["lead"], case["V"], case["V_t"]
    n = torch.Size(lead).numel()
    lh, lw, lt = case["layouts"]
    hs = strided(g, (*lead, case["d_s"]), dtype, lh)
    ws = strided(g, (V, case["d_s"]), dtype, lw, scale=0.5)
    bs = strided(g, (V,), dtype, "sliced", scale=0.3) if case["bias"] else None
    teacher_kw = {}
    if case["teacher"] == "hidden":
        ht = strided(g, (*lead, case["d_t"]), dtype, lt)
        wt = strided(g, (V_t, case["d_t"]), dtype, lw, scale=0.5)
        bt = strided(g, (V_t,), dtype, "contiguous", scale=0.3) if case["bias"] else None
        teacher_kw = dict(teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt)
    else:
        tl = strided(g, (*lead, V_t), dtype, lt, scale=2.0)
        if case["teacher"] == "masked-logits" and V > 1:
            # a masked vocabulary: teacher probability exactly 0 on some tokens (never token 0). The reverse
            # KL is infinite there, so the masked case runs forward only.
            drop = torch.rand((*lead, V_t), generator=g) < 0.4
            drop[..., 0] = False
            tl = tl.masked_fill(drop.to(DEVICE), float("-inf"))
        teacher_kw = dict(teacher_logits=tl)
    reverse = case["reverse"] and case["teacher"] != "masked-logits"
    labels = None
    if case["labels"] is not None:
        labels = torch.randint(0, V, tuple(lead), generator=g)
        labels[torch.rand(tuple(lead), generator=g) < (1.0 if case["labels"] == "all-ignored" else 0.3)] = -100
        labels = labels.to(DEVICE)
    batch_size = lead[0] if len(lead) == 2 else max(n // 2, 1)
    batch_size = batch_size or 1
    opts = dict(temperature=case["temperature"], kl_weight=case["kl_weight"], ce_weight=case["ce_weight"],
                reduction=case["reduction"], ce_reduction=case["ce_reduction"], kl_on_ignored=case["kl_on_ignored"],
                t2_scale=case["t2_scale"], reverse=reverse,
                batch_size=batch_size if "batchmean" in (case["reduction"], case["ce_reduction"]) else None)

    def fn(h, w, b):
        return kd_loss(h, w, labels, student_bias=b, chunk_size=case["chunk_size"], **teacher_kw, **opts)

    res = run_backends(fn, [hs, ws, bs], torch.tensor(case["grad_out"]))
    ce_red = case["ce_reduction"] or ("mean" if case["reduction"] == "batchmean" else case["reduction"])
    teacher = [teacher_kw.get(k) for k in ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits")]

    def loss64(h, w, b, ht, wt, bt, tl, magnitude=False):
        logits = tl if tl is not None else ht @ wt.t() + (bt if bt is not None else 0.0)
        return kd_reference(h, w, b, labels, logits, **{**opts, "ce_reduction": ce_red, "batch_size": batch_size},
                            magnitude=magnitude)

    ref = reference(loss64, [hs, ws, bs], teacher, torch.tensor(case["grad_out"]), dtype, case["seed"])
    # both paths form the log-softmaxes and the loss in fp32, whatever the input dtype
    with torch.no_grad():
        size = loss64(*[None if t is None else t.double() for t in [hs, ws, bs] + teacher], magnitude=True)
    floor = 16 * torch.finfo(torch.float32).eps * abs(size.item())
    for backend in ("triton", "eager"):
        assert res[backend][0].dtype == torch.float32 and res[backend][0].dim() == 0
    check_all(res, ref, dtype, ["student_hidden", "student_weight", "student_bias"], value_floor=floor)
    if n == 0:  # documented: no row counts -> 0 (mean) and zero gradients
        assert res["triton"][0].item() == 0.0 and res["eager"][0].item() == 0.0


def test_kd_loss_empty_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="vocabulary must not be empty"):
        kd_loss(torch.randn(3, 4), torch.randn(0, 4), teacher_logits=torch.randn(3, 0))
