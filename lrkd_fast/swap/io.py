"""Saving a swapped model (safetensors plus a layout file) and rebuilding it bit for bit.

A folder written by :func:`save_lowrank` holds the model's ``config.json`` and safetensors weights
as ``save_pretrained`` writes them, plus ``lowrank_layout.json`` (which layers are low-rank, at which
rank). Its ``config.json`` names a ``model_type`` that transformers does not know (the real one is
kept under ``lrkd_fast_model_type``), so plain ``AutoModel*.from_pretrained`` refuses the folder with a
message pointing at :func:`load_lowrank` and ``lrkd-fast export PATH --merged OUT`` instead of
building the model with random dense layers where the low-rank ones were.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional

import torch
from torch import nn

from ..layers import DENSE_KINDS, LowRankLinear
from ..model_utils import set_module

__all__ = ["LAYOUT_FILE", "LAYOUT_FORMAT", "load_lowrank", "lowrank_layout", "read_layout", "save_lowrank",
           "weights_file_size"]

LAYOUT_FILE = "lowrank_layout.json"
LAYOUT_FORMAT = 1
# config.json of a saved low-rank model: the model's own model_type moves here, and model_type becomes
# MODEL_TYPE_NOTE (which plain transformers refuses, quoting it in its error)
MODEL_TYPE_KEY = "lrkd_fast_model_type"
MODEL_TYPE_NOTE = ("{model_type} with low-rank layers, saved by lrkd_fast. Load it with lrkd_fast.load_lowrank(path), "
                   "or write a plain dense copy that transformers loads with: lrkd-fast export PATH --merged OUT")
_LAYER_FIELDS = {"in_features": int, "out_features": int, "rank": int, "bias": bool, "kind": str}

# weight files transformers reads from a folder, in the order it looks for them (modeling_utils)
_SAFE, _SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_BIN, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")


def lowrank_layout(model: nn.Module) -> dict:
    """``{name: {in_features, out_features, rank, bias, kind}}`` of every ``LowRankLinear`` in ``model``."""
    return {n: dict(in_features=m.in_features, out_features=m.out_features, rank=m.rank,
                    bias=m.bias is not None, kind=m.dense_kind)
            for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _check_no_tied_lowrank(model: nn.Module, layout: dict) -> None:
    """A low-rank output head of a model whose config ties it to the input embeddings cannot be reloaded
    (transformers re-ties the head's ``weight`` on load): refuse it before writing anything."""
    from .config import tied_embeddings

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, LowRankLinear) and tied_embeddings(model):
        name = next(n for n, m in model.named_modules() if m is head)
        raise ValueError(f"layer {name!r} is low-rank but {type(model).__name__}'s config has "
                         f"tie_word_embeddings=True (the head shares the input embeddings' weight), so the saved "
                         f"model could not be reloaded; untie the head before swapping it "
                         f"(model.config.tie_word_embeddings = False and a copy of its weight) or leave it dense")


def _weight_file_names(path: str) -> list[str]:
    """Names of the files in folder ``path`` that hold (or index) model weights in transformers' layouts."""
    names = set()
    for fn in os.listdir(path):
        full = os.path.join(path, fn)
        if not os.path.isfile(full):
            continue
        if fn in (_SAFE, _SAFE_INDEX, _BIN, _BIN_INDEX) or _SHARD.fullmatch(fn):
            names.add(fn)
            if fn in (_SAFE_INDEX, _BIN_INDEX):  # shards with other names, listed in an index
                try:
                    with open(full) as f:
                        names.update(os.path.basename(v) for v in json.load(f)["weight_map"].values())
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    pass
    return sorted(n for n in names if os.path.isfile(os.path.join(path, n)))


def _mark_config(config_file: str) -> None:
    """Rewrite ``config.json`` so that plain transformers refuses it (see the module docstring)."""
    with open(config_file) as f:
        config = json.load(f)
    model_type = config.get("model_type") or ""
    config[MODEL_TYPE_KEY] = model_type
    config["model_type"] = MODEL_TYPE_NOTE.format(model_type=model_type or "a model")
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def save_lowrank(model: nn.Module, path: str, **save_kwargs) -> None:
    """``model.save_pretrained(path)`` (safetensors) plus ``lowrank_layout.json`` describing the swap.

    ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size``). Weight files an earlier save
    left in ``path`` in the other layout (a sharded index and its shards, or the single
    ``model.safetensors``, or PyTorch ``.bin`` files) are removed, so that ``path`` holds exactly the
    model just saved. Other files (a tokenizer, say) stay.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    path = os.fspath(path)
    layout = lowrank_layout(model)
    if not layout:
        raise ValueError("model has no LowRankLinear layers; use save_pretrained directly")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_lowrank needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    for key in ("variant", "push_to_hub", "safe_serialization"):
        if key in save_kwargs:
            raise ValueError(f"save_lowrank does not take {key}= (it writes plain safetensors that load_lowrank "
                             "reads back; upload the folder afterwards to share it)")
    _check_no_tied_lowrank(model, layout)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"path {path!r} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    # save into a fresh folder first: then exactly the files this save wrote are known
    staging = tempfile.mkdtemp(prefix=".lowrank-save-", dir=path)
    try:
        model.save_pretrained(staging, safe_serialization=True, **save_kwargs)
        _mark_config(os.path.join(staging, "config.json"))
        with open(os.path.join(staging, LAYOUT_FILE), "w") as f:
            json.dump({"format": LAYOUT_FORMAT, "layers": layout}, f, indent=1)
        written = sorted(os.listdir(staging))
        stale = [fn for fn in _weight_file_names(path) if fn not in written]
        for fn in written:
            os.replace(os.path.join(staging, fn), os.path.join(path, fn))
        for fn in stale:
            os.remove(os.path.join(path, fn))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_index(index_file: str) -> list[str]:
    try:
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index_file} is not a weight index (a JSON object with a 'weight_map' of tensor name -> "
                         f"file): {type(exc).__name__}: {exc}") from None
    return [os.path.join(os.path.dirname(index_file), fn) for fn in files]


def _weight_files(path: str) -> list[str]:
    """The weight files ``from_pretrained`` reads in folder ``path``, in transformers' order: the file named
    by the config's ``transformers_weights``, else ``model.safetensors``, its sharded index, then PyTorch's
    ``pytorch_model.bin`` and its index."""
    explicit = None
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file) as f:
                explicit = json.load(f).get("transformers_weights")
        except (OSError, ValueError, AttributeError):
            explicit = None
    if isinstance(explicit, str) and os.path.isfile(os.path.join(path, explicit)):
        full = os.path.join(path, explicit)
        return _read_index(full) if explicit.endswith(".index.json") else [full]
    for fn, is_index in ((_SAFE, False), (_SAFE_INDEX, True), (_BIN, False), (_BIN_INDEX, True)):
        full = os.path.join(path, fn)
        if os.path.isfile(full):
            return _read_index(full) if is_index else [full]
    return []


def weights_file_size(path: str) -> int:
    """Bytes of the weight files of the model saved in folder ``path``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path {path!r} is not a directory")
    files = _weight_files(path)
    if not files:
        raise FileNotFoundError(f"{path!r} holds no model.safetensors or pytorch_model.bin")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found (listed in the weight index of {path!r})")
    return sum(os.path.getsize(f) for f in files)


def _read_state_dict(path: str) -> dict:
    from safetensors.torch import load_file

    files = _weight_files(path)
    if not files or not all(f.endswith(".safetensors") for f in files):
        raise FileNotFoundError(f"{os.path.join(path, _SAFE)} not found "
                                "(expected a model saved by save_lowrank, in safetensors)")
    state = {}
    for full in files:
        if not os.path.exists(full):
            raise FileNotFoundError(f"{full} not found (listed in {os.path.join(path, _SAFE_INDEX)})")
        state.update(load_file(full))
    return state


def read_layout(path: str) -> dict:
    """The ``layers`` of the ``lowrank_layout.json`` in folder ``path``, checked: ``{name: {in_features,
    out_features, rank, bias, kind}}``. A file that is not this layout raises ValueError naming the file
    and the field."""
    layout_file = os.path.join(path, LAYOUT_FILE)
    if not os.path.exists(layout_file):
        raise FileNotFoundError(f"{layout_file} not found: {path!r} was not saved with save_lowrank "
                                "(a merged model loads with AutoModel*.from_pretrained)")
    try:
        with open(layout_file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{layout_file} is not valid JSON ({exc}); it should be the layout save_lowrank "
                         "wrote") from None
    if not isinstance(data, dict):
        raise ValueError(f"{layout_file} must hold a JSON object with 'format' and 'layers', "
                         f"got a JSON {type(data).__name__}")
    if "format" not in data:
        raise ValueError(f"{layout_file} has no 'format' field (save_lowrank writes format {LAYOUT_FORMAT})")
    if isinstance(data["format"], bool) or data["format"] != LAYOUT_FORMAT:
        raise ValueError(f"{layout_file}: unknown format {data['format']!r}; this version of lrkd_fast reads "
                         f"format {LAYOUT_FORMAT}")
    if "layers" not in data:
        raise ValueError(f"{layout_file} has no 'layers' field (the low-rank layers by module name)")
    layers = data["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{layout_file}: 'layers' must be a non-empty object {{module name: layer}}, got "
                         f"{layers!r:.80}")
    for name, spec in layers.items():
        where = f"{layout_file}: layers[{name!r}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be an object with {sorted(_LAYER_FIELDS)}, got {spec!r:.80}")
        for key, kind in _LAYER_FIELDS.items():
            if key not in spec:
                raise ValueError(f"{where} has no {key!r} field")
            v = spec[key]
            if not isinstance(v, kind) or (kind is int and (isinstance(v, bool) or v < 1)):
                want = {int: "a positive integer", bool: "true or false", str: "a string"}[kind]
                raise ValueError(f"{where}.{key} must be {want}, got {v!r}")
        if spec["kind"] not in DENSE_KINDS:
            raise ValueError(f"{where}.kind: unknown kind {spec['kind']!r}; expected one of {DENSE_KINDS}")
        if spec["rank"] > min(spec["in_features"], spec["out_features"]):
            raise ValueError(f"{where}.rank {spec['rank']} exceeds min(in_features, out_features)="
                             f"{min(spec['in_features'], spec['out_features'])}")
    return layers


def _read_config(path: str):
    """The model's config from ``config.json``, its own ``model_type`` restored (see :func:`save_lowrank`)."""
    import transformers
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found (expected a model saved by save_lowrank)")
    config_dict, unused = PretrainedConfig.get_config_dict(path, name_or_path=path)
    if MODEL_TYPE_KEY not in config_dict:  # saved before config.json was marked
        return transformers.AutoConfig.from_pretrained(path)
    model_type = config_dict.pop(MODEL_TYPE_KEY)
    config_dict["model_type"] = model_type
    try:
        config_class = CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(f"{config_file}: {MODEL_TYPE_KEY}={model_type!r} is not a model type this version of "
                         "transformers knows") from None
    return config_class.from_dict(config_dict, **unused)


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
    ``AutoModel``). Reads the weight files transformers would read in ``path``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path {path!r} is not a directory")
    layout = read_layout(path)
    config = _read_config(path)
    model_class = model_class or model_class_for(config)
    if hasattr(model_class, "from_config"):
        model = model_class.from_config(config)
    else:
        model = model_class(config)
    layout_file = os.path.join(path, LAYOUT_FILE)
    for name, spec in layout.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{layout_file}: layers[{name!r}] is not a module of {type(model).__name__}") from None
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
