"""The backend switch: which path an op takes for given tensors, and how the setting is scoped."""
import os
import subprocess
import sys

import pytest
import torch

import lrkd_fast
from lrkd_fast.backend import BackendUnavailableError, get_backend, set_backend, triton_interpreter_enabled, use_triton


def test_set_backend_is_global_and_a_context_manager_that_restores():
    before = get_backend()
    with set_backend("eager") as name:
        assert name == "eager" and get_backend() == "eager"
        with set_backend("TRITON"):  # names are case-insensitive
            assert get_backend() == "triton"
        assert get_backend() == "eager"
    assert get_backend() == before
    setting = set_backend("eager")
    try:
        assert get_backend() == "eager" and repr(setting) == "set_backend('eager')"
    finally:
        set_backend(before)
    assert lrkd_fast.get_backend is get_backend


def test_bad_backend_names_are_refused():
    for bad in ("cuda", "", None, 3):
        with pytest.raises(ValueError, match="backend must be one of"):
            set_backend(bad)


def test_decisions_for_cpu_tensors():
    x = torch.randn(3, 4)
    interpreted = triton_interpreter_enabled()  # conftest turns the interpreter on when there is no GPU
    with set_backend("eager"):
        assert use_triton(x) is False
    with set_backend("auto"):
        assert use_triton(x, None) is interpreted  # CPU tensors go through the kernels only when interpreted
        assert use_triton(x.double()) is False  # float64 has no kernel: auto falls back to eager
    with set_backend("triton"):
        with pytest.raises(BackendUnavailableError, match="my_op: backend 'triton' was requested but dtype torch.float64"
                           if interpreted else "my_op: backend 'triton' was requested but the inputs are CPU"):
            use_triton(x.double(), op="my_op")


def test_environment_variable_sets_the_start_value():
    # a fresh interpreter: the value is read once, when lrkd_fast.backend is imported
    code = ("import importlib, os\n"
            "import lrkd_fast.backend as b\n"
            "print(b.get_backend())\n"
            "os.environ['LRKD_FAST_BACKEND'] = 'fast'\n"
            "try:\n    importlib.reload(b)\nexcept ValueError as exc:\n    print(exc)\n")
    env = dict(os.environ, LRKD_FAST_BACKEND="eager")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "eager", out.stderr[-2000:]
    assert lines[1].startswith("LRKD_FAST_BACKEND: backend must be one of"), lines
