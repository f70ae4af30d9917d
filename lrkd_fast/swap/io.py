"""Saving a swapped model (safetensors plus a layout file) and rebuilding it bit for bit."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from ..layers import LowRankLinear
from ..model_utils import set_module

__all__ = ["LAYOUT_FILE", "load_lowrank", "lowrank_layout", "save_lowrank", "weights_file_size"]

LAYOUT_FILE = "lowrank_layout.json"


def lowrank_layout(model: nn.Module) -> dict:
    """``{name: {in_features, out_features, rank, bias, kind}}`` of every ``LowRankLinear`` in ``model``."""
    return {n: dict(in_features=m.in_features, out_features=m.out_features, rank=m.rank,
                    bias=m.bias is not None, kind=m.dense_kind)
            for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def save_lowrank(model: nn.Module, path: str, **save_kwargs) -> None:
    """``model.save_pretrained(path)`` (safetensors) plus ``lowrank_layout.json`` describing the swap."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    layout = lowrank_layout(model)
    if not layout:
        raise ValueError("model has no LowRankLinear layers; use save_pretrained directly")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_lowrank needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    with open(os.path.join(path, LAYOUT_FILE), "w") as f:
        json.dump({"format": 1, "layers": layout}, f, indent=1)


def _weight_files(path: str) -> list[str]:
    """The weight files ``from_pretrained`` reads in folder ``path`` (safetensors, sharded or not,
    else PyTorch's ``pytorch_model.bin``)."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                return [os.path.join(path, fn) for fn in sorted(set(json.load(f)["weight_map"].values()))]
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    return []


def weights_file_size(path: str) -> int:
    """Bytes of the weight files of the model saved in folder ``path``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path {path!r} is not a directory")
    files = _weight_files(path)
    if not files:
        raise FileNotFoundError(f"{path!r} holds no model.safetensors or pytorch_model.bin")
    return sum(os.path.getsize(f) for f in files)


def _read_state_dict(path: str) -> dict:
    from safetensors.torch import load_file

    files = [f for f in _weight_files(path) if f.endswith(".safetensors")]
    if not files:
        raise FileNotFoundError(f"{os.path.join(path, 'model.safetensors')} not found "
                                "(expected a model saved by save_lowrank)")
    state = {}
    for full in files:
        if not os.path.exists(full):
            raise FileNotFoundError(f"{full} not found (expected a model saved by save_lowrank)")
        state.update(load_file(full))
    return state


def model_class_for(config, default=None):
    """The transformers class named first in ``config.architectures`` (``default``, else ``AutoModel``,
    when there is none or transformers does not know it)."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch and hasattr(transformers, arch):
        return getattr(transformers, arch)
    return default or transformers.AutoModel


def load_lowrank(path: str, model_class=None, dtype: Optional[torch.dtype] = None, device=None) -> nn.Module:
    """Rebuild a model saved by :func:`save_lowrank`; its outputs match the saved model bit for bit.

    model_class: a transformers model class (default: the first of ``config.architectures``, else
    ``AutoModel``).
    """
    import transformers

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    path = os.fspath(path)
    layout_file = os.path.join(path, LAYOUT_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path {path!r} is not a directory")
    if not os.path.exists(layout_file):
        raise FileNotFoundError(f"{layout_file} not found: {path!r} was not saved with save_lowrank "
                                "(a merged model loads with AutoModel*.from_pretrained)")
    with open(layout_file) as f:
        layout = json.load(f)["layers"]
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = model_class or model_class_for(config)
    if hasattr(model_class, "from_config"):
        model = model_class.from_config(config)
    else:
        model = model_class(config)
    for name, spec in layout.items():
        new = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])
        new.dense_kind = spec["kind"]
        set_module(model, name, new)
    state = _read_state_dict(path)
    # assign=True keeps the saved tensors (and their dtypes) as they are: bit-exact reload
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if unexpected or missing:
        raise ValueError(f"checkpoint at {path!r} does not match its layout: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    model.eval()
    return model
