"""Test setup: without a GPU, run the Triton kernels through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so this happens at conftest import time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Float dtypes the Triton path is checked in here. The interpreter's tl.dot is exact for fp32/fp16;
# bf16 is covered on the GPU (the kernels upcast bf16 dot operands when interpreted).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Relative tolerances (max |a-b| / max |ref|) per dtype; one place for every op's tests.
RTOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close_rel(actual, expected, dtype=torch.float32, what="value"):
    """Relative max error against the reference, with the tolerance of ``dtype``."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = e.abs().max().clamp_min(1e-12)
    err = ((a - e).abs().max() / scale).item()
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3g} > {RTOL[dtype]:.3g} ({dtype})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def eager_backend():
    """For whole-model runs on CPU: the interpreted Triton kernels are exact but far too slow for a
    full model, and they are compared with eager op by op in the op tests."""
    import lrkd_fast

    with lrkd_fast.set_backend("eager"):
        yield
