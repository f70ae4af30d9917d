"""What to swap: the :class:`LowRankConfig`, PEFT-style layer matching, per-layer ranks, and the
:class:`SwapReport` a swap returns."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from .._table import format_table
from ..layers import check_rank
from ..rank import rank_for_fraction

__all__ = ["ALLOCATIONS", "INITS", "LayerReport", "LowRankConfig", "SwapReport", "dense_weight", "find_target_layers",
           "is_dense", "layer_ranks", "tied_embeddings"]

INITS = ("svd", "whitened", "random")
ALLOCATIONS = ("uniform", "sensitivity")


@dataclass
class LowRankConfig:
    """How to swap.

    rank: an int (the same rank for every layer; a rank above a layer's limit is an error), a float
        in (0, 1], the fraction of each layer's dense parameters to keep
        (rank = floor(keep * d_in * d_out / (d_in + d_out)), at least 1), or "full"
        (min(d_in, d_out): an exact factorization, mostly for tests).
    target_modules: "all-linear" (every nn.Linear / GPT-2 Conv1D except the output head), a list of
        module-name suffixes (``["query", "value"]`` matches ``...attention.self.query``), or a
        regex string matched against the full module name.
    exclude_modules: same forms (no "all-linear"); matched layers are left dense.
    rank_pattern: ``{regex: rank}``; the first pattern matching the end of a name (PEFT's rule:
        ``(.*\\.)?pattern$``) overrides ``rank`` for that layer (int or fraction, as ``rank``).
    init: "svd" (truncated SVD), "whitened" (activation-aware: needs ``calibration`` data passed
        to ``swap_linear_layers``) or "random".
    damping: for "whitened", added to the diagonal of each input covariance as a fraction of its
        mean diagonal, so rank-deficient inputs (padding, dead features) stay positive definite.
    allocation: "uniform" (each layer gets the rank ``rank`` / ``rank_pattern`` give it) or
        "sensitivity" (those ranks only set the total parameter budget, which is then spread over
        the layers by how much each one's truncation moves the model's output; needs
        ``init="whitened"``; see :mod:`lrkd_fast.allocation`). A layer's rank then stays between 1
        and the break-even rank where its factors would hold as many parameters as the dense weight.
    sensitivity_batches: how many of the calibration batches the sensitivity measurement runs
        (one forward pass over them per swapped layer).
    sequential: for "whitened", fit the layers inside the transformer blocks one after another, each
        to the dense model's output *given the inputs the already-swapped layers before it produce*
        (error correction, as GPTQ's sequential mode does for quantization): with ``x`` the dense
        model's input to a layer and ``x'`` the swapped model's, it minimizes E||W x - M x'||^2 over
        rank-r M. Layers that read the same input (query/key/value, gate/up) are fitted together.
        Costs a few block-sized forward passes over the calibration batches per block and holds
        every calibration batch's hidden states twice (dense and swapped) while it runs. Each
        correction is a d_in x d_in fit, so give it several times the largest d_in in unmasked
        calibration tokens. It lowers the output error of a model used as it is; as a start for
        distillation it is no better than the plain whitened init.
    """

    rank: Union[int, float, str] = 0.5
    target_modules: Union[str, list] = "all-linear"
    exclude_modules: Optional[Union[str, list]] = None
    rank_pattern: dict = field(default_factory=dict)
    init: str = "svd"
    damping: float = 1e-2
    allocation: str = "uniform"
    sensitivity_batches: int = 2
    sequential: bool = False

    def __post_init__(self):
        _check_rank_spec("rank", self.rank)
        if not isinstance(self.rank_pattern, dict):
            raise TypeError(f"rank_pattern must be a dict {{regex: rank}}, got {self.rank_pattern!r}")
        for k, v in self.rank_pattern.items():
            if not isinstance(k, str):
                raise TypeError(f"rank_pattern keys must be regex strings, got {k!r}")
            _check_regex("rank_pattern", k, rf"(.*\.)?{k}")
            _check_rank_spec(f"rank_pattern[{k!r}]", v)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not (isinstance(self.target_modules, str) or _is_str_list(self.target_modules)):
            raise TypeError(f"target_modules must be 'all-linear', a regex string or a list of names, "
                            f"got {self.target_modules!r}")
        if self.exclude_modules is not None and not (isinstance(self.exclude_modules, str)
                                                     or _is_str_list(self.exclude_modules)):
            raise TypeError(f"exclude_modules must be a regex string or a list of names, got {self.exclude_modules!r}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            _check_regex("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)
        if not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation == "sensitivity" and self.init != "whitened":
            raise ValueError(f"allocation='sensitivity' measures whitened spectra: it needs init='whitened', "
                             f"got init={self.init!r}")
        if isinstance(self.sensitivity_batches, bool) or not isinstance(self.sensitivity_batches, int) \
                or self.sensitivity_batches < 1:
            raise ValueError(f"sensitivity_batches must be an int >= 1, got {self.sensitivity_batches!r}")
        if not isinstance(self.sequential, bool):
            raise TypeError(f"sequential must be True or False, got {self.sequential!r}")
        if self.sequential and self.init != "whitened":
            raise ValueError(f"sequential=True corrects the whitened init: it needs init='whitened', "
                             f"got init={self.init!r}")


def _is_str_list(x) -> bool:
    return isinstance(x, (list, tuple, set)) and all(isinstance(s, str) for s in x)


def _check_regex(name: str, pattern: str, compiled: Optional[str] = None) -> None:
    """``pattern`` (as ``compiled``, when it is used inside a larger regex) must be a valid regex."""
    try:
        re.compile(pattern if compiled is None else compiled)
    except re.error as exc:
        raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({exc})") from None


def _check_rank_spec(name, v):
    if v == "full":
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be an int rank or a float fraction in (0, 1], got {v!r}")
    if isinstance(v, float) and not 0.0 < v <= 1.0:
        raise ValueError(f"{name} as a fraction of parameters must be in (0, 1], got {v}")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")


# ------------------------------------------------------------------------------------ matching

def is_dense(module: nn.Module) -> bool:
    """An ``nn.Linear`` or GPT-2's ``Conv1D``: the layers a swap can replace."""
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """(weight as (d_out, d_in), bias, kind) of an ``nn.Linear`` ("linear") or ``Conv1D`` ("conv1d")."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, "linear"
    if not is_dense(module):
        raise TypeError(f"module must be an nn.Linear or Conv1D, got {type(module).__name__}")
    return module.weight.t(), module.bias, "conv1d"


def _matches(name: str, spec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _output_head_names(model: nn.Module) -> set:
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        heads |= {n for n, m in model.named_modules() if m is head}
    return heads


def tied_embeddings(model: nn.Module) -> bool:
    """Whether ``model``'s config ties its output head to its input embeddings (``tie_word_embeddings``),
    which transformers re-applies whenever it builds or loads the model."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


def _check_not_tied(model: nn.Module, chosen: dict[str, nn.Module], heads: set) -> None:
    """A chosen layer whose weight another module shares (a tied LM head) cannot be factorized: the
    other module would keep the dense weight and transformers would re-tie the head on load."""
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    tie_flag = tied_embeddings(model)
    for name, m in chosen.items():
        others = sorted({o for o in owners.get(id(m.weight), []) if o.rsplit(".", 1)[0] != name})
        if others or (name in heads and tie_flag):
            tie = f"shares its weight with {', '.join(others)}" if others else "is tied to the input embeddings"
            raise ValueError(
                f"layer {name!r} {tie} (config.tie_word_embeddings={tie_flag}): a low-rank layer cannot stay tied "
                f"to a dense weight, and transformers would re-tie it when the model is loaded. Leave it dense "
                f"(do not select it in target_modules), or untie it before swapping: "
                f"model.config.tie_word_embeddings = False; "
                f"model.{name}.weight = torch.nn.Parameter(model.{name}.weight.detach().clone())")


def find_target_layers(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """Names -> dense layers that ``config`` selects, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"config must be a LowRankConfig, got {type(config).__name__}")
    heads = _output_head_names(model)
    dense = {n: m for n, m in model.named_modules() if is_dense(m)}
    if config.target_modules == "all-linear":
        chosen = {n: m for n, m in dense.items() if n not in heads}
    else:
        chosen = {n: m for n, m in dense.items() if _matches(n, config.target_modules)}
        if not isinstance(config.target_modules, str):
            # a listed name that matches no module at all is almost always a typo: say so
            all_names = [n for n, _ in model.named_modules()]
            unknown = [s for s in config.target_modules
                       if not any(n == s or n.endswith("." + s) for n in all_names)]
            if unknown:
                raise ValueError(f"target_modules {unknown} match no module of {type(model).__name__}; "
                                 f"dense layers look like: {list(dense)[:6]}")
    if config.exclude_modules:
        chosen = {n: m for n, m in chosen.items() if not _matches(n, config.exclude_modules)}
    if chosen:
        _check_not_tied(model, chosen, heads)
    if not chosen:
        raise ValueError(f"no nn.Linear or Conv1D layer of {type(model).__name__} matches "
                         f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}); "
                         f"dense layers: {list(dense)[:8]}")
    return chosen


def _rank_for(name: str, d_in: int, d_out: int, config: LowRankConfig) -> int:
    spec = config.rank
    for pat, v in config.rank_pattern.items():
        if re.fullmatch(rf"(.*\.)?{pat}", name):
            spec = v
            break
    if spec == "full":
        return min(d_in, d_out)
    if isinstance(spec, float):
        return rank_for_fraction(spec, d_in, d_out)
    try:
        return check_rank(spec, d_in, d_out)
    except ValueError as exc:
        raise ValueError(f"layer {name!r} ({d_out}x{d_in}): {exc}") from None


def layer_ranks(layers: dict[str, nn.Module], config: LowRankConfig) -> dict[str, int]:
    """The rank ``config.rank`` / ``rank_pattern`` give each of ``layers`` (before any allocation)."""
    ranks = {}
    for name, m in layers.items():
        w, _, _ = dense_weight(m)
        ranks[name] = _rank_for(name, w.shape[1], w.shape[0], config)
    return ranks


# ------------------------------------------------------------------------------------ report

@dataclass
class LayerReport:
    name: str
    d_in: int
    d_out: int
    rank: int
    params_before: int
    params_after: int
    rel_error: float  # ||W - U V||_F / ||W||_F of the weight (not the outputs)


@dataclass
class SwapReport:
    """What :func:`lrkd_fast.swap_linear_layers` did, layer by layer; ``str()`` gives a table."""

    layers: list[LayerReport]
    init: str
    allocation: str = "uniform"

    @property
    def params_before(self) -> int:
        return sum(l.params_before for l in self.layers)

    @property
    def params_after(self) -> int:
        return sum(l.params_after for l in self.layers)

    def total_row(self) -> str:
        """One line: the swapped layers' parameters before and after and the fraction kept."""
        return (f"swapped layers: {self.params_before:,} -> {self.params_after:,} parameters "
                f"(kept {self.params_after / max(1, self.params_before):.1%})")

    def to_table(self) -> str:
        head = ["layer", "shape (out x in)", "rank", "params before", "params after", "rel. error"]
        body = [[l.name, f"{l.d_out} x {l.d_in}", str(l.rank), f"{l.params_before:,}", f"{l.params_after:,}",
                 f"{l.rel_error:.3f}"] for l in self.layers]
        body.append(["total", "", "", f"{self.params_before:,}", f"{self.params_after:,}",
                     f"kept {self.params_after / max(1, self.params_before):.1%}"])
        return format_table(head, body)

    def __str__(self) -> str:
        return self.to_table()
