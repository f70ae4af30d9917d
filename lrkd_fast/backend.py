"""The single place that decides whether an op runs its Triton kernels or its eager reference.

Backends:
  "auto"   Triton for CUDA tensors, and for CPU tensors when the Triton interpreter is on
           (``TRITON_INTERPRET=1``); the eager PyTorch reference otherwise.
  "triton" always Triton; raises :class:`BackendUnavailableError` saying why when it cannot run.
  "eager"  always the eager reference (plain PyTorch ops, autograd by PyTorch).

The starting value comes from the ``LRKD_FAST_BACKEND`` environment variable (default "auto").
``set_backend`` changes it globally and also works as a context manager that restores the
previous value on exit::

    lrkd_fast.set_backend("eager")          # from now on
    with lrkd_fast.set_backend("triton"):    # only inside the block
        ...
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "get_backend",
    "set_backend",
    "triton_available",
    "triton_interpreter_enabled",
    "use_triton",
    "TRITON_DTYPES",
]

BACKENDS = ("auto", "triton", "eager")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """The Triton backend was requested explicitly but cannot run these inputs."""


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def _from_env() -> str:
    raw = os.environ.get("LRKD_FAST_BACKEND", "auto")
    try:
        return _validate(raw)
    except ValueError as exc:
        raise ValueError(f"LRKD_FAST_BACKEND: {exc}") from None


_global_backend = _from_env()


def get_backend() -> str:
    """The backend currently in force ("auto", "triton" or "eager")."""
    return _global_backend


class _BackendSetting:
    """Returned by :func:`set_backend`; as a context manager it restores the previous backend."""

    def __init__(self, previous: str, new: str):
        self.previous, self.new = previous, new

    def __enter__(self) -> str:
        return self.new

    def __exit__(self, *exc) -> None:
        _set(self.previous)

    def __repr__(self) -> str:
        return f"set_backend({self.new!r})"


def _set(name: str) -> None:
    global _global_backend
    _global_backend = name


def set_backend(name: str) -> _BackendSetting:
    """Set the backend for every op: "auto", "triton" or "eager". Usable as a context manager."""
    name = _validate(name)
    previous = get_backend()
    _set(name)
    return _BackendSetting(previous, name)


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here (it is Linux-only)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """Whether Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_not_triton(tensors, op: str) -> str | None:
    if not triton_available():
        return "the triton package is not installed (it is available on Linux only)"
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        return f"inputs are on different devices ({sorted(devices)})"
    dev = devices.pop() if devices else "cpu"
    if dev == "cpu" and not triton_interpreter_enabled():
        return ("the inputs are CPU tensors and the Triton interpreter is off; move them to a "
                "CUDA device or set TRITON_INTERPRET=1 before triton is imported")
    if dev not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA devices (or CPU under the interpreter), not {dev!r}"
    for t in tensors:
        if t.is_floating_point() and t.dtype not in TRITON_DTYPES:
            return f"dtype {t.dtype} is not supported by the Triton kernels (use one of {TRITON_DTYPES})"
    return None


def use_triton(*tensors: torch.Tensor, op: str = "op") -> bool:
    """Decide, for these input tensors, whether ``op`` runs its Triton kernels.

    ``None`` entries are ignored. Raises :class:`BackendUnavailableError` when the backend is
    "triton" and Triton cannot run these inputs.
    """
    tensors = [t for t in tensors if t is not None]
    backend = get_backend()
    if backend == "eager":
        return False
    reason = _why_not_triton(tensors, op)
    if backend == "triton" and reason is not None:
        raise BackendUnavailableError(f"{op}: backend 'triton' was requested but {reason}")
    return reason is None
