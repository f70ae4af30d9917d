"""Activation-cloning loss of one LRC layer (the paper's seven terms), fwd+bwd.

Terms: q, k, v, gate, up compared directly; the attention and FFN outputs compared with the
teacher's projected down, E(o_S, o_T @ P_o) + E(ffn_S, ffn_T @ P_down). Shapes are LRC-1.5B's
(Llama-3.2-3B teacher, d 3072 -> 1536, FFN 8192, 8192 tokens).

Providers: eager (F.mse_loss per term in the input dtype, as the LRC reference code writes it),
torch.compile of the same, and lrkd_fast's clone_loss (one grouped launch for the five direct
terms, one fused GEMM + loss epilogue per projected term). Gradients compared: the seven student
activations, P_o and P_down.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import lrkd_fast
from lrkd_fast.ops.clone_loss import clone_loss

from .common import compiled, make_provider, triton_note
from .runner import Case

DIRECT = ("q", "k", "v", "gate", "up")
PROJECTED = ("o", "ffn")


def _inputs(M, widths, d_t, d_s, dtype, device, seed=0):
    """[7 students, 7 teachers, P_o, P_down]: students then teachers in DIRECT + PROJECTED order."""
    def make():
        g = torch.Generator(device=device).manual_seed(seed)

        def r(*shape, s=1.0):
            return (torch.randn(*shape, generator=g, device=device) * s).to(dtype)

        students = [r(M, widths[m]).requires_grad_() for m in DIRECT] + \
                   [r(M, d_s).requires_grad_() for _ in PROJECTED]
        teachers = [r(M, widths[m]) for m in DIRECT] + [r(M, d_t) for _ in PROJECTED]
        projs = [r(d_t, d_s, s=d_t ** -0.5).requires_grad_() for _ in PROJECTED]
        return students + teachers + projs
    return make


def eager_clone(*inputs):
    S, T, P = inputs[0:7], inputs[7:14], inputs[14:16]
    loss = sum(F.mse_loss(s, t) for s, t in zip(S[:5], T[:5]))
    return loss + F.mse_loss(S[5], T[5] @ P[0]) + F.mse_loss(S[6], T[6] @ P[1])


def _fused(*inputs):
    S, T, P = inputs[0:7], inputs[7:14], inputs[14:16]
    pairs = list(zip(S[:5], T[:5])) + [(S[5], T[5], P[0]), (S[6], T[6], P[1])]
    with lrkd_fast.set_backend("triton"):
        return clone_loss(pairs)


def cases(device: str, small: bool) -> list[Case]:
    if small:
        M, d_q, d_kv, d_mid, d_t, d_s, dtype = 256, 96, 32, 192, 96, 48, torch.float32
    else:
        M, d_q, d_kv, d_mid, d_t, d_s = 8192, 3072, 1024, 8192, 3072, 1536
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    widths = dict(q=d_q, k=d_kv, v=d_kv, gate=d_mid, up=d_mid)
    mk = _inputs(M, widths, d_t, d_s, dtype, device)
    esz = torch.finfo(dtype).bits // 8
    direct = M * sum(widths.values())
    # direct: read s, t, write ds; projected: read t (twice: loss GEMM and dP), s, write G, read G, P, dP
    byts = esz * (3 * direct + len(PROJECTED) * (2 * M * d_t + 3 * M * d_s + 2 * d_t * d_s))
    flops = len(PROJECTED) * 2 * (2 * M * d_t * d_s)  # t @ P and dP = -t^T G per projected term
    grads = tuple(range(7)) + (14, 15)
    mode = "fwd+bwd"
    providers = {
        "eager": make_provider(eager_clone, mk, mode, grads),
        "torch.compile": make_provider(compiled(eager_clone), mk, mode, grads),
        "lrkd_fast": make_provider(_fused, mk, mode, grads),
    }
    tag = "" if small else "LRC-1.5B layer "
    c = Case(op="clone_loss", shape=f"{tag}M{M} q{d_q} kv{d_kv} mlp{d_mid} o/ffn {d_t}->{d_s}",
             dtype=dtype, mode=mode, providers=providers, flops=flops, bytes=byts)
    note = triton_note(device)
    if note:
        c.notes["lrkd_fast"] = note
    return [c]
