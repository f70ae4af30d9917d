"""FLOP/byte model of the ops, and the one function that picks the low-rank linear's path.

Every figure is a roofline: time = max(FLOPs / peak, bytes / bandwidth) per launch, plus a launch
cost. The GPU constants are measurements on one NVIDIA H200 (bf16 GEMM 8192^3: 782 TFLOP/s;
device copy: 4.25 TB/s). The benchmark runner prints the same counts as "% of speed of light".

Low-rank linear y = (x U) V + b, x (M, K), U (K, R), V (R, N), element size e bytes:

================  ===========================================  ===================================
path              what runs                                     HBM bytes (e x ...)
================  ===========================================  ===================================
``two_gemm``      t = x U, y = t V (cuBLAS through torch.mm)    MK + KR + 2MR + RN + MN, 2 launches
``fused``         one program per row block owns every column   MK + KR + RN + MN (+ MR if t saved)
                  (``chain_matmul``), t stays on chip           1 launch
``decode``        producers split U, consumers split V, one     MK + KR + RN + MN, 1 launch
                  launch (``lowrank_decode``), M <= 64
================  ===========================================  ===================================

FLOPs are 2MR(K + N) for every path. The fused kernel's weakness is occupancy: with one program
per row block, M / BLOCK_M programs must fill the SMs, and a partial last wave costs a whole
program's time. The model charges that (``waves``), so the fused path is chosen only where its
saved round trip of t and launch outweigh it. Both GEMM paths are charged the same tensor-core
efficiency (``THIN_GEMM_EFFICIENCY``, from eager's measured 84 us for M 8192, 4096 -> 256 -> 4096,
against a 44 us FLOP floor), so no path is favoured by an optimistic guess about its kernel.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

__all__ = ["GPUSpec", "H200", "LowRankPlan", "PATHS", "lowrank_counts", "plan_lowrank", "roofline_seconds"]


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_flops: float  # dense 16-bit tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s
    sms: int
    launch_s: float  # one kernel launch, back to back on a stream


H200 = GPUSpec("NVIDIA H200", peak_flops=782e12, bandwidth=4.25e12, sms=132, launch_s=4e-6)

# Fraction of peak a GEMM with one dimension <= a few hundred reaches (see the module docstring).
THIN_GEMM_EFFICIENCY = 0.55
# Row blocks the fused kernel's autotune list offers (its padded rank is at most 256).
FUSED_BLOCK_M = (64, 128)
FUSED_MAX_R = 256
DECODE_MAX_M = 64
PATHS = ("decode", "fused", "two_gemm")


def roofline_seconds(flops: float, nbytes: float, gpu: GPUSpec = H200, efficiency: float = 1.0) -> float:
    """Speed-of-light time of work with these FLOPs and HBM bytes on ``gpu``."""
    return max(flops / (gpu.peak_flops * efficiency), nbytes / gpu.bandwidth)


def lowrank_counts(M: int, K: int, R: int, N: int, elem_bytes: int = 2, backward: bool = False) -> tuple[float, float]:
    """(FLOPs, minimal HBM bytes) of y = (x U) V, forward or forward + backward.

    Backward: g = dy V^T, dx = g U^T, dU = x^T g, dV = t^T dy (four more products of the same
    size); minimal bytes read x, dy, U, V, t and write y, dx, dU, dV once each.
    """
    flops = 2.0 * M * R * (K + N)
    nbytes = elem_bytes * (M * K + K * R + R * N + M * N)
    if backward:
        flops *= 3
        nbytes += elem_bytes * (M * N + 2 * M * R + M * K + K * R + R * N + M * K)
    return flops, float(nbytes)


def _pad16(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p


@dataclass(frozen=True)
class LowRankPlan:
    """The chosen path and every candidate's estimated seconds (None where it cannot run)."""

    path: str
    seconds: dict = field(compare=False)
    reason: str = field(compare=False, default="")


@functools.lru_cache(maxsize=1024)
def plan_lowrank(M: int, K: int, R: int, N: int, elem_bytes: int = 2, store_t: bool = False,
                 gpu: GPUSpec = H200) -> LowRankPlan:
    """Pick the path of one low-rank product (x (M, K) @ U (K, R)) @ V (R, N) by the roofline model.

    fp32 always takes ``two_gemm``: on a GPU the fused kernels' fp32 configs spill or exceed shared
    memory (see ``benchmarks.compile_check``), while cuBLAS runs fp32 at torch's TF32 setting.
    """
    for name, v in (("M", M), ("K", K), ("R", R), ("N", N)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    e = elem_bytes
    eff = THIN_GEMM_EFFICIENCY
    t_bytes = e * M * R
    g1 = roofline_seconds(2.0 * M * K * R, e * (M * K + K * R) + t_bytes, gpu, eff)
    g2 = roofline_seconds(2.0 * M * R * N, t_bytes + e * (R * N + M * N), gpu, eff)
    seconds = {"two_gemm": g1 + g2 + 2 * gpu.launch_s, "fused": None, "decode": None}
    if e == 4:
        return LowRankPlan("two_gemm", seconds, "fp32 runs on cuBLAS")

    rp = _pad16(R)
    if rp <= FUSED_MAX_R and M > 0:
        best = None
        for bm in FUSED_BLOCK_M:
            programs = -(-M // bm)
            waves = -(-programs // gpu.sms)
            per_sm = GPUSpec(gpu.name, gpu.peak_flops / gpu.sms, gpu.bandwidth / gpu.sms, 1, 0.0)
            flops_pp = 2.0 * bm * rp * (K + N)  # padded rank: the kernel computes the padding
            bytes_pp = e * bm * (K + N + (R if store_t else 0))
            s = waves * roofline_seconds(flops_pp, bytes_pp, per_sm, eff) + gpu.launch_s
            best = s if best is None else min(best, s)
        seconds["fused"] = best
    if 0 < M <= DECODE_MAX_M:
        nbytes = e * (M * K + K * R + R * N + M * N + (M * R if store_t else 0))
        seconds["decode"] = roofline_seconds(2.0 * M * R * (K + N), nbytes, gpu, eff) + gpu.launch_s
    path = min((p for p in PATHS if seconds[p] is not None), key=lambda p: seconds[p])
    return LowRankPlan(path, seconds, "least estimated time")
