"""Low-rank linear y = (x U) V: eager two matmuls, torch.compile of the same, lrkd_fast with its
cost model's choice and with each path forced (``lrkd_fast[fused]``, ``[two_gemm]``, ``[decode]``),
plus the dense layer of the same size for context (not compared for correctness). Training shapes
(M 8192) and decode / small-batch shapes (M 1-64, forward)."""
from __future__ import annotations

import torch

import lrkd_fast
from lrkd_fast.ops.cost_model import PATHS, lowrank_counts
from lrkd_fast.ops.lowrank_linear import lowrank_linear_reference, lowrank_path

from .common import compiled, make_provider, triton_note
from .runner import Case


def _inputs(M, d_in, d_out, r, dtype, device, seed=0):
    def make():
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = (torch.randn(M, d_in, generator=g)).to(device, dtype).requires_grad_()
        U = (torch.randn(d_in, r, generator=g) * d_in**-0.5).to(device, dtype).requires_grad_()
        V = (torch.randn(r, d_out, generator=g) * r**-0.5).to(device, dtype).requires_grad_()
        return [x, U, V]
    return make


def _triton(path=None):
    def fn(x, U, V):
        with lrkd_fast.set_backend("triton"), lowrank_path(path):
            return lrkd_fast.lowrank_linear(x, U, V)
    return fn


def _dense_inputs(M, d_in, d_out, dtype, device):
    def make():
        x = torch.randn(M, d_in, device=device, dtype=dtype, requires_grad=True)
        W = (torch.randn(d_out, d_in, device=device, dtype=dtype) * d_in**-0.5).requires_grad_()
        return [x, W]
    return make


def _case(M, d, r, dtype, device, mode, note, eager_c, dense: bool, paths):
    mk = _inputs(M, d, d, r, dtype, device)
    flops, byts = lowrank_counts(M, d, r, d, torch.finfo(dtype).bits // 8, backward=mode == "fwd+bwd")
    grads = (0, 1, 2)
    providers = {
        "eager": make_provider(lowrank_linear_reference, mk, mode, grads),
        "torch.compile": make_provider(eager_c, mk, mode, grads),
        "lrkd_fast": make_provider(_triton(), mk, mode, grads),
    }
    for path in paths:
        providers[f"lrkd_fast[{path}]"] = make_provider(_triton(path), mk, mode, grads)
    if dense:  # the dense layer's time, for context (a different function: not checked)
        providers["dense (context)"] = make_provider(
            torch.nn.functional.linear, _dense_inputs(M, d, d, dtype, device), mode, ())
    c = Case(op="lowrank_linear", shape=f"M{M} d{d}->{d} r{r}", dtype=dtype, mode=mode,
             providers=providers, flops=flops, bytes=byts)
    if note:
        for name in providers:
            if name.startswith("lrkd_fast"):
                c.notes[name] = note
    return c


def cases(device: str, small: bool) -> list[Case]:
    if small:
        M, d, ranks, dtype, decode_m = 256, 256, (16, 64), torch.float32, (1, 17)
    else:
        M, d, ranks, dtype = 8192, 4096, (64, 256, 1024), (torch.bfloat16 if device == "cuda" else torch.float32)
        decode_m = (1, 16, 64)
    note = triton_note(device)
    eager_c = compiled(lowrank_linear_reference)
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for r in ranks:
            paths = [p for p in PATHS if p != "decode" and not (p == "fused" and r > 256)]
            out.append(_case(M, d, r, dtype, device, mode, note, eager_c, not small, paths))
    r = 256 if not small else 16
    for m in decode_m:  # decode / small batch: where one launch instead of two matters
        out.append(_case(m, d, r, dtype, device, "fwd", note, eager_c, not small, ["decode", "two_gemm"]))
    return out
