"""Knowledge-distillation loss: student head + teacher head + KL(T) + CE, fwd+bwd.

Providers: eager (full fp32 logits, the LRC reference style: F.kl_div batchmean over flattened
tokens + F.cross_entropy), torch.compile of the same, Liger-Kernel when ``liger_kernel`` imports on
a GPU (chunked LigerFusedLinearJSDLoss with beta=0 plus its hard CE loss; the Triton
LigerFusedLinearJSD, KL only, shown for context), and lrkd_fast's fused kd_loss.
Loss definition compared: mean over tokens of KL(softmax(t/T) || softmax(s/T)) + mean CE; no
ignored labels, so kd_loss's "mean" reduction is the eager one exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import lrkd_fast
from lrkd_fast.ops.kd_loss import kd_loss

from .common import compiled, make_provider, triton_note
from .runner import Case

TEMPERATURE = 40.0


def _inputs(N, d_s, d_t, V, dtype, device, seed=0):
    def make():
        g = torch.Generator(device=device).manual_seed(seed)

        def r(*shape, s=1.0):
            return (torch.randn(*shape, generator=g, device=device) * s).to(dtype)

        hs = r(N, d_s).requires_grad_()
        ws = r(V, d_s, s=0.02).requires_grad_()
        ht = r(N, d_t)
        wt = r(V, d_t, s=0.02)
        labels = torch.randint(0, V, (N,), generator=g, device=device)
        return [hs, ws, ht, wt, labels]
    return make


def eager_kd(hs, ws, ht, wt, labels):
    s = (hs @ ws.t()).float()
    with torch.no_grad():
        t = (ht @ wt.t()).float()
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1), log_target=True,
                  reduction="batchmean")
    return kl + F.cross_entropy(s, labels)


def _fused(hs, ws, ht, wt, labels):
    with lrkd_fast.set_backend("triton"):
        return kd_loss(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, temperature=TEMPERATURE)


def _liger_providers(mk, mode):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception:  # not installed (or not importable here): no Liger rows
        return {}
    chunked = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=0.0, temperature=TEMPERATURE)
    fused_jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)
    return {
        "liger chunked JSD(beta=0)+CE": make_provider(lambda hs, ws, ht, wt, lab: chunked(hs, ws, ht, wt, lab),
                                                      mk, mode, (0, 1)),
        # KL only (no CE term): a different loss, timed for context and not compared
        "liger FusedLinearJSD KL-only (context)": make_provider(
            lambda hs, ws, ht, wt, lab: fused_jsd(hs, ws, ht, wt, lab), mk, mode, (0, 1)),
    }


def cases(device: str, small: bool) -> list[Case]:
    if small:
        N, d_s, d_t, V, dtype = 64, 64, 128, 1000, torch.float32
    else:
        N, d_s, d_t, V = 8192, 1536, 3072, 128256
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mode = "fwd+bwd"
    mk = _inputs(N, d_s, d_t, V, dtype, device)
    esz = torch.finfo(dtype).bits // 8
    # student head fwd + teacher head fwd + student head bwd (grad input and grad weight)
    flops = 2 * N * V * (d_s + d_t) + 2 * 2 * N * V * d_s
    byts = esz * (3 * V * d_s + V * d_t + 2 * N * (d_s + d_t))
    providers = {
        "eager": make_provider(eager_kd, mk, mode, (0, 1)),
        "torch.compile": make_provider(compiled(eager_kd), mk, mode, (0, 1)),
    }
    if device == "cuda":
        providers.update(_liger_providers(mk, mode))
    providers["lrkd_fast"] = make_provider(_fused, mk, mode, (0, 1))
    c = Case(op="kd_loss", shape=f"N{N} dS{d_s} dT{d_t} V{V} T{TEMPERATURE:g}", dtype=dtype, mode=mode,
             providers=providers, flops=flops, bytes=byts)
    note = triton_note(device)
    if note:
        c.notes["lrkd_fast"] = note
    return [c]
