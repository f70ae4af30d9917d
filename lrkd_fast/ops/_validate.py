"""Input checks shared by every public op: each failure names the offending argument."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, dim: int | Sequence[int] | None = None, min_dim: int | None = None,
                 floating: bool = True) -> torch.Tensor:
    """``t`` must be a tensor (floating point unless ``floating=False``) with the given rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if t.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_same(names: Sequence[str], tensors: Sequence, *, dtype: bool = True, device: bool = True) -> None:
    """All non-None tensors share one dtype and one device; the error names the odd one out."""
    pairs = [(n, t) for n, t in zip(names, tensors) if t is not None]
    if not pairs:
        return
    n0, t0 = pairs[0]
    for n, t in pairs[1:]:
        if device and t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; all inputs must share one device")
        if dtype and t.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {n0} has dtype {t0.dtype}; all inputs must share one dtype")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for this device type, or None when autocast is off."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # older torch: no per-device query
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None
