"""The recipe behind ``lrkd-fast distill``: load, swap, distill, evaluate, save::

    from lrkd_fast.recipes import SwapRecipe, run_swap_recipe
    result = run_swap_recipe(SwapRecipe(steps=200))
    print(result.table())
"""
from __future__ import annotations

import copy
import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from ..distillation import CLONE_CHOICES, OPTIMIZERS, DistillConfig, Distiller
from ..evaluate import embedding_fidelity, sentence_embeddings
from ..model_utils import find_blocks
from ..rank import break_even_rank
from ..swap import ALLOCATIONS, INITS, LowRankConfig, save_lowrank, swap_linear_layers
from ..swap.config import LayerReport, SwapReport, dense_weight, find_target_layers, layer_ranks
from ..training import load_parameters
from .base import (Recipe, RecipeError, RecipeResult, Row, _check, _is_int, diagnostics_batches, diagnostics_settings,
                   finish_output, keep_better, length_batches, prepare)

__all__ = ["SwapRecipe", "default_targets", "run_swap_recipe"]


@dataclass(kw_only=True)
class SwapRecipe(Recipe):
    """Swap a teacher's linear layers for low-rank ones (a copy), distill the copy back toward it.

    keep: fraction of the swapped layers' parameters kept. Under ``allocation="sensitivity"`` it is
        one budget for all of them together (spread by measured sensitivity); under "uniform" every
        layer keeps that fraction. Ignored when ``rank`` is set.
    rank: one rank for every swapped layer (uniform allocation).
    allocation: None = "sensitivity" for the whitened init at a ``keep`` fraction, else "uniform".
    clone_modules: activations cloned besides the output loss (see :class:`DistillConfig`); "inner"
        leaves the last block to the pooled-embedding loss, which generalized better than "auto".
    optimizer, whiten_max_features: see :class:`DistillConfig`. "whitened" steps each low-rank layer's
        input factor in whitened coordinates; with up to 1024 inputs (on MiniLM: attention and the FFN
        input, not the 1536-input FFN output, whose basis cost 35% more time per step) it gave +0.003
        held-out cosine at the same 800 steps (benchmarks/results/default_tuning).
    """

    keep: float = 0.5
    rank: Optional[int] = None
    target_modules: Union[str, list, None] = None  # None: every linear inside the transformer blocks
    init: str = "whitened"
    allocation: Optional[str] = None
    calib_texts: int = 1024
    steps: int = 800  # a quarter of the built-in corpus at batch 16 (benchmarks/results/corpus_size)
    lr: float = 3e-4
    batch_size: int = 16  # more, smaller steps beat fewer large ones in a short run
    train_norms: bool = True
    train_bias: bool = True
    teacher_cache: bool = True
    clone_modules: Union[str, list, None] = "inner"
    optimizer: str = "whitened"
    whiten_max_features: Optional[int] = 1024
    output: str = "runs/lowrank-student"
    # the pydoc training split 4 times per epoch: +0.007 pydoc held-out cosine at no cost on text from
    # elsewhere (benchmarks/results/default_tuning)
    DEFAULT_PYDOC_REPEATS: ClassVar[int] = 4

    def __post_init__(self):
        super().__post_init__()
        _check(not isinstance(self.keep, bool) and isinstance(self.keep, (int, float)) and 0 < self.keep <= 1,
               "keep", f"must be a fraction in (0, 1], got {self.keep!r}")
        _check(self.rank is None or (_is_int(self.rank) and self.rank >= 1), "rank",
               f"must be an int >= 1 or None, got {self.rank!r}")
        _check(self.init in INITS, "init", f"must be one of {INITS}, got {self.init!r}")
        _check(self.allocation is None or self.allocation in ALLOCATIONS, "allocation",
               f"must be None or one of {ALLOCATIONS}, got {self.allocation!r}")
        _check(not (self.allocation == "sensitivity" and self.init != "whitened"), "allocation",
               f"'sensitivity' needs init='whitened', got init={self.init!r}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.whiten_max_features is None or (_is_int(self.whiten_max_features) and self.whiten_max_features >= 1),
               "whiten_max_features", f"must be None or an int >= 1, got {self.whiten_max_features!r}")
        _check(not isinstance(self.clone_modules, str) or self.clone_modules in CLONE_CHOICES, "clone_modules",
               f"must be one of {CLONE_CHOICES}, a list of module names or None, got {self.clone_modules!r}")

    @property
    def resolved_allocation(self) -> str:
        if self.allocation is not None:
            return self.allocation
        return "sensitivity" if self.init == "whitened" and self.rank is None else "uniform"


def default_targets(model) -> str:
    """A regex over every module inside the model's transformer blocks ("all-linear" without blocks)."""
    blocks = find_blocks(model)
    if not blocks:
        return "all-linear"
    prefix = blocks[0].rsplit(".", 1)[0]
    return rf"{prefix.replace('.', chr(92) + '.')}\..*"


def _check_ranks(model, cfg: LowRankConfig, r: SwapRecipe) -> None:
    """Errors and warnings about the ranks before any work: a rank no layer can have, or one that
    makes layers larger than the dense ones they replace."""
    try:
        layers = find_target_layers(model, cfg)
        ranks = layer_ranks(layers, cfg)
    except ValueError as exc:
        raise RecipeError("rank" if r.rank is not None else "target_modules", str(exc)) from None
    if r.rank is None:
        return
    grown = []
    for name, m in layers.items():
        d_out, d_in = dense_weight(m)[0].shape
        if ranks[name] > break_even_rank(d_in, d_out):
            grown.append(f"{name} ({d_out}x{d_in}, break-even rank {break_even_rank(d_in, d_out)})")
    if grown:
        warnings.warn(f"rank {r.rank} makes {len(grown)} of {len(layers)} swapped layers larger than the dense "
                      f"layers they replace, e.g. {grown[0]}; use a lower rank or keep", UserWarning, stacklevel=3)


def _swap_as_checkpoint(student, cfg: LowRankConfig, ckpt: dict, r: SwapRecipe) -> SwapReport:
    """Swap ``student``'s layers at the ranks of the resume checkpoint ``ckpt`` and load its parameters,
    without calibration (the factors are in the checkpoint). The layers must be those ``cfg`` selects,
    of the checkpoint's shapes (and, for ranks that do not depend on calibration data, of the ranks
    ``cfg`` gives them); the RecipeError names the parameter and both shapes."""
    where, params = ckpt["path"], ckpt["params"]
    ranks = {n[:-2]: v.shape[1] for n, v in params.items() if n.endswith(".U") and v.dim() == 2}
    if not ranks:
        raise RecipeError("resume", f"checkpoint {where!r} holds no low-rank factors: it is not from a swap run")
    try:
        layers = find_target_layers(student, cfg)
        expected = layer_ranks(layers, cfg) if cfg.allocation == "uniform" else {}
    except ValueError as exc:
        raise RecipeError("target_modules", str(exc)) from None
    only_ckpt, only_run = sorted(set(ranks) - set(layers)), sorted(set(layers) - set(ranks))
    if only_ckpt or only_run:
        raise RecipeError("resume", f"checkpoint {where!r} swapped other layers than this run selects "
                                    f"(only in the checkpoint: {only_ckpt[:3]}; only in this run: {only_run[:3]}): "
                                    f"resume with the target modules of the run that wrote it")
    for name, m in layers.items():
        d_out, d_in = dense_weight(m)[0].shape
        want = (d_in, expected.get(name, ranks[name]))
        got = tuple(params[name + ".U"].shape)
        if got != want:
            why = f" (rank {want[1]} from this run's keep / rank)" if got[0] == d_in else ""
            raise RecipeError("resume", f"checkpoint {where!r} does not fit this student: parameter {name + '.U'!r} "
                                        f"has shape {got} in the checkpoint but {want} in the student{why}")
    layout = LowRankConfig(rank=cfg.rank, target_modules=list(layers), init="random",
                           rank_pattern={re.escape(n): ranks[n] for n in layers})
    swap_linear_layers(student, layout, progress=False)
    try:
        load_parameters(student, params)
    except ValueError as exc:
        raise RecipeError("resume", f"checkpoint {where!r} does not fit this student: {exc}") from None
    reports = []
    for name, m in layers.items():  # ``layers`` still holds the dense modules the swap replaced
        w = dense_weight(m)[0].detach().double()
        lr = student.get_submodule(name)
        d_out, d_in = w.shape
        err = (torch.linalg.matrix_norm(w - (lr.U.double() @ lr.V.double()).t())
               / torch.linalg.matrix_norm(w).clamp_min(1e-30)).item()
        reports.append(LayerReport(name, d_in, d_out, ranks[name], d_in * d_out, ranks[name] * (d_in + d_out), err))
    return SwapReport(reports, "resumed", cfg.allocation)


def swapped_student(pre, r: SwapRecipe) -> tuple:
    """The recipe's student at its start: (a copy of ``pre.teacher`` with its layers swapped and calibrated
    on the first ``r.calib_texts`` training texts, or rebuilt from the resume checkpoint; its SwapReport;
    how it started, for the table)."""
    allocation = r.resolved_allocation
    cfg = LowRankConfig(rank=r.rank if r.rank is not None else float(r.keep), allocation=allocation,
                        target_modules=r.target_modules or default_targets(pre.teacher), init=r.init)
    _check_ranks(pre.teacher, cfg, r)
    student = copy.deepcopy(pre.teacher)
    if pre.checkpoint is not None:  # the factors are in the checkpoint: no calibration
        return student, _swap_as_checkpoint(student, cfg, pre.checkpoint, r), \
            f"resumed at step {pre.checkpoint['step']}"
    # by length (little padding), the texts of the sensitivity measurement's batches (the first ones) among themselves
    texts, first = pre.train[:r.calib_texts], 32 * cfg.sensitivity_batches
    calib = length_batches(texts[:first], pre.tok, 32, r.seq_len, pre.device) + \
        length_batches(texts[first:], pre.tok, 32, r.seq_len, pre.device)
    report = swap_linear_layers(student, cfg, calibration=calib, progress=r.progress and pre.rank == 0)
    return student, report, r.init if allocation == "uniform" else f"{r.init}, {allocation} ranks"


def swap_distill_config(r: SwapRecipe, rank: int = 0) -> DistillConfig:
    """The :class:`DistillConfig` the recipe ``r`` trains with (on process ``rank``)."""
    return DistillConfig(steps=r.steps, max_minutes=r.minutes, lr=r.lr, seed=r.seed, train_norms=r.train_norms,
                         train_bias=r.train_bias, teacher_cache=r.teacher_cache, clone_modules=r.clone_modules,
                         optimizer=r.optimizer, whiten_max_features=r.whiten_max_features,
                         progress=r.progress and rank == 0,
                         checkpoint_dir=os.path.join(r.output, "checkpoints"), checkpoint_every=r.checkpoint_every,
                         checkpoint_minutes=r.checkpoint_minutes, **diagnostics_settings(r))


def run_swap_recipe(r: SwapRecipe) -> RecipeResult:
    if not isinstance(r, SwapRecipe):
        raise TypeError(f"r must be a SwapRecipe, got {type(r).__name__}")
    pre = prepare(r)
    rank, teacher, tok, result = pre.rank, pre.teacher, pre.tok, pre.result

    t0 = time.time()
    student, report, how = swapped_student(pre, r)
    result.swap_report = report
    s_params = sum(p.numel() for p in student.parameters())
    def fidelity(batches, t_emb):
        return embedding_fidelity(sentence_embeddings(student, batches), t_emb)

    start = Row(f"low-rank start ({how})", params=s_params, seconds=time.time() - t0, **pre.measure(fidelity))
    result.rows.append(start)

    dcfg = swap_distill_config(r, rank)
    data = pre.train_batches()
    t1 = time.time()
    d = Distiller(student, teacher, dcfg)
    initial = d.trainable_state()
    try:
        result.history = d.train(data, resume_from=pre.checkpoint, diagnostics_data=diagnostics_batches(r, pre))
    finally:
        d.close()
    end = Row(f"distilled ({len(result.history['step'])} steps)", params=s_params, seconds=time.time() - t1,
              **pre.measure(fidelity))
    result.rows.append(end)
    keep_better(result, start, end, lambda: d.load_trainable_state(initial), r.save_worse)
    if rank == 0:
        save_lowrank(student, r.output)
        tok.save_pretrained(r.output)
        finish_output(r, "swap", pre.heldout, history=result.history)
    result.total_seconds = time.time() - pre.started
    return result
