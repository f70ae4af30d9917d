"""The recipe behind ``lrkd-fast distill --method lrc``: a Low-Rank Clone of the teacher, trained and
exported as a plain Hugging Face model::

    from lrkd_fast.recipes import LRCRecipe, run_lrc_recipe
    print(run_lrc_recipe(LRCRecipe(steps=100)).table())

Fidelity of a narrower encoder: the student's sentence embeddings have d_S dimensions and the
teacher's d_T, so they are compared through a ridge read-out (student -> teacher) fitted on
embeddings of *training* texts and applied to the held-out texts
(:func:`lrkd_fast.evaluate.readout_fidelity`). Causal teachers are compared the same way on
mean-pooled last hidden states.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..clone import LowRankClone, LRCLoss, LRCTrainer
from ..data import TextBatches
from ..evaluate import readout_fidelity, sentence_embeddings
from ..training import TrainConfig
from .base import (Recipe, RecipeResult, Row, _check, _is_int, diagnostics_batches, diagnostics_settings, finish_output,
                   keep_better, prepare)

__all__ = ["LRCRecipe", "run_lrc_recipe"]

LRC_INITS = ("pca", "random")


@dataclass(kw_only=True)
class LRCRecipe(Recipe):
    """A Low-Rank Clone with hidden size ``student_hidden``; ``loss`` holds the loss weights
    (:class:`~lrkd_fast.clone.LRCLoss`: alpha, temperature, kd_weight, lm_weight).

    init: "pca" (data-informed: projections from the teacher's principal hidden directions) or
        "random" (the paper's N(0, 0.02)); "pca" starts far closer to the teacher.
    fit_texts: training texts the fidelity read-out is fitted on.
    """

    student_hidden: int = 256
    init: str = "pca"
    share_qkv: bool = False
    share_gate_up: bool = False
    loss: LRCLoss = field(default_factory=LRCLoss)
    gradient_checkpointing: bool = False
    calib_texts: int = 256
    fit_texts: int = 512
    steps: int = 100  # estimated at about 5 minutes for the whole default run on 2 CPU cores
    lr: float = 1e-3  # 3e-3 and above diverge within ~10 steps on MiniLM (projection entries are ~0.02)
    batch_size: int = 32
    output: str = "runs/lrc-student"

    def __post_init__(self):
        super().__post_init__()
        _check(_is_int(self.student_hidden) and self.student_hidden >= 2, "student_hidden",
               f"must be an int >= 2, got {self.student_hidden!r}")
        _check(self.init in LRC_INITS, "init", f"must be one of {LRC_INITS} for Low-Rank Clone, got {self.init!r}")
        _check(isinstance(self.loss, LRCLoss), "loss", f"must be an LRCLoss, got {type(self.loss).__name__}")
        _check(_is_int(self.fit_texts) and self.fit_texts >= 2, "fit_texts", f"must be an int >= 2, got {self.fit_texts!r}")


def run_lrc_recipe(r: LRCRecipe) -> RecipeResult:
    if not isinstance(r, LRCRecipe):
        raise TypeError(f"r must be an LRCRecipe, got {type(r).__name__}")
    pre = prepare(r)
    rank, teacher, tok, result, held_b = pre.rank, pre.teacher, pre.tok, pre.result, pre.held_batches
    fit_b = pre.eval_batches(pre.train[:r.fit_texts])
    t_held, t_fit = sentence_embeddings(teacher, held_b), sentence_embeddings(teacher, fit_b)

    def fidelity(student):
        return readout_fidelity(sentence_embeddings(student, fit_b), t_fit, sentence_embeddings(student, held_b),
                                t_held)

    t0 = time.time()
    calib = list(TextBatches(pre.train[:r.calib_texts], tok, 32, r.seq_len, shuffle=False, device=pre.device)) \
        if r.init == "pca" else None
    clone = LowRankClone.from_teacher(teacher, r.student_hidden, init=r.init, calibration=calib,
                                      share_qkv=r.share_qkv, share_gate_up=r.share_gate_up, loss=r.loss,
                                      gradient_checkpointing=r.gradient_checkpointing)
    student = clone.export_student()
    s_params = sum(p.numel() for p in student.parameters())
    start = Row(f"LRC start ({r.init})", fidelity(student), s_params, time.time() - t0)
    result.rows.append(start)

    cfg = TrainConfig(steps=r.steps, max_minutes=r.minutes, lr=r.lr, seed=r.seed, progress=r.progress and rank == 0,
                      checkpoint_dir=os.path.join(r.output, "checkpoints"), checkpoint_every=r.checkpoint_every,
                      **diagnostics_settings(r))
    data = pre.train_batches()
    t1 = time.time()
    trainer = LRCTrainer(clone, cfg)
    initial = trainer.trainable_state()
    try:
        result.history = trainer.train(data, resume_from=r.resume, diagnostics_data=diagnostics_batches(r, held_b))
        end = Row(f"LRC trained ({len(result.history['step'])} steps)", fidelity(clone.export_student()), s_params,
                  time.time() - t1)
        result.rows.append(end)
        keep_better(result, start, end, lambda: trainer.load_trainable_state(initial), r.save_worse)
        if rank == 0:
            clone.save_student(r.output, tokenizer=tok)
            finish_output(r, "lrc", pre.heldout, {"fit_texts": r.fit_texts})
    finally:
        clone.close()
    result.total_seconds = time.time() - pre.started
    return result
