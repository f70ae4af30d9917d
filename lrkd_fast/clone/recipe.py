"""Low-Rank Clone training: the loop (:class:`LRCTrainer`, on the shared :class:`TrainingLoop`) and the
end-to-end recipe behind ``lrkd-fast distill --method lrc`` (the counterpart of
:func:`lrkd_fast.recipes.run_swap_recipe`)::

    from lrkd_fast.clone import LRCRecipe, run_lrc_recipe
    print(run_lrc_recipe(LRCRecipe(minutes=2)).table())

Fidelity of a narrower encoder. The student's sentence embeddings have d_S dimensions and the
teacher's d_T, so they are compared through a linear read-out (ridge least squares, student ->
teacher) fitted on embeddings of *training* texts and applied to the held-out texts; the table's
mean/min cosine and nearest-neighbour agreement are on those held-out read-outs. This measures how
much of the teacher's embedding the student keeps and cannot be gamed by the trainable projections.
Causal teachers are compared the same way on mean-pooled last hidden states.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..data import TextBatches
from ..distillation import DistillConfig, TrainingLoop
from ..evaluate import EmbeddingFidelity, embedding_fidelity, sentence_embeddings
from ..recipes import RecipeResult, prepare
from .model import LowRankClone

__all__ = ["LRCTrainer", "LRCRecipe", "run_lrc_recipe", "readout_fidelity"]


class LRCTrainer(TrainingLoop):
    """Trains a :class:`LowRankClone`'s projections and norms with the shared loop (AdamW, schedule,
    clipping, progress, checkpoints, resume, gradient averaging under torchrun)."""

    def __init__(self, clone: LowRankClone, config: Optional[DistillConfig] = None):
        self.cfg = config or DistillConfig()
        self.model = clone
        self.params = [p for p in clone.parameters() if p.requires_grad]
        self._elapsed = None

    def compute_loss(self, batch):
        out = self.model(**batch)
        return out.loss, out.parts


def _ridge(S: torch.Tensor, T: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    S, T = S.double(), T.double()
    A = S.t() @ S
    A += lam * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A, S.t() @ T)


def readout_fidelity(s_fit, t_fit, s_held, t_held) -> EmbeddingFidelity:
    """Fidelity of held-out student embeddings mapped to the teacher's space by a ridge read-out fitted
    on (s_fit, t_fit)."""
    W = _ridge(s_fit, t_fit)
    mapped = F.normalize((s_held.double() @ W).float(), dim=-1)
    return embedding_fidelity(mapped, t_held)


@dataclass
class LRCRecipe:
    teacher: Optional[str] = None  # path; None = the packaged all-MiniLM-L6-v2
    data: Optional[str] = None  # text or jsonl file; None = CPython's pydoc topics
    student_hidden: int = 256
    # "pca" (data-informed; beat the paper's "random" by +0.155 held-out cosine on MiniLM after 120
    # steps, benchmarks/results/lrc_init) | "random" (the paper's N(0, 0.02))
    init: str = "pca"
    share_qkv: bool = False
    share_gate_up: bool = False
    alpha: float = 0.2
    temperature: float = 40.0
    kd_weight: float = 1.0
    lm_weight: float = 1.0
    gradient_checkpointing: bool = False
    calib_texts: int = 256
    fit_texts: int = 512  # training texts the fidelity read-out is fitted on
    heldout: int = 512
    steps: int = 400
    minutes: Optional[float] = 3.5
    lr: float = 1e-3  # 3e-3 and above diverge within ~10 steps on MiniLM (P entries are ~0.02)
    batch_size: int = 32
    seq_len: int = 128
    output: str = "runs/lrc-student"
    device: Optional[str] = None
    seed: int = 0
    resume: Optional[str] = None
    checkpoint_every: int = 0
    progress: bool = True


def _embed_student(clone: LowRankClone, batches):
    return sentence_embeddings(clone.export_student(), batches)


def run_lrc_recipe(r: LRCRecipe) -> RecipeResult:
    t_start = time.time()
    pre = prepare(r.teacher, r.data, r.heldout, r.batch_size, r.device, r.seed, r.output)
    rank, world, device, teacher, tok = pre.rank, pre.world, pre.device, pre.teacher, pre.tok
    train, held, result = pre.train, pre.held, pre.result
    held_b = list(TextBatches(held, tok, 64, r.seq_len, shuffle=False, device=device))
    fit_b = list(TextBatches(train[:r.fit_texts], tok, 64, r.seq_len, shuffle=False, device=device))
    t_held, t_fit = sentence_embeddings(teacher, held_b), sentence_embeddings(teacher, fit_b)

    t0 = time.time()
    calib = list(TextBatches(train[:r.calib_texts], tok, 32, r.seq_len, shuffle=False, device=device)) \
        if r.init == "pca" else None
    clone = LowRankClone.from_teacher(teacher, r.student_hidden, init=r.init, calibration=calib,
                                      share_qkv=r.share_qkv, share_gate_up=r.share_gate_up, alpha=r.alpha,
                                      temperature=r.temperature, kd_weight=r.kd_weight, lm_weight=r.lm_weight,
                                      gradient_checkpointing=r.gradient_checkpointing)
    student = clone.export_student()
    s_params = sum(p.numel() for p in student.parameters())
    fid0 = readout_fidelity(sentence_embeddings(student, fit_b), t_fit, sentence_embeddings(student, held_b), t_held)
    result.rows.append((f"LRC start ({r.init})", fid0, s_params, time.time() - t0))

    cfg = DistillConfig(steps=r.steps, max_minutes=r.minutes, lr=r.lr, seed=r.seed, progress=r.progress and rank == 0,
                        checkpoint_dir=os.path.join(r.output, "checkpoints"), checkpoint_every=r.checkpoint_every)
    data = TextBatches(train, tok, r.batch_size, r.seq_len, seed=r.seed, device=device, rank=rank, world_size=world)
    t1 = time.time()
    try:
        result.history = LRCTrainer(clone, cfg).train(data, resume_from=r.resume)
        student = clone.save_student(r.output, tokenizer=tok) if rank == 0 else clone.export_student()
    finally:
        clone.close()
    fid1 = readout_fidelity(sentence_embeddings(student, fit_b), t_fit, sentence_embeddings(student, held_b), t_held)
    result.rows.append((f"LRC trained ({len(result.history['step'])} steps)", fid1, s_params, time.time() - t1))
    result.rows.append(("saved student, total wall time", fid1, s_params, time.time() - t_start))
    return result
