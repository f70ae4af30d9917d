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

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from ..clone import LowRankClone, LRCLoss, LRCTrainer
from ..clone.model import ATTN_CLONES, DEFAULT_ATTN_CLONE
from ..evaluate import readout_fidelity, sentence_embeddings
from ..sharding import is_sharded_checkpoint, load_sharded_parameters, shard_training
from ..training import SCHEDULES, TrainConfig, load_parameters
from .base import (Recipe, RecipeError, RecipeResult, Row, _check, _is_int, diagnostics_batches, diagnostics_settings, finish_output,
                   keep_better, length_batches, prepare)

__all__ = ["LRC_PRESETS", "LRCRecipe", "lrc_preset", "lrc_train_config", "paper_alpha", "run_lrc_recipe"]

LRC_INITS = ("pca", "random")
LRC_PRESETS = ("paper",)


@dataclass(kw_only=True)
class LRCRecipe(Recipe):
    """A Low-Rank Clone with hidden size ``student_hidden``; ``loss`` holds the loss weights
    (:class:`~lrkd_fast.clone.LRCLoss`: alpha, temperature, kd_weight, lm_weight).

    init: "pca" (data-informed: projections from the teacher's principal hidden directions) or
        "random" (the paper's N(0, 0.02)); "pca" starts far closer to the teacher.
    attn_clone: the attention-output clone term, "student" (the paper's E(o_S, o_T P_o)) or "teacher"
        (the authors' code's: compared in the teacher width); see :class:`~lrkd_fast.clone.LowRankClone`.
    tie_head_projection: the LM head shares P_emb (True) or has its own projection (causal teachers).
    fit_texts: training texts the fidelity read-out is fitted on.
    warmup, schedule, decay_fraction: the learning-rate schedule (:class:`~lrkd_fast.training.TrainConfig`).
    fsdp: under torchrun (2 processes or more), shard the teacher, the projections, their gradients and
        the optimizer state across the processes with FSDP2 during training (:mod:`lrkd_fast.sharding`;
        checkpoints through torch.distributed.checkpoint, one shard per process). Only rank 0 reads the
        teacher's weights, into CPU memory; every other process builds it on the meta device and gets its
        shards from rank 0. The pca init, the teacher's embeddings and the student's export then run on
        the shards, one block gathered at a time (:meth:`~lrkd_fast.sharding.ShardedTraining.teacher_forward`).
    preset: the preset the settings came from (:func:`lrc_preset`), or None. The defaults are for the
        small built-in run (MiniLM on CPython's docs, minutes on a CPU); ``lrc_preset("paper")`` is the
        paper's recipe for real corpora.
    """

    student_hidden: int = 256
    init: str = "pca"
    share_qkv: bool = False
    share_gate_up: bool = False
    attn_clone: str = DEFAULT_ATTN_CLONE
    tie_head_projection: bool = True
    loss: LRCLoss = field(default_factory=LRCLoss)
    gradient_checkpointing: bool = False
    calib_texts: int = 256
    fit_texts: int = 512
    steps: int = 100  # estimated at about 5 minutes for the whole default run on 2 CPU cores
    lr: float = 1e-3  # 3e-3 and above diverge within ~10 steps on MiniLM (projection entries are ~0.02)
    batch_size: int = 32
    output: str = "runs/lrc-student"
    warmup: float = TrainConfig.warmup
    schedule: str = TrainConfig.schedule
    decay_fraction: float = TrainConfig.decay_fraction
    preset: Optional[str] = None
    fsdp: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check(isinstance(self.fsdp, bool), "fsdp", f"must be a bool, got {self.fsdp!r}")
        _check(not (self.fsdp and self.diagnostics_every), "fsdp",
               "cannot run with diagnostics_every: the diagnostics run the models on rank 0 alone, sharded "
               "models run on every process together")
        _check(_is_int(self.student_hidden) and self.student_hidden >= 2, "student_hidden",
               f"must be an int >= 2, got {self.student_hidden!r}")
        _check(self.init in LRC_INITS, "init", f"must be one of {LRC_INITS} for Low-Rank Clone, got {self.init!r}")
        _check(isinstance(self.loss, LRCLoss), "loss", f"must be an LRCLoss, got {type(self.loss).__name__}")
        _check(_is_int(self.fit_texts) and self.fit_texts >= 2, "fit_texts", f"must be an int >= 2, got {self.fit_texts!r}")
        _check(self.attn_clone in ATTN_CLONES, "attn_clone", f"must be one of {ATTN_CLONES}, got {self.attn_clone!r}")
        _check(isinstance(self.tie_head_projection, bool), "tie_head_projection",
               f"must be a bool, got {self.tie_head_projection!r}")
        _check(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1, "warmup",
               f"must be a fraction in [0, 1), got {self.warmup!r}")
        _check(isinstance(self.decay_fraction, (int, float)) and 0 < self.decay_fraction <= 1, "decay_fraction",
               f"must be a fraction in (0, 1], got {self.decay_fraction!r}")
        _check(self.schedule != "wsd" or self.warmup + self.decay_fraction <= 1, "decay_fraction",
               f"warmup + decay_fraction must be <= 1 for schedule 'wsd', got {self.warmup} + {self.decay_fraction}")
        _check(self.preset is None or self.preset in LRC_PRESETS, "preset",
               f"must be one of {LRC_PRESETS} or None, got {self.preset!r}")


def paper_alpha(teacher_hidden: int, student_hidden: int) -> float:
    """The paper's clone-loss weight alpha for a student of width ``student_hidden`` cloned from a teacher of
    width ``teacher_hidden``: 0.2 when the student keeps at most half of the teacher's width (LRC-1.5B:
    1536 of 3072), 0.5 for relatively wider students (LRC-1.7B: 1200 of 2048 = 0.59; LRC-4B: 2048 of
    3584 = 0.57). The paper gives only these three points; the rule is the width ratio that separates them."""
    for name, v in (("teacher_hidden", teacher_hidden), ("student_hidden", student_hidden)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if student_hidden >= teacher_hidden:
        raise ValueError(f"student_hidden ({student_hidden}) must be smaller than teacher_hidden ({teacher_hidden})")
    return 0.2 if student_hidden * 2 <= teacher_hidden else 0.5


def _teacher_hidden_size(teacher: Optional[str]) -> int:
    import transformers

    from ..data import packaged_minilm_path

    path = teacher or packaged_minilm_path()
    if teacher and not os.path.exists(teacher) and os.environ.get("HF_HUB_OFFLINE") != "0":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as load_teacher: no network, fail fast
    try:
        return int(transformers.AutoConfig.from_pretrained(path).hidden_size)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load teacher {path!r}: {exc}") from None


def lrc_preset(name: str, *, loss_fields: Optional[dict] = None, **fields) -> LRCRecipe:
    """The :class:`LRCRecipe` of preset ``name``; ``fields`` (recipe fields) and ``loss_fields`` (fields of
    its :class:`~lrkd_fast.clone.LRCLoss`) override the preset's values.

    "paper" (Hao et al. 2025): Adam (the loop's AdamW with weight decay 0, which is Adam), lr 1e-4, 0.5%
    warm-up then linear decay to 0, the paper's random N(0, 0.02) init, KL temperature 40, alpha by
    :func:`paper_alpha` (0.2, or 0.5 for students wider than half the teacher; the teacher's config is
    read for its width), sequences of 2048 tokens, 16 per step and process (32k tokens, the paper's
    32k-49k per step). The paper packs its corpus into 2048-token sequences: give ``data`` as a token
    store (``lrkd-fast tokenize``) for that; text data is read one text per sequence (at most 2048
    tokens, padded). The attention-output term stays the recipe's ``attn_clone`` (default "teacher",
    the authors' code's form). ``steps`` stays the caller's: the paper trains on 10-20B tokens.
    """
    if name not in LRC_PRESETS:
        raise ValueError(f"name must be one of {LRC_PRESETS}, got {name!r}")
    if loss_fields is not None and not isinstance(loss_fields, dict):
        raise TypeError(f"loss_fields must be a dict of LRCLoss fields, got {type(loss_fields).__name__}")
    if "loss" in fields and loss_fields:
        raise ValueError("give either loss (an LRCLoss) or loss_fields, not both")
    loss_fields = dict(loss_fields or {})
    values = dict(init="random", lr=1e-4, warmup=0.005, schedule="linear", seq_len=2048, batch_size=16)
    values.update(fields)
    if "loss" not in values:
        if "alpha" not in loss_fields:
            student = values.get("student_hidden", LRCRecipe.student_hidden)
            loss_fields["alpha"] = paper_alpha(_teacher_hidden_size(values.get("teacher")), student)
        loss_fields.setdefault("temperature", 40.0)
        values["loss"] = LRCLoss(**loss_fields)
    return LRCRecipe(preset=name, **values)


def lrc_train_config(r: LRCRecipe, rank: int = 0) -> TrainConfig:
    """The :class:`~lrkd_fast.training.TrainConfig` the recipe ``r`` trains with (on process ``rank``)."""
    if not isinstance(r, LRCRecipe):
        raise TypeError(f"r must be an LRCRecipe, got {type(r).__name__}")
    return TrainConfig(steps=r.steps, max_minutes=r.minutes, lr=r.lr, warmup=r.warmup, schedule=r.schedule,
                       decay_fraction=r.decay_fraction, seed=r.seed, progress=r.progress and rank == 0,
                       checkpoint_dir=os.path.join(r.output, "checkpoints"), checkpoint_every=r.checkpoint_every,
                       checkpoint_minutes=r.checkpoint_minutes, **diagnostics_settings(r))


def run_lrc_recipe(r: LRCRecipe) -> RecipeResult:
    if not isinstance(r, LRCRecipe):
        raise TypeError(f"r must be an LRCRecipe, got {type(r).__name__}")
    _check(not r.fsdp or int(os.environ.get("WORLD_SIZE", "1")) >= 2, "fsdp",
           "shards across the processes of torchrun: launch with torchrun --nproc_per_node N (N >= 2); a single "
           "process resumes a sharded run's checkpoint without fsdp")
    pre = prepare(r, token_store=True)  # data may be a token store (lrkd-fast tokenize): packed training
    rank, teacher, tok, result = pre.rank, pre.teacher, pre.tok, pre.result
    fit_b = pre.eval_batches(pre.train[:r.fit_texts])

    t0 = time.time()
    resumed = pre.checkpoint is not None  # the projections are in the checkpoint: no PCA calibration
    init = "random" if resumed else r.init
    calib = length_batches(pre.train[:r.calib_texts], tok, 32, r.seq_len, pre.device) if init == "pca" else None
    # sharded: only rank 0 holds the teacher's weights (on its CPU); the clone is sharded before the pca init,
    # which then runs the sharded teacher, as do the measurements and the export
    clone = LowRankClone.from_teacher(teacher, r.student_hidden, init="random" if r.fsdp else init,
                                      calibration=None if r.fsdp else calib,
                                      share_qkv=r.share_qkv, share_gate_up=r.share_gate_up, loss=r.loss,
                                      gradient_checkpointing=r.gradient_checkpointing, attn_clone=r.attn_clone,
                                      tie_head_projection=r.tie_head_projection)
    try:
        trainer = LRCTrainer(clone, lrc_train_config(r, rank))
        sharding = _shard(trainer, pre, calib) if r.fsdp else None
        if resumed:
            _load_resumed(clone, sharding, pre.checkpoint)
        export = sharding.export_student if sharding is not None else clone.export_student
        run_teacher = sharding.teacher_forward if sharding is not None else contextlib.nullcontext
        t_fit = []

        def fidelity(student):
            with run_teacher():
                if not t_fit:
                    t_fit.append(sentence_embeddings(teacher, fit_b))
                return pre.measure(lambda batches, t_emb: readout_fidelity(
                    sentence_embeddings(student, fit_b), t_fit[0], sentence_embeddings(student, batches), t_emb))

        student = export()
        s_params = sum(p.numel() for p in student.parameters())
        how = f"resumed at step {pre.checkpoint['step']}" if resumed else r.init
        start = Row(f"LRC start ({how})", params=s_params, seconds=time.time() - t0, **fidelity(student))
        result.rows.append(start)

        data = pre.train_batches()
        t1 = time.time()
        initial = trainer.trainable_state()
        result.history = trainer.train(data, resume_from=pre.checkpoint, diagnostics_data=diagnostics_batches(r, pre))
        end = Row(f"LRC trained ({len(result.history['step'])} steps)", params=s_params, seconds=time.time() - t1,
                  **fidelity(export()))
        result.rows.append(end)
        keep_better(result, start, end, lambda: trainer.load_trainable_state(initial), r.save_worse)
        student = export()  # every process takes part in a sharded export
        if rank == 0:
            clone.save_student(r.output, tokenizer=tok, model=student)
            finish_output(r, "lrc", pre.heldout, {"fit_texts": r.fit_texts}, history=result.history)
    finally:
        clone.close()
    result.total_seconds = time.time() - pre.started
    return result


def _shard(trainer, pre, calib):
    """Shard ``trainer`` with FSDP2 from rank 0's teacher (:func:`~lrkd_fast.sharding.shard_training`,
    ``from_rank0``) onto each process's device, then the pca init through the sharded teacher."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    sharding = shard_training(trainer, mesh=init_device_mesh(torch.device(pre.device).type, (pre.world,)),
                              from_rank0=True)
    if calib is not None:
        sharding.pca_init(calib)
    return sharding


def _load_resumed(clone, sharding, checkpoint: dict) -> None:
    """The resume checkpoint's projections and norms into the clone (or its shards), before the start is measured."""
    from ..training import CheckpointError

    try:
        if sharding is not None:
            sharding.load_parameters(checkpoint)
        else:
            load_parameters(clone, checkpoint["params"])
            if is_sharded_checkpoint(checkpoint):  # written by a sharded run: the parameters are in its shards
                load_sharded_parameters(clone, checkpoint)
    except (ValueError, CheckpointError) as exc:
        raise RecipeError("resume", f"checkpoint {checkpoint['path']!r} does not fit this student: {exc}") from None
