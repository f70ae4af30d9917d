"""Small helpers shared by the launchers: interpreter detection, dtype mapping, block sizing."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast tl.dot operands to fp32.

    The interpreter multiplies the raw bit patterns of bfloat16 tl.dot operands (a known,
    unfixed interpreter bug); fp32 and fp16 are exact there. On a GPU the native path is used.
    """
    return interpreted() and dtype == torch.bfloat16


def block_at_least_16(n: int, cap: int | None = None) -> int:
    """Next power of two >= max(n, 16): NVIDIA tensor cores need every tl.dot dim >= 16."""
    b = max(16, triton.next_power_of_2(max(int(n), 1)))
    return min(b, cap) if cap is not None else b


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    if interpreted() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    return num_sms(t.device.index or 0) if t.is_cuda else num_sms()


def autotune_configs(configs):
    """The autotuner needs a GPU to benchmark: under the interpreter keep only the first config."""
    return configs[:1] if interpreted() else configs


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid`` in grouped order: GROUP_M consecutive row blocks
    sweep the columns together, so programs running at the same time share rows of A in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m
