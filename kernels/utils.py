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
    """Under the interpreter only the first (small) config: the autotuner needs a GPU to
    benchmark. On a GPU every config but that one: a tile that small runs on mma.sync, not
    Hopper's wgmma (sm_90 compile check), and would only cost autotuning time."""
    return configs[:1] if interpreted() else configs[1:]


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


# ---------------------------------------------------------------------------- resource rules
# Shared memory a block may opt into, in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {"sm_90": 232_448, "sm_80": 166_912}
# fp32 accumulator registers per thread a config may hold: 255 is the hardware cap, and operands,
# addresses and the epilogue need the rest; above this the sm_90 compile check shows spills.
ACC_REGS_LIMIT = 128


@functools.lru_cache(maxsize=None)
def device_shared_limit(device_index: int = 0) -> int:
    """Opt-in shared memory per block of this GPU (the sm_90 figure when there is none)."""
    if interpreted() or not torch.cuda.is_available():
        return SHARED_LIMIT["sm_90"]
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", SHARED_LIMIT["sm_90"]))


def element_bytes(named_args: dict, name: str) -> int:
    """Bytes per element of the tensor argument ``name`` (the kernel's operand dtype)."""
    return named_args[name].element_size()


def fits(kernel, config, named_args: dict, shared_limit: int) -> bool:
    """Whether ``config`` of an :func:`autotune`-built kernel fits the resource rules."""
    shared, acc_regs = kernel.resources(config, named_args)
    return shared <= shared_limit and acc_regs <= ACC_REGS_LIMIT


def autotune(configs, key, resources, **kwargs):
    """``triton.autotune`` that can only pick configs that fit, with the full GPU list kept.

    ``configs``: the interpreter's small config first, then the GPU candidates (see
    :func:`autotune_configs`).
    ``resources(config, args) -> (shared bytes, fp32 accumulator registers per thread)``, with
    ``args`` every argument of the launch by name (positional and keyword): an estimate, used to prune before benchmarking; ``benchmarks.compile_check`` compiles every
    config that passes it for sm_90 and sm_80 and fails if one spills or overflows.

    The returned kernel carries ``gpu_configs`` (the GPU candidate list), ``resources`` and
    ``prune`` (the rule as the autotuner calls it: ``prune(configs, named_args, **kwargs)``).
    """
    def prune(cfgs, named_args, **kwargs):
        # the autotuner passes positional arguments as named_args and the launch's keyword
        # arguments (the constexprs a launcher sets) separately: the rules see both
        args = {**named_args, **kwargs}
        dev = next((v for v in args.values() if isinstance(v, torch.Tensor)), None)
        limit = device_shared_limit(dev.device.index or 0) if dev is not None and dev.is_cuda else SHARED_LIMIT["sm_90"]
        kept = [c for c in cfgs if fits(kernel, c, args, limit)]
        return kept or [min(cfgs, key=lambda c: resources(c, args))]

    def wrap(fn):
        nonlocal kernel
        kernel = triton.autotune(configs=autotune_configs(configs), key=key,
                                 prune_configs_by={"early_config_prune": prune}, **kwargs)(fn)
        kernel.gpu_configs = list(configs[1:])
        kernel.resources = resources
        kernel.prune = prune
        return kernel

    kernel = None
    return wrap


def bucket(n: int) -> int:
    """Autotune key for a dimension that varies with the batch (tokens): its power-of-two bucket,
    so a new sequence length re-uses the tuned config of its bucket instead of re-tuning."""
    return triton.next_power_of_2(max(int(n), 1))
