"""Swap the linear layers of an existing model for ``LowRankLinear``, merge them back, save/load.

PEFT-style matching (``target_modules``, ``exclude_modules``, ``rank_pattern``) and a
torchao-style verb: ``swap_linear_layers(model, LowRankConfig(...))`` works in place and returns a
:class:`SwapReport`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .layers import LowRankLinear, check_rank, svd_factors

__all__ = ["LowRankConfig", "SwapReport", "LayerReport", "swap_linear_layers", "merge_linear_layers",
           "find_target_layers", "save_lowrank", "load_lowrank", "whitened_factors", "LAYOUT_FILE"]

LAYOUT_FILE = "lowrank_layout.json"
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
        calibration tokens (on MiniLM, 64 sentences / ~2k tokens for d_in 1536 gained nothing;
        128 sentences did; 1024 sentences took 80 s on 2 CPU cores). For a
        model used without further training: on all-MiniLM-L6-v2 at 50% it lifts the held-out
        embedding cosine from 0.864 to 0.914. As a start for distillation it did not help there (3.5 min:
        0.946 vs 0.951 from the plain whitened start), so the distillation recipe leaves it off.
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
        for k, v in self.rank_pattern.items():
            _check_rank_spec(f"rank_pattern[{k!r}]", v)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not (isinstance(self.target_modules, str) or _is_str_list(self.target_modules)):
            raise TypeError(f"target_modules must be 'all-linear', a regex string or a list of names, "
                            f"got {self.target_modules!r}")
        if self.exclude_modules is not None and not (isinstance(self.exclude_modules, str)
                                                     or _is_str_list(self.exclude_modules)):
            raise TypeError(f"exclude_modules must be a regex string or a list of names, got {self.exclude_modules!r}")
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


def _check_rank_spec(name, v):
    if v == "full":
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be an int rank or a float fraction in (0, 1], got {v!r}")
    if isinstance(v, float) and not 0.0 < v <= 1.0:
        raise ValueError(f"{name} as a fraction of parameters must be in (0, 1], got {v}")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")


def rank_for_fraction(keep: float, d_in: int, d_out: int) -> int:
    """Largest rank whose factors hold at most ``keep`` of the dense layer's parameters (>= 1)."""
    return max(1, min(min(d_in, d_out), math.floor(keep * d_in * d_out / (d_in + d_out))))


# ------------------------------------------------------------------------------------ matching

def _is_dense(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _dense_weight(module: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """(weight as (d_out, d_in), bias, kind)."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, "linear"
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


def find_target_layers(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """Names -> dense layers that ``config`` selects, in module order."""
    heads = _output_head_names(model)
    dense = {n: m for n, m in model.named_modules() if _is_dense(m)}
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
    layers: list[LayerReport]
    init: str
    allocation: str = "uniform"

    @property
    def params_before(self) -> int:
        return sum(l.params_before for l in self.layers)

    @property
    def params_after(self) -> int:
        return sum(l.params_after for l in self.layers)

    def to_table(self) -> str:
        head = ["layer", "shape (out x in)", "rank", "params before", "params after", "rel. error"]
        body = [[l.name, f"{l.d_out} x {l.d_in}", str(l.rank), f"{l.params_before:,}", f"{l.params_after:,}",
                 f"{l.rel_error:.3f}"] for l in self.layers]
        body.append(["total", "", "", f"{self.params_before:,}", f"{self.params_after:,}",
                     f"kept {self.params_after / max(1, self.params_before):.1%}"])
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])

    def __str__(self) -> str:
        return self.to_table()


# ------------------------------------------------------------------------------------ init

def _whitened_svd(weight: torch.Tensor, gram: torch.Tensor, damping: float, cross: Optional[torch.Tensor] = None):
    """(L, A, S, Bh): the Cholesky factor of the damped Gram matrix and the SVD of ``L^{-1} gram W^T``.

    With ``cross`` = E[x' x^T] (``gram`` then being E[x' x'^T] of other inputs x'), the SVD is of
    ``L^{-1} cross W^T`` instead: the rank-r factors then minimize E||W x - (U V)^T x'||^2."""
    w = weight.detach().to(torch.float64)
    g = gram.to(device=w.device, dtype=torch.float64)
    d = g.shape[0]
    eps = damping * g.diagonal().mean().clamp_min(1e-12)
    L = torch.linalg.cholesky(g + eps * torch.eye(d, dtype=g.dtype, device=g.device))
    c = g if cross is None else cross.to(device=w.device, dtype=torch.float64)
    B = torch.linalg.solve_triangular(L, c @ w.t(), upper=False)
    A, S, Bh = torch.linalg.svd(B, full_matrices=False)
    return L, A, S, Bh


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = 1e-2
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware factors of a (d_out, d_in) weight.

    With ``gram`` = E[x x^T] of the layer's inputs, minimizes E||x W^T - x U V||^2 over rank-``rank``
    U V: with ``gram + damping*mean(diag) I = L L^T`` (Cholesky), take the rank-r SVD of
    ``B = L^{-1} gram W^T`` (= (W L)^T up to the damping) ``= A S Bh``; then
    ``U = L^{-T} A_r S_r^{1/2}``, ``V = S_r^{1/2} Bh_r``. The expected output error at rank r is
    ``sum_{i>r} S_i^2`` (up to the damping).

    Computed in float64.
    """
    return _factors_at(_whitened_svd(weight, gram, damping), rank)


def _factors_at(decomposition, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U, V at ``rank`` from :func:`_whitened_svd`'s (L, A, S, Bh)."""
    L, A, S, Bh = decomposition
    root = S[:rank].sqrt()
    U = torch.linalg.solve_triangular(L.t(), A[:, :rank], upper=True) * root
    V = root[:, None] * Bh[:rank]
    return U, V


def _rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """A layer input as 2-D float32 rows, padding rows left out when ``mask`` lines up with them."""
    rows = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0]:
        rows = rows[mask.reshape(-1).bool()]
    return rows.float()


class _InputCapture:
    """Pre-hooks that hand each named layer's unmasked input rows (2-D) to ``sink(name, rows)``."""

    def __init__(self, model: nn.Module, names, sink):
        self.mask = None
        self.handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n, sink)) for n in names]

    def _hook(self, name, sink):
        def fn(module, args):
            sink(name, _rows(args[0], self.mask))
        return fn

    def run(self, model, batch, forward=None):
        if forward is not None:
            return forward(model, batch)
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        self.mask = batch.get("attention_mask")
        return model(**batch)

    def remove(self):
        for h in self.handles:
            h.remove()


def _as_batches(batches):
    batches = list(batches) if not hasattr(batches, "__len__") else batches
    if len(batches) == 0:
        raise ValueError("calibration data is empty: whitened init needs at least one batch")
    return batches


class _GramSum:
    """Running sums of x^T x in float64 (each batch's product taken in float32: fast and plenty exact)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, key, x):
        xf = x.float()
        g = (xf.t() @ xf).double()
        self.sums[key] = g if key not in self.sums else self.sums[key] + g
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def mean(self, key):
        if not self.counts.get(key):
            raise ValueError(f"calibration data never reached layer {key!r} (no unmasked inputs)")
        return self.sums[key] / self.counts[key]


@torch.no_grad()
def collect_input_grams(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                        forward=None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``batches`` and return, per layer name, the mean of x^T x over its inputs
    (float64, d_in x d_in). Only these statistics are held, never the activations.

    ``batches`` yields dicts of model keyword arguments (or tensors of input ids); ``forward`` can
    override how a batch is fed (``forward(model, batch)``). Rows where an ``attention_mask`` in the
    batch is 0 (padding) are left out.
    """
    from tqdm.auto import tqdm

    batches = _as_batches(batches)
    grams = _GramSum()
    cap = _InputCapture(model, list(layers), lambda n, rows: grams.add(n, rows))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibrating", disable=not progress):
            cap.run(model, batch, forward)
    finally:
        cap.remove()
        model.train(was_training)
    return {n: grams.mean(n) for n in layers}


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: the children of the largest ``nn.ModuleList`` in the model."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        return []
    return [f"{best[0]}.{i}" for i in range(len(best[1]))]


# ------------------------------------------------------------------------------------ swap / merge

def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _make_lowrank(name, m, r, config, stats, factors=None) -> tuple[LowRankLinear, LayerReport]:
    """The low-rank layer for dense ``m`` at rank ``r``; ``factors`` (U, V) skip the init's own computation."""
    w, b, kind = _dense_weight(m)
    d_out, d_in = w.shape
    new = LowRankLinear(d_in, d_out, r, bias=b is not None, dtype=w.dtype, device=w.device)
    new.dense_kind = kind
    with torch.no_grad():
        if factors is not None:
            U, V = factors
        elif config.init == "svd":
            U, V = svd_factors(w, r)
        elif config.init == "whitened":
            U, V = whitened_factors(w, stats, r, config.damping)
        if config.init != "random":
            new.U.copy_(U)
            new.V.copy_(V)
        if b is not None:
            new.bias.copy_(b)
        w64 = w.detach().double()
        err = (torch.linalg.matrix_norm(w64 - (new.U.double() @ new.V.double()).t())
               / torch.linalg.matrix_norm(w64).clamp_min(1e-30)).item()
    new.train(m.training)
    return new, LayerReport(name, d_in, d_out, r, d_in * d_out, r * (d_in + d_out), err)


def swap_linear_layers(model: nn.Module, config: Optional[LowRankConfig] = None, calibration=None,
                       forward=None, progress: bool = True) -> SwapReport:
    """Replace the selected dense layers of ``model`` by ``LowRankLinear`` in place.

    calibration: batches for ``init="whitened"`` (see :func:`collect_input_grams`).
    Returns a :class:`SwapReport` (print it for a per-layer table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = config or LowRankConfig()
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"config must be a LowRankConfig, got {type(config).__name__}")
    layers = find_target_layers(model, config)
    ranks = {}
    for name, m in layers.items():
        w, _, _ = _dense_weight(m)
        ranks[name] = _rank_for(name, w.shape[1], w.shape[0], config)
    stats = {n: None for n in layers}
    if config.init == "whitened":
        if calibration is None:
            raise ValueError("init='whitened' needs calibration batches: swap_linear_layers(model, config, "
                             "calibration=[{'input_ids': ..., 'attention_mask': ...}, ...])")
        # the sequential init fits the layers inside the blocks from its own statistics; the sensitivity
        # measurement still needs every layer's
        need = layers if config.allocation == "sensitivity" or not config.sequential else \
            {n: layers[n] for n in _outside_blocks(model, layers)}
        if need:
            stats.update(collect_input_grams(model, need, calibration, forward=forward, progress=progress))
    if config.allocation == "sensitivity":
        ranks = _sensitivity_ranks(model, layers, ranks, stats, config, calibration, forward, progress)
    if config.sequential:
        done = _sequential_swap(model, layers, ranks, stats, config, calibration, forward, progress)
        return SwapReport([done[n] for n in layers], config.init, config.allocation)
    reports = []
    for name, m in layers.items():
        new, report = _make_lowrank(name, m, ranks[name], config, stats[name])
        _set_module(model, name, new)
        reports.append(report)
    return SwapReport(reports, config.init, config.allocation)


def _final_output(model: nn.Module, batch, forward=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the model's last hidden state, or its first output tensor; the batch's attention mask)."""
    if forward is not None:
        out, mask = forward(model, batch), None
    else:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        out, mask = model(**batch, output_hidden_states=True), batch.get("attention_mask")
    hidden = getattr(out, "hidden_states", None)
    if hidden:
        return hidden[-1], mask
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cannot find an output tensor in {type(out).__name__} to measure sensitivity on")
    return out, mask


@torch.no_grad()
def _sensitivity_ranks(model: nn.Module, layers: dict[str, nn.Module], ranks: dict[str, int],
                      grams: dict[str, torch.Tensor], config: LowRankConfig, calibration,
                      forward=None, progress: bool = True) -> dict[str, int]:
    """Spread the parameters of ``ranks`` over ``layers`` by measured sensitivity
    (:mod:`lrkd_fast.allocation`). Runs the model once per layer over the first
    ``config.sensitivity_batches`` calibration batches, each time with only that layer cut to its
    rank in ``ranks``; returns the new ranks (same total parameters or fewer)."""
    from tqdm.auto import tqdm

    from .allocation import allocate_ranks

    batches = list(_as_batches(calibration))[:config.sensitivity_batches]
    was_training = model.training
    model.eval()
    try:
        refs = [_final_output(model, b, forward) for b in batches]

        def model_error() -> float:
            num = den = 0.0
            for b, (ref, mask) in zip(batches, refs):
                out, _ = _final_output(model, b, forward)
                err, size = (out.float() - ref.float()).pow(2), ref.float().pow(2)
                if mask is not None and mask.shape == err.shape[:-1]:
                    err, size = err[mask.bool()], size[mask.bool()]
                num, den = num + err.sum().item(), den + size.sum().item()
            return num / max(den, 1e-30)

        spectra, weights, costs, lo, hi = {}, {}, {}, {}, {}
        for name, m in tqdm(layers.items(), desc="measuring sensitivity", disable=not progress):
            w, _, _ = _dense_weight(m)
            d_out, d_in = w.shape
            decomposition = _whitened_svd(w, grams[name], config.damping)
            S2 = decomposition[2].pow(2)
            r0 = ranks[name]
            tail = S2[r0:].sum().item()
            costs[name], spectra[name] = d_in + d_out, S2
            if tail <= 1e-10 * S2.sum().item():  # exact at its rank already: nothing to trade, keep it
                weights[name], lo[name], hi[name] = 0.0, r0, r0
                continue
            new, _ = _make_lowrank(name, m, r0, config, grams[name], factors=_factors_at(decomposition, r0))
            _set_module(model, name, new)
            try:
                err = model_error()
            finally:
                _set_module(model, name, m)
            weights[name] = err / tail
            lo[name], hi[name] = 1, max(r0, min(d_in, d_out, d_in * d_out // (d_in + d_out)))
    finally:
        model.train(was_training)
    budget = sum(ranks[n] * costs[n] for n in layers)
    chosen = allocate_ranks(spectra, costs, budget, weights, lo, hi)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # under torchrun every process measures; a rounding difference must not give them different shapes
        box = [chosen]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen = box[0]
    return chosen


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


def _run(model: nn.Module, batch, forward=None) -> None:
    """Feed one calibration batch; a hook's ``_Stop`` ends the pass early."""
    try:
        if forward is not None:
            forward(model, batch)
        else:
            model(**({"input_ids": batch} if isinstance(batch, torch.Tensor) else batch))
    except _Stop:
        pass


class _BlockCall:
    """The arguments one block got in one calibration batch, apart from its hidden states (masks, positions)."""

    def __init__(self, args, kwargs):
        kwargs = dict(kwargs)
        self.hidden = args[0] if args else kwargs.pop("hidden_states")
        self.args, self.kwargs = args[1:], kwargs

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _block_calls(model: nn.Module, block_names: list[str], batches, forward=None) -> list[list[_BlockCall]]:
    """Per block in ``block_names`` (in call order), its :class:`_BlockCall` for every batch; the pass
    stops at the last of them. Hidden states are kept for the first block only: the others' follow
    from replaying it."""
    calls = [[] for _ in block_names]

    def record(i):
        def fn(module, args, kwargs):
            call = _BlockCall(args, kwargs)
            if i > 0:
                call.hidden = None
            calls[i].append(call)
            if i == len(block_names) - 1:
                raise _Stop
        return fn

    hooks = [model.get_submodule(b).register_forward_pre_hook(record(i), with_kwargs=True)
             for i, b in enumerate(block_names)]
    try:
        for batch in batches:
            _run(model, batch, forward)
    finally:
        for h in hooks:
            h.remove()
    if any(len(c) != len(batches) for c in calls):
        raise RuntimeError("sequential=True needs every block to run exactly once per calibration batch")
    return calls


def _input_at(block: nn.Module, layer: str, call: _BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    """What ``block``'s sub-layer ``layer`` receives when the block runs on ``hidden`` (the rest is skipped)."""
    seen = []

    def grab(module, args):
        seen.append(args[0])
        raise _Stop

    handle = block.get_submodule(layer).register_forward_pre_hook(grab)
    try:
        call.run(block, hidden)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"layer {layer!r} did not run when its block did: cannot fit it sequentially")
    return seen[0]


def _stages(block: nn.Module, names: list[str], call: _BlockCall, hidden: torch.Tensor) -> list[list[str]]:
    """``names`` (relative to ``block``) in the order the block calls them, consecutive layers that read
    the very same input tensor grouped (query/key/value, gate/up)."""
    seen = []
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda module, args, n=n: seen.append((n, args[0])))
             for n in names]
    try:
        call.run(block, hidden)
    finally:
        for h in hooks:
            h.remove()
    stages, done = [], set()
    for n, x in seen:
        if n in done:
            continue
        done.add(n)
        if stages and stages[-1][1] is x:
            stages[-1][0].append(n)
        else:
            stages.append(([n], x))
    missing = [n for n in names if n not in done]
    if missing:
        raise RuntimeError(f"layers {missing} never ran when their block did: cannot fit them sequentially")
    return [group for group, _ in stages]


def _outside_blocks(model: nn.Module, layers) -> list[str]:
    """The names in ``layers`` that are not inside one of the model's transformer blocks."""
    prefixes = tuple(b + "." for b in find_blocks(model))
    return [n for n in layers if not (prefixes and n.startswith(prefixes))]


@torch.no_grad()
def _sequential_swap(model: nn.Module, layers: dict[str, nn.Module], ranks: dict[str, int],
                     grams: dict[str, torch.Tensor], config: LowRankConfig, calibration, forward=None,
                     progress: bool = True) -> dict[str, LayerReport]:
    """``LowRankConfig.sequential``: swap the layers inside the blocks block by block and, within a block,
    in call order, each fitted (:func:`_whitened_svd` with ``cross``) to the dense layer's output on the
    dense model's inputs from the inputs the partly swapped model now gives it. Layers outside the
    blocks get the plain whitened init first. Returns the reports by layer name."""
    from tqdm.auto import tqdm

    blocks = find_blocks(model)
    inside = {b: [n for n in layers if n.startswith(b + ".")] for b in blocks}
    outside = _outside_blocks(model, layers)
    if len(outside) == len(layers):
        raise ValueError(f"sequential=True fits the layers inside the transformer blocks, but none of the "
                         f"selected layers of {type(model).__name__} is inside one (blocks: {blocks[:3]})")
    last = max(i for i, b in enumerate(blocks) if inside[b])
    batches = list(_as_batches(calibration))
    masks = [b.get("attention_mask") if isinstance(b, dict) else None for b in batches]
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    was_training = model.training
    model.eval()
    if use_cache:
        model_config.use_cache = False  # a replayed block must not append to a key/value cache
    try:
        # every block's arguments as the dense model calls it (they may differ per block, e.g. the
        # masks of sliding-window layers)
        calls = _block_calls(model, blocks[:last + 1], batches, forward)
        reports = {}
        for name in outside:
            new, reports[name] = _make_lowrank(name, layers[name], ranks[name], config, grams[name])
            _set_module(model, name, new)
        dense_h = [c.hidden for c in calls[0]]
        swapped_h = dense_h
        if outside:  # the swapped layers outside the blocks may already change the first block's input
            swapped_h = [c.hidden for c in _block_calls(model, blocks[:1], batches, forward)[0]]

        for i in tqdm(range(last + 1), desc="sequential whitened init", disable=not progress):
            block_name, block = blocks[i], model.get_submodule(blocks[i])
            names = inside[block_name]
            dense = copy.deepcopy(block) if names else block
            stages = _stages(block, [n[len(block_name) + 1:] for n in names], calls[i][0], swapped_h[0]) if names else []
            for stage in stages:
                gram = cross = 0.0
                count = 0
                for call, hd, hs, mask in zip(calls[i], dense_h, swapped_h, masks):
                    xd = _rows(_input_at(dense, stage[0], call, hd), mask)
                    xs = _rows(_input_at(block, stage[0], call, hs), mask)
                    gram = gram + (xs.t() @ xs).double()
                    cross = cross + (xs.t() @ xd).double()
                    count += xs.shape[0]
                if count == 0:
                    raise ValueError(f"calibration data never reached block {block_name!r} (no unmasked inputs)")
                for n in stage:
                    full = f"{block_name}.{n}"
                    w, _, _ = _dense_weight(layers[full])
                    factors = _factors_at(_whitened_svd(w, gram / count, config.damping, cross / count), ranks[full])
                    new, reports[full] = _make_lowrank(full, layers[full], ranks[full], config, None, factors=factors)
                    _set_module(model, full, new)
            if i < last:
                dense_h = [c.run(dense, h) for c, h in zip(calls[i], dense_h)]
                swapped_h = [c.run(block, h) for c, h in zip(calls[i], swapped_h)]
            del dense
    finally:
        if use_cache:
            model_config.use_cache = use_cache
        model.train(was_training)
    return reports


def merge_linear_layers(model: nn.Module) -> nn.Module:
    """Replace every ``LowRankLinear`` in ``model`` by the dense layer it computes, in place.

    The merged model is an ordinary model of its family and loads with ``AutoModel*.from_pretrained``.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no LowRankLinear layers to merge")
    for n in names:
        m = model.get_submodule(n)
        dense = m.to_dense()
        dense.train(m.training)
        _set_module(model, n, dense)
    return model


# ------------------------------------------------------------------------------------ save / load

def lowrank_layout(model: nn.Module) -> dict:
    return {n: dict(in_features=m.in_features, out_features=m.out_features, rank=m.rank,
                    bias=m.bias is not None, kind=m.dense_kind)
            for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def save_lowrank(model: nn.Module, path: str, **save_kwargs) -> None:
    """``model.save_pretrained(path)`` (safetensors) plus ``lowrank_layout.json`` describing the swap."""
    layout = lowrank_layout(model)
    if not layout:
        raise ValueError("model has no LowRankLinear layers; use save_pretrained directly")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_lowrank needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    with open(os.path.join(path, LAYOUT_FILE), "w") as f:
        json.dump({"format": 1, "layers": layout}, f, indent=1)


def _read_state_dict(path: str) -> dict:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for fn in files:
        full = os.path.join(path, fn)
        if not os.path.exists(full):
            raise FileNotFoundError(f"{full} not found (expected a model saved by save_lowrank)")
        state.update(load_file(full))
    return state


def load_lowrank(path: str, model_class=None, dtype: Optional[torch.dtype] = None, device=None) -> nn.Module:
    """Rebuild a model saved by :func:`save_lowrank`; its outputs match the saved model bit for bit.

    model_class: a transformers model class (default: the first of ``config.architectures``, else
    ``AutoModel``).
    """
    import transformers

    layout_file = os.path.join(path, LAYOUT_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path {path!r} is not a directory")
    if not os.path.exists(layout_file):
        raise FileNotFoundError(f"{layout_file} not found: {path!r} was not saved with save_lowrank "
                                "(a merged model loads with AutoModel*.from_pretrained)")
    with open(layout_file) as f:
        layout = json.load(f)["layers"]
    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch) if arch and hasattr(transformers, arch) else transformers.AutoModel
    if hasattr(model_class, "from_config"):
        model = model_class.from_config(config)
    else:
        model = model_class(config)
    for name, spec in layout.items():
        new = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])
        new.dense_kind = spec["kind"]
        _set_module(model, name, new)
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
