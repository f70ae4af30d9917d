"""Low-rank linear y = (x U) V: eager two matmuls, torch.compile of the same, lrkd_fast's kernels,
plus the dense layer of the same size for context (not compared for correctness)."""
from __future__ import annotations

import torch

import lrkd_fast
from lrkd_fast.ops.lowrank_linear import lowrank_linear_reference

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


def _triton(x, U, V):
    with lrkd_fast.set_backend("triton"):
        return lrkd_fast.lowrank_linear(x, U, V)


def _dense_inputs(M, d_in, d_out, dtype, device):
    def make():
        x = torch.randn(M, d_in, device=device, dtype=dtype, requires_grad=True)
        W = (torch.randn(d_out, d_in, device=device, dtype=dtype) * d_in**-0.5).requires_grad_()
        return [x, W]
    return make


def cases(device: str, small: bool) -> list[Case]:
    if small:
        M, d, ranks, dtype = 256, 256, (16, 64), torch.float32
    else:
        M, d, ranks, dtype = 8192, 4096, (64, 256, 1024), (torch.bfloat16 if device == "cuda" else torch.float32)
    note = triton_note(device)
    eager_c = compiled(lowrank_linear_reference)
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for r in ranks:
            mk = _inputs(M, d, d, r, dtype, device)
            flops = 2 * M * r * (2 * d) * (1 if mode == "fwd" else 3)
            esz = torch.finfo(dtype).bits // 8
            byts = esz * (2 * M * d + 2 * d * r) * (1 if mode == "fwd" else 2.5)
            grads = (0, 1, 2)
            providers = {
                "eager": make_provider(lowrank_linear_reference, mk, mode, grads),
                "torch.compile": make_provider(eager_c, mk, mode, grads),
                "lrkd_fast": make_provider(_triton, mk, mode, grads),
            }
            if not small:  # the dense layer's time, for context (a different function: not checked)
                providers["dense (context)"] = make_provider(
                    torch.nn.functional.linear, _dense_inputs(M, d, d, dtype, device), mode, ())
            c = Case(op="lowrank_linear", shape=f"M{M} d{d}->{d} r{r}", dtype=dtype, mode=mode,
                     providers=providers, flops=flops, bytes=byts)
            if note:
                c.notes["lrkd_fast"] = note
            out.append(c)
    return out
