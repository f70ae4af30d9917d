"""The recipe behind ``lrkd-fast distill``: load, swap, distill, evaluate, save::

    from lrkd_fast.recipes import SwapRecipe, run_swap_recipe
    result = run_swap_recipe(SwapRecipe(steps=200))
    print(result.table())
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Union

from ..data import TextBatches
from ..distillation import CLONE_CHOICES, DistillConfig, Distiller
from ..evaluate import embedding_fidelity, sentence_embeddings
from ..model_utils import find_blocks
from ..rank import break_even_rank
from ..swap import ALLOCATIONS, INITS, LowRankConfig, save_lowrank, swap_linear_layers
from ..swap.config import dense_weight, find_target_layers, layer_ranks
from .base import (Recipe, RecipeError, RecipeResult, Row, _check, _is_int, diagnostics_batches, diagnostics_settings,
                   finish_output, keep_better, prepare)

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
    """

    keep: float = 0.5
    rank: Optional[int] = None
    target_modules: Union[str, list, None] = None  # None: every linear inside the transformer blocks
    init: str = "whitened"
    allocation: Optional[str] = None
    calib_texts: int = 1024
    steps: int = 800  # about 5 minutes for the whole default run on 2 CPU cores
    lr: float = 3e-4
    batch_size: int = 16  # more, smaller steps beat fewer large ones in a short run
    train_norms: bool = True
    train_bias: bool = True
    teacher_cache: bool = True
    clone_modules: Union[str, list, None] = "inner"
    output: str = "runs/lowrank-student"

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


def run_swap_recipe(r: SwapRecipe) -> RecipeResult:
    if not isinstance(r, SwapRecipe):
        raise TypeError(f"r must be a SwapRecipe, got {type(r).__name__}")
    pre = prepare(r)
    rank, teacher, tok, result, held_batches = pre.rank, pre.teacher, pre.tok, pre.result, pre.held_batches
    t_emb = sentence_embeddings(teacher, held_batches)

    allocation = r.resolved_allocation
    cfg = LowRankConfig(rank=r.rank if r.rank is not None else float(r.keep), allocation=allocation,
                        target_modules=r.target_modules or default_targets(teacher), init=r.init)
    _check_ranks(teacher, cfg, r)
    student = copy.deepcopy(teacher)
    t0 = time.time()
    calib = list(TextBatches(pre.train[:r.calib_texts], tok, 32, r.seq_len, shuffle=False, device=pre.device))
    report = swap_linear_layers(student, cfg, calibration=calib, progress=r.progress and rank == 0)
    result.swap_report = report
    s_params = sum(p.numel() for p in student.parameters())
    how = r.init if allocation == "uniform" else f"{r.init}, {allocation} ranks"
    start = Row(f"low-rank start ({how})", embedding_fidelity(sentence_embeddings(student, held_batches), t_emb),
                s_params, time.time() - t0)
    result.rows.append(start)

    dcfg = DistillConfig(steps=r.steps, max_minutes=r.minutes, lr=r.lr, seed=r.seed, train_norms=r.train_norms,
                         train_bias=r.train_bias, teacher_cache=r.teacher_cache, clone_modules=r.clone_modules,
                         progress=r.progress and rank == 0,
                         checkpoint_dir=os.path.join(r.output, "checkpoints"), checkpoint_every=r.checkpoint_every,
                         **diagnostics_settings(r))
    data = pre.train_batches()
    t1 = time.time()
    d = Distiller(student, teacher, dcfg)
    initial = d.trainable_state()
    try:
        result.history = d.train(data, resume_from=r.resume, diagnostics_data=diagnostics_batches(r, held_batches))
    finally:
        d.close()
    end = Row(f"distilled ({len(result.history['step'])} steps)",
              embedding_fidelity(sentence_embeddings(student, held_batches), t_emb), s_params, time.time() - t1)
    result.rows.append(end)
    keep_better(result, start, end, lambda: d.load_trainable_state(initial), r.save_worse)
    if rank == 0:
        save_lowrank(student, r.output)
        tok.save_pretrained(r.output)
        finish_output(r, "swap", pre.heldout)
    result.total_seconds = time.time() - pre.started
    return result
