"""Activation-cloning MSE kernels: the loss and the student gradient in one pass.

* ``grouped_mse``: sum((s - t)^2) for every same-width (student, teacher) pair of a layer in ONE
  launch. Each pair's pointers, size and row width are kernel arguments (tuples), so a call copies
  nothing to the device; each program finds its pair, streams a contiguous chunk, writes the
  gradient ``scale * (s - t)`` for that chunk and one fp32 partial sum.
* ``projected_mse``: sum((s - t @ P)^2) as a GEMM whose epilogue subtracts the student tile,
  squares, writes the gradient tile ``scale * (s - t P)`` and one fp32 partial per tile. The
  product t @ P never exists as a tensor.

Rows whose mask entry is 0 contribute nothing and get a zero gradient. Partial sums are written
to fixed slots and reduced in a fixed order afterwards (no float atomics), so results are
bitwise reproducible for a given device and kernel configuration. Launchers take tensors and
return tensors; they know nothing of autograd, weights or reductions (``scale`` comes in as a
device tensor, so the caller never has to synchronize to read a mask count).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import autotune, bucket, dot_in_fp32, grouped_tile, interpreted

@triton.jit
def _mse_chunk(s_ptr, t_ptr, g_ptr, mask_ptr, offs, local, row0, rem0, width, inv_width, numel, scale, acc,
               HAS_MASK: tl.constexpr, STORE_G: tl.constexpr, BOUNDED: tl.constexpr):
    # BOUNDED=False is the interior fast path: no bounds mask, so loads and stores vectorize.
    if BOUNDED:
        inb = offs < numel
        s = tl.load(s_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    else:
        s = tl.load(s_ptr + offs).to(tl.float32)
        t = tl.load(t_ptr + offs).to(tl.float32)
    d = s - t
    if HAS_MASK:
        # row of each element without a 64-bit division: v = rem0 + local < 2^24, so the fp32
        # quotient is off by at most one and two integer compares make it exact
        v = rem0 + local
        q = (v.to(tl.float32) * inv_width).to(tl.int32)
        q = q - (q * width > v).to(tl.int32)
        q = q + ((q + 1) * width <= v).to(tl.int32)
        rows = row0 + q
        if BOUNDED:
            keep = tl.load(mask_ptr + rows, mask=inb, other=0)
        else:
            keep = tl.load(mask_ptr + rows)
        d = tl.where(keep != 0, d, 0.0)
    if STORE_G:
        if BOUNDED:
            tl.store(g_ptr + offs, (d * scale).to(g_ptr.dtype.element_ty), mask=inb)
        else:
            tl.store(g_ptr + offs, (d * scale).to(g_ptr.dtype.element_ty))
    return acc + d * d


@triton.jit
def _grouped_mse_kernel(s_ptrs, t_ptrs, g_ptrs, numels, widths, firsts, scale_idx,
                        scale_ptr, mask_ptr, partial_ptr, max_blocks,
                        N_TERMS: tl.constexpr, STORE_MASK: tl.constexpr, HAS_MASK: tl.constexpr,
                        BLOCK: tl.constexpr, SUB: tl.constexpr):
    pid = tl.program_id(0)
    # Every pair's pointers and sizes are kernel arguments (tuples): nothing is copied to the
    # device per call. The pair of this program is the one whose block range holds pid.
    for j in tl.static_range(N_TERMS):
        numel = numels[j]
        first = firsts[j]
        if (pid >= first) & (pid < first + tl.cdiv(numel, BLOCK)):
            local_block = pid - first
            width = widths[j]
            start = local_block.to(tl.int64) * BLOCK
            row0 = start // width  # one 64-bit division per program, not per element
            rem0 = (start - row0 * width).to(tl.int32)
            inv_width = 1.0 / width.to(tl.float32)
            scale = tl.load(scale_ptr + scale_idx[j])
            acc = tl.zeros((SUB,), dtype=tl.float32)
            store_g: tl.constexpr = (STORE_MASK >> j) & 1
            if start + BLOCK <= numel:
                for i in tl.static_range(0, BLOCK, SUB):
                    local = i + tl.arange(0, SUB)
                    acc = _mse_chunk(s_ptrs[j], t_ptrs[j], g_ptrs[j], mask_ptr, start + local, local, row0, rem0,
                                     width, inv_width, numel, scale, acc,
                                     HAS_MASK=HAS_MASK, STORE_G=store_g, BOUNDED=False)
            else:
                for i in tl.static_range(0, BLOCK, SUB):
                    local = i + tl.arange(0, SUB)
                    acc = _mse_chunk(s_ptrs[j], t_ptrs[j], g_ptrs[j], mask_ptr, start + local, local, row0, rem0,
                                     width, inv_width, numel, scale, acc,
                                     HAS_MASK=HAS_MASK, STORE_G=store_g, BOUNDED=True)
            tl.store(partial_ptr + j * max_blocks + local_block, tl.sum(acc, axis=0))


# Widest row the masked path handles: the in-kernel row index needs rem0 + BLOCK < 2^24.
GROUPED_MAX_WIDTH = (1 << 24) - 8192


def _grouped_block_sizes(masked: bool) -> tuple[int, int, int]:
    """(elements per program, elements per inner step, warps). The masked path's row index keeps
    three more values per element live: half the step keeps it from spilling (sm_90 compile check)."""
    if interpreted():
        return 1024, 1024, 4
    return 8192, 1024 if masked else 2048, 8


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def grouped_mse(students: list[torch.Tensor], teachers: list[torch.Tensor], scale: torch.Tensor,
                mask: torch.Tensor | None = None, store_grad: list[bool] | None = None,
                scale_index: list[int] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Sum of squared differences of same-shape pairs, and their scaled differences, one launch.

    students[i], teachers[i]: same shape (..., d_i); every tensor of one call shares one dtype and
    device (the caller groups by dtype). scale: fp32 on the device, the gradient factor of pair i
    is ``scale[scale_index[i]]`` (default index i). mask: optional (R,) uint8 over the rows (all
    leading dims flattened) that every pair then has. store_grad[i]: whether to write pair i's
    gradient.

    Returns ``(sums, grads)``: sums (n,) fp32, sum over kept elements of (s - t)^2; grads[i] is
    ``scale[i] * (s - t)`` with masked rows 0, in the students' dtype (None where not stored).
    """
    n = len(students)
    if n == 0:
        raise ValueError("grouped_mse needs at least one pair")
    if len(teachers) != n:
        raise ValueError(f"{n} students but {len(teachers)} teachers")
    for i, (s, t) in enumerate(zip(students, teachers)):
        if s.shape != t.shape or s.dtype != students[0].dtype or t.dtype != s.dtype:
            raise ValueError(f"pair {i}: student {tuple(s.shape)} {s.dtype} and teacher {tuple(t.shape)} {t.dtype} "
                             f"must have the same shape and the dtype of pair 0")
        if mask is not None and s.dim() and s.shape[-1] > GROUPED_MAX_WIDTH:
            raise ValueError(f"pair {i}: rows of {s.shape[-1]} elements are wider than the masked kernel's "
                             f"{GROUPED_MAX_WIDTH}")
    dev = students[0].device
    store_grad = [True] * n if store_grad is None else list(store_grad)
    scale_index = list(range(n)) if scale_index is None else [int(i) for i in scale_index]
    block, sub, warps = _grouped_block_sizes(mask is not None)

    s_c = [_aligned(s) for s in students]
    t_c = [_aligned(t) for t in teachers]
    grads = [torch.empty_like(s) if sg else None for s, sg in zip(s_c, store_grad)]
    numels = [s.numel() for s in s_c]
    blocks = [triton.cdiv(m, block) for m in numels]
    first, total = [], 0
    for b in blocks:
        first.append(total)
        total += b
    max_blocks = max(max(blocks), 1)
    partials = torch.zeros(n, max_blocks, dtype=torch.float32, device=dev)
    if total > 0:
        scale = scale.to(device=dev, dtype=torch.float32).contiguous()
        mask_arg = mask if mask is not None else partials
        _grouped_mse_kernel[(total,)](
            tuple(s_c), tuple(t_c), tuple(g if g is not None else s for g, s in zip(grads, s_c)),
            tuple(numels), tuple(max(s.shape[-1], 1) if s.dim() else 1 for s in s_c), tuple(first),
            tuple(scale_index), scale, mask_arg, partials, max_blocks,
            N_TERMS=n, STORE_MASK=sum(1 << i for i, sg in enumerate(store_grad) if sg),
            HAS_MASK=mask is not None, BLOCK=block, SUB=sub, num_warps=warps)
    # fixed-shape, fixed-order reduction of the partials: deterministic
    sums = partials.sum(dim=1)
    out_grads = [g.view(s.shape) if g is not None else None for g, s in zip(grads, students)]
    return sums, out_grads


def _projected_configs():
    # small, interpreter-friendly config first (kept alone when interpreted)
    cfgs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=2)]
    for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                             (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=w, num_stages=s))
    return cfgs


def _projected_resources(cfg, args):
    """(shared bytes, fp32 accumulator registers per thread): a pipelined GEMM tile whose epilogue
    also holds the student tile."""
    e = 4 if args["DOT_FP32"] else args["t_ptr"].element_size()
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    shared = cfg.num_stages * (bm * bk + bk * bn) * e
    return shared, bm * bn // (32 * cfg.num_warps)


# Smallest tile of any config: the partials buffer holds one slot per tile of the finest tiling.
_MIN_TILE_M, _MIN_TILE_N = 32, 32


# reset_to_zero: a coarser config fills fewer slots than a finer one benchmarked before it.
@autotune(_projected_configs(), key=["M_BUCKET", "N", "K", "HAS_MASK", "STORE_G"],
          resources=_projected_resources, reset_to_zero=["partial_ptr"])
@triton.jit
def _projected_mse_kernel(t_ptr, p_ptr, s_ptr, g_ptr, mask_ptr, scale_ptr, partial_ptr,
                          M, N, K, M_BUCKET,
                          s_tm, s_tk, s_pk, s_pn, s_sm, s_sn, s_gm, s_gn,
                          HAS_MASK: tl.constexpr, STORE_G: tl.constexpr, DOT_FP32: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    # grouped ordering: consecutive programs share rows of the teacher in L2
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(t_ptr + rows[:, None] * s_tm + kk[None, :] * s_tk,
                    mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(p_ptr + kk[:, None] * s_pk + offs_n[None, :] * s_pn,
                    mask=(kk[:, None] < K) & n_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)

    # epilogue: d = s - t P on this tile; the product stays in fp32 registers
    tile_mask = m_mask[:, None] & n_mask[None, :]
    s = tl.load(s_ptr + rows[:, None] * s_sm + offs_n[None, :] * s_sn, mask=tile_mask, other=0.0)
    d = s.to(tl.float32) - acc
    keep = tile_mask
    if HAS_MASK:
        row_keep = tl.load(mask_ptr + offs_m, mask=m_mask, other=0) != 0
        keep = keep & row_keep[:, None]
    d = tl.where(keep, d, 0.0)
    if STORE_G:
        scale = tl.load(scale_ptr)
        tl.store(g_ptr + rows[:, None] * s_gm + offs_n[None, :] * s_gn,
                 (d * scale).to(g_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(d * d, axis=1), axis=0))


def projected_mse(student: torch.Tensor, teacher: torch.Tensor, proj: torch.Tensor, scale: torch.Tensor,
                  mask: torch.Tensor | None = None, store_grad: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of (s - t @ P)^2 and the gradient tile ``scale * (s - t @ P)``, fused in one GEMM.

    student (M, N), teacher (M, K), proj (K, N), one dtype and device (any strides). scale: (1,)
    fp32 on the device. mask: optional (M,) uint8, rows with 0 are left out (gradient 0).
    Returns ``(sum, grad)``: sum a 0-dim fp32 tensor, grad (M, N) in the student's dtype or None.
    """
    for name, t in (("student", student), ("teacher", teacher), ("proj", proj)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    M, N = student.shape
    K = teacher.shape[1]
    if teacher.shape[0] != M or proj.shape != (K, N):
        raise ValueError(f"shapes do not chain: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, "
                         f"proj {tuple(proj.shape)}")
    dev = student.device
    grad = torch.empty(M, N, dtype=student.dtype, device=dev) if store_grad else None
    if M == 0 or N == 0:
        return torch.zeros((), dtype=torch.float32, device=dev), grad
    n_slots = triton.cdiv(M, _MIN_TILE_M) * triton.cdiv(N, _MIN_TILE_N)
    partials = torch.zeros(n_slots, dtype=torch.float32, device=dev)
    scale = scale.to(device=dev, dtype=torch.float32).contiguous()
    g = grad if grad is not None else student  # dummy pointer when not stored
    mask_arg = mask if mask is not None else partials

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _projected_mse_kernel[grid](teacher, proj, student, g, mask_arg, scale, partials,
                                M, N, K, bucket(M),
                                teacher.stride(0), teacher.stride(1), proj.stride(0), proj.stride(1),
                                student.stride(0), student.stride(1), g.stride(0), g.stride(1),
                                HAS_MASK=mask is not None, STORE_G=store_grad,
                                DOT_FP32=dot_in_fp32(teacher.dtype))
    return partials.sum(), grad
