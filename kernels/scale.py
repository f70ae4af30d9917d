"""In-place scaling by a device scalar that costs nothing when the scalar is 1.

Fused losses form their gradients in the forward for a unit output gradient; the backward then
has to multiply them by the incoming gradient, which is almost always exactly 1 (the loss is the
end of the graph). Reading that scalar on the host would be a synchronization each step, so the
kernel reads it itself and every program returns at once when it is 1: no pass over the gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import device_sms, interpreted


@triton.jit
def _scale_kernel(x_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    f = tl.load(factor_ptr).to(tl.float32)
    if f != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for base in range(start, numel, step):
            offs = base + tl.arange(0, BLOCK)
            m = offs < numel
            x = tl.load(x_ptr + offs, mask=m)
            tl.store(x_ptr + offs, (x.to(tl.float32) * f).to(x_ptr.dtype.element_ty), mask=m)


def scale_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x *= factor`` in place (x contiguous; factor a one-element tensor on x's device)."""
    if not x.is_contiguous():
        raise ValueError("scale_ needs a contiguous tensor")
    if factor.numel() != 1 or factor.device != x.device:
        raise ValueError(f"factor must be one element on {x.device}, got shape {tuple(factor.shape)} on {factor.device}")
    if x.numel() == 0:
        return x
    block = 1024 if interpreted() else 4096
    grid = (max(1, min(triton.cdiv(x.numel(), block), 4 * device_sms(x))),)
    _scale_kernel[grid](x, factor.reshape(()), x.numel(), BLOCK=block, num_warps=4)
    return x
