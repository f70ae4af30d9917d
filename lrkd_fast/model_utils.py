"""Model internals shared by the swap, distillation and Low-Rank Clone code.

Everything here works on any Hugging Face transformer (or plain ``nn.Module``) without knowing
its family: blocks are found by shape (the largest ``nn.ModuleList``), activations are caught with
hooks, and a forward pass can be cut short at a module once it has delivered what was wanted.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["ModuleNotReached", "OutputCatcher", "StopForward", "as_model_inputs", "capture_inputs", "find_blocks", "first_tensor",
           "is_causal_lm", "last_hidden_state", "run_model", "set_module", "token_rows"]


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: the children of the largest ``nn.ModuleList`` in the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        return []
    return [f"{best[0]}.{i}" for i in range(len(best[1]))]


def is_causal_lm(model: nn.Module) -> bool:
    """A model with an output head whose class is a causal LM (...ForCausalLM, GPT-2's LMHeadModel)."""
    get = getattr(model, "get_output_embeddings", None)
    name = type(model).__name__
    return callable(get) and get() is not None and ("CausalLM" in name or "LMHead" in name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def first_tensor(out) -> torch.Tensor:
    """The activation tensor of a module's output: the tensor itself, the first of a tuple, or
    ``last_hidden_state`` of a model output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    raise TypeError(f"cannot find an activation tensor in a module output of type {type(out).__name__}")


def last_hidden_state(out) -> torch.Tensor:
    """A model output's last hidden state: ``last_hidden_state``, else the last of ``hidden_states``
    (run the model with ``output_hidden_states=True``), else its first tensor."""
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    hidden = getattr(out, "hidden_states", None)
    if hidden:
        return hidden[-1]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return first_tensor(out)


def as_model_inputs(batch) -> dict:
    """A batch as model keyword arguments: a dict as it is, a tensor as ``{"input_ids": tensor}``."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, dict):
        return batch
    raise TypeError(f"a batch must be a dict of model inputs or a tensor of input ids, got {type(batch).__name__}")


def run_model(model: nn.Module, batch, forward: Optional[Callable] = None, **kwargs):
    """``forward(model, batch)`` when given, else ``model(**batch, **kwargs)``; a :class:`StopForward`
    raised by a hook ends the pass early (the result is then None)."""
    try:
        if forward is not None:
            return forward(model, batch)
        return model(**as_model_inputs(batch), **kwargs)
    except StopForward:
        return None


def token_rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(..., d) activations as 2-D float32 rows, padding rows left out when ``mask`` lines up with them."""
    rows = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0]:
        rows = rows[mask.reshape(-1).bool()]
    return rows.float()


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it came for; carries the hooked
    module's positional and keyword arguments."""

    def __init__(self, args=(), kwargs=None):
        super().__init__("forward pass stopped by a hook")
        self.module_args, self.module_kwargs = tuple(args), dict(kwargs or {})


class ModuleNotReached(RuntimeError):
    """The module :func:`capture_inputs` waited for never ran."""


def capture_inputs(module: nn.Module, call: Callable[[], object]) -> tuple[tuple, dict]:
    """(args, kwargs) that ``module`` receives when ``call()`` runs; the pass stops there."""
    def hook(mod, args, kwargs):
        raise StopForward(args, kwargs)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    except StopForward as stop:
        return stop.module_args, stop.module_kwargs
    finally:
        handle.remove()
    raise ModuleNotReached(f"{type(module).__name__} never ran during the forward pass")


class OutputCatcher:
    """Forward hooks that record the output tensor (:func:`first_tensor`) of named modules.

    ``pop()`` returns ``{name: tensor}`` of the last forward and clears it; ``remove()`` takes the
    hooks off. With ``detach=True`` the tensors are kept without their graph.
    """

    def __init__(self, model: nn.Module, names: list[str], detach: bool = False):
        self.acts: dict[str, torch.Tensor] = {}
        self.handles = []
        for n in names:
            try:
                m = model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"module {n!r} not found in {type(model).__name__}") from None
            self.handles.append(m.register_forward_hook(self._hook(n, detach)))

    def _hook(self, name, detach):
        def fn(module, args, out):
            t = first_tensor(out)
            self.acts[name] = t.detach() if detach else t
        return fn

    def pop(self) -> dict:
        acts, self.acts = self.acts, {}
        return acts

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
