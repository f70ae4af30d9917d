"""Provider plumbing shared by the case files."""
from __future__ import annotations

import torch

from lrkd_fast.backend import triton_available, triton_interpreter_enabled


def triton_note(device: str) -> str | None:
    """Why the lrkd_fast (Triton) provider is not timed here, or None when it runs."""
    if not triton_available():
        return "needs triton"
    if device == "cpu" and not triton_interpreter_enabled():
        return "Triton timings need a GPU"
    return None


def make_provider(fn, make_inputs, mode: str, grad_of=()):
    """Build a provider ``setup`` for a function of freshly made inputs.

    fn(*inputs) -> tensor (or loss). For "fwd+bwd" the output is backpropagated (with a fixed
    random cotangent for non-scalars) and ``result`` returns the output plus the gradients of the
    inputs at the positions in ``grad_of``.
    """
    def setup():
        inputs = make_inputs()
        state = {}

        def run():
            if mode == "fwd":
                with torch.no_grad():
                    state["out"] = fn(*inputs)
                return
            for i in grad_of:
                inputs[i].grad = None
            out = fn(*inputs)
            if out.dim() == 0:
                out.backward()
            else:
                if "cot" not in state:
                    g = torch.Generator(device=out.device).manual_seed(1)
                    state["cot"] = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
                out.backward(state["cot"])
            state["out"] = out

        def result():
            return (state["out"],) + tuple(inputs[i].grad for i in grad_of)

        return run, result

    return setup


def compiled(fn):
    """torch.compile a function once per provider (compile time lands in the warm-up)."""
    return torch.compile(fn)
