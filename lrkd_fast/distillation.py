"""Distill a low-rank student back toward its dense teacher.

The teacher is frozen; the student's low-rank factors (optionally its norms) train on

    loss = clone_weight * clone_loss(student activations, teacher activations)
         + output_weight * output loss

Activations are caught with forward hooks at ``clone_modules`` (default: every transformer block's
output) and compared with the fused clone loss; the output loss is the fused KD loss on the LM head
for causal LMs, and cosine (or MSE) between mean-pooled embeddings for encoders.

``Distiller.compute_loss(batch)`` gives the loss for one batch, for use in any training loop
(Hugging Face Trainer included); ``Distiller.train`` / :func:`distill` run the shared
:class:`~lrkd_fast.training.TrainingLoop` (AdamW, warm-up and decay, gradient clipping, bf16
autocast where the device supports it, a progress bar, checkpoints and exact resume).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import mean_pool
from .layers import LowRankLinear
from .model_utils import OutputCatcher, find_blocks, is_causal_lm
from .teacher_cache import TeacherCache
from .training import TrainConfig, TrainingLoop

__all__ = ["CLONE_CHOICES", "OPTIMIZERS", "OUTPUT_LOSSES", "DistillConfig", "Distiller", "distill"]

OUTPUT_LOSSES = ("auto", "kd", "cosine", "mse", "none")
CLONE_CHOICES = ("auto", "inner", "lowrank")
OPTIMIZERS = ("adamw", "whitened")
_LAST = "\0last_hidden_state"  # key of the teacher's last hidden state among its targets


@dataclass
class DistillConfig(TrainConfig):
    """:class:`~lrkd_fast.training.TrainConfig` (steps, lr, schedule, checkpoints, ...) plus what the
    swap distillation trains on.

    clone_modules: "auto" = every transformer block's output; "inner" = every block's but the last,
        whose job the output loss does; "lowrank" = every swapped layer's output; a list of module
        names; None = no activation cloning.
    clone_normalize: divide each clone term by the teacher activation's mean square.
    output_loss: "kd" (causal LMs: KL on the LM head), "cosine" or "mse" (mean-pooled embeddings),
        "none"; "auto" picks "kd" for causal LMs and "cosine" otherwise.
    temperature, ce_weight: for output_loss="kd"; ce_weight adds next-token cross-entropy on the data.
    train_norms, train_bias: LayerNorm / RMSNorm weights and the swapped layers' biases train too.
    autocast: "auto" (bf16 on CUDA with bf16 support; the CPU stays in fp32, where bf16 was slower),
        "bf16", "off".
    teacher_cache: keep the teacher's targets per text and reuse them when the text comes back
        (:class:`~lrkd_fast.teacher_cache.TeacherCache`), up to ``teacher_cache_gb``. Not saved in
        checkpoints: a resumed run refills it, so its losses match up to float rounding.
    optimizer: "adamw", or "whitened": :class:`~lrkd_fast.optim.WhitenedAdamW`, whose steps for each
        low-rank layer's input factor U are taken in whitened input coordinates. The bases come from
        the teacher's inputs to the same layers over the run's first ``whiten_batches`` batches
        (damped by ``whiten_damping``, as the whitened init), averaged over the processes of a
        data-parallel run; layers with more than ``whiten_max_features`` inputs (None: no limit) take
        plain AdamW steps, since the basis costs ``2 d_in^2 r`` FLOPs per step. Not with FSDP shards.
    """

    clone_modules: Union[str, list, None] = "auto"
    clone_weight: float = 1.0
    clone_normalize: bool = True
    output_loss: str = "auto"
    output_weight: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 0.0
    train_norms: bool = False
    train_bias: bool = False
    autocast: str = "auto"
    teacher_cache: bool = False
    teacher_cache_gb: float = 2.0
    optimizer: str = "adamw"
    whiten_batches: int = 32
    whiten_damping: float = 1e-2
    whiten_max_features: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.output_loss not in OUTPUT_LOSSES:
            raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES}, got {self.output_loss!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if isinstance(self.clone_modules, str) and self.clone_modules not in CLONE_CHOICES:
            raise ValueError(f"clone_modules must be one of {CLONE_CHOICES}, a list of module names or None, "
                             f"got {self.clone_modules!r}")
        finite = lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        if not (finite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature!r}")
        for name in ("clone_weight", "output_weight", "ce_weight"):
            if not (finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)!r}")
        if not (finite(self.teacher_cache_gb) and self.teacher_cache_gb > 0):
            raise ValueError(f"teacher_cache_gb must be > 0 and finite, got {self.teacher_cache_gb!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.whiten_batches, bool) or not isinstance(self.whiten_batches, int) or self.whiten_batches < 1:
            raise ValueError(f"whiten_batches must be an int >= 1, got {self.whiten_batches!r}")
        if not (finite(self.whiten_damping) and self.whiten_damping > 0):
            raise ValueError(f"whiten_damping must be > 0 and finite, got {self.whiten_damping!r}")
        if self.whiten_max_features is not None and (isinstance(self.whiten_max_features, bool) or not isinstance(
                self.whiten_max_features, int) or self.whiten_max_features < 1):
            raise ValueError(f"whiten_max_features must be None or an int >= 1, got {self.whiten_max_features!r}")


class Distiller(TrainingLoop):
    """Holds the frozen teacher, the student, hooks and loss settings; see module docs."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: Optional[DistillConfig] = None):
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("student and teacher must be nn.Modules")
        if student is teacher:
            raise ValueError("student and teacher are the same object: distill a copy (copy.deepcopy(teacher))")
        self.cfg = config or DistillConfig()
        if not isinstance(self.cfg, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(self.cfg).__name__}")
        self.student, self.teacher = student, teacher
        self.model = student
        self._forward = {"student": student, "teacher": teacher}  # what runs them (lrkd_fast.sharding: FSDP roots)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.params = self._select_trainable()
        self._elapsed = None
        names = self.cfg.clone_modules
        if names in ("auto", "inner"):
            blocks = find_blocks(student)
            if not blocks:
                raise ValueError(f"could not find transformer blocks for clone_modules={names!r}; pass module names")
            names = blocks[:-1] if names == "inner" else blocks
        elif names == "lowrank":
            names = [n for n, m in student.named_modules() if isinstance(m, LowRankLinear)]
        self.clone_names = list(names or [])
        self._s_catch = OutputCatcher(student, self.clone_names, detach=False)
        self._t_catch = OutputCatcher(teacher, self.clone_names, detach=True)
        out = self.cfg.output_loss
        if out == "auto":
            out = "kd" if is_causal_lm(student) else "cosine"
        self.output_loss = out
        if not self.clone_names and out == "none":
            raise ValueError("nothing to train on: clone_modules is empty and output_loss='none'")
        if self.cfg.clone_modules == "inner" and out == "none":
            raise ValueError("clone_modules='inner' leaves the last block to the output loss, but output_loss='none'")
        self.cache = TeacherCache(self.cfg.teacher_cache_gb * 2**30) if self.cfg.teacher_cache else None

    def train(self, data, resume_from: Optional[str] = None, on_step: Optional[Callable] = None,
              diagnostics_data: Optional[list] = None) -> dict:
        history = super().train(data, resume_from=resume_from, on_step=on_step, diagnostics_data=diagnostics_data)
        if self.cache is not None:  # how much of the teacher's work the cache saved
            history["teacher_cache"] = {"hits": self.cache.hits, "misses": self.cache.misses,
                                        "texts": len(self.cache.rows), "gib": self.cache.nbytes / 2**30}
        return history

    def _optimizer(self, get_batch):
        if self.cfg.optimizer == "adamw":
            return super()._optimizer(get_batch)
        from .optim import WhitenedAdamW

        if self.sharding is not None:
            raise ValueError("optimizer='whitened' mixes the rows of each factor, which FSDP splits across processes: "
                             "use optimizer='adamw' for a sharded run")
        bases = self.whitening_bases([get_batch(i) for i in range(self.cfg.whiten_batches)])
        return WhitenedAdamW(self.params, bases, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def whitening_bases(self, batches: list) -> dict:
        """``{U: M}`` for :class:`~lrkd_fast.optim.WhitenedAdamW`: per trainable low-rank layer of the student
        (up to ``whiten_max_features`` inputs), the basis of the teacher's inputs to the layer of the same
        name over ``batches`` (padding left out), averaged over the processes of a data-parallel run."""
        import torch.distributed as dist

        from .optim import whitening_basis
        from .swap.init import collect_input_grams

        limit = self.cfg.whiten_max_features
        layers = {n: m for n, m in self.student.named_modules() if isinstance(m, LowRankLinear)
                  and m.U.requires_grad and (limit is None or m.in_features <= limit)}
        if not layers:
            return {}
        dense = {}
        for n in layers:
            try:
                dense[n] = self.teacher.get_submodule(n)
            except AttributeError:
                raise ValueError(f"optimizer='whitened' reads the teacher's inputs to each low-rank layer, but the "
                                 f"teacher has no module {n!r}: the student must be a swapped copy of it") from None
        try:
            grams = collect_input_grams(self.teacher, dense, batches, progress=False)
        finally:  # the loss hooks caught these forwards too
            self._t_catch.pop()
        bases = {}
        for n, m in layers.items():
            g = grams[n].to(m.U.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(g)
                g /= dist.get_world_size()
            bases[m.U] = whitening_basis(g, self.cfg.whiten_damping, name=n)
        return bases

    def _select_trainable(self) -> list[nn.Parameter]:
        for p in self.student.parameters():
            p.requires_grad_(False)
        params = []
        for m in self.student.modules():
            if isinstance(m, LowRankLinear):
                params += [m.U, m.V] + ([m.bias] if self.cfg.train_bias and m.bias is not None else [])
            elif self.cfg.train_norms and (isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__):
                params += list(m.parameters(recurse=False))
        if not params:
            raise ValueError("the student has no LowRankLinear layers to train: swap_linear_layers first")
        for p in params:
            p.requires_grad_(True)
        return params

    def close(self):
        self._s_catch.remove()
        self._t_catch.remove()

    def diagnostics(self, batches: list) -> dict:
        """Per-block CKA and Gaussian MI between teacher and student (every transformer block's output,
        else the clone modules); see :func:`lrkd_fast.diagnostics.representation_diagnostics`."""
        from .diagnostics import representation_diagnostics

        sites = find_blocks(self.student) or self.clone_names
        if not sites:
            raise ValueError("no transformer blocks or clone modules to measure diagnostics at")
        try:
            return representation_diagnostics(self.teacher, self.student, batches, sites=sites,
                                              components=self.cfg.diagnostics_components)
        finally:  # the loss hooks caught these forwards too: drop what they hold
            self._s_catch.pop()
            self._t_catch.pop()

    # ------------------------------------------------------------------ loss
    def _autocast(self, device):
        mode = self.cfg.autocast
        use = mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Loss for one batch and its parts (floats, for logging)."""
        from .ops.clone_loss import clone_loss

        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError("batch must be a dict with at least 'input_ids' (and usually 'attention_mask')")
        mask = batch.get("attention_mask")
        device = batch["input_ids"].device
        want_hidden = self.output_loss != "none"
        t_acts = self._teacher_targets(batch, want_hidden)
        with self._autocast(device):
            s_out = self._forward["student"](**batch, output_hidden_states=want_hidden)
        s_acts = self._s_catch.pop()
        parts = {}
        loss = torch.zeros((), device=device)
        if self.clone_names:
            pairs, weights = [], []
            for n in self.clone_names:
                s, t = s_acts[n], t_acts[n]
                pairs.append((s, t.to(s.dtype)))
                if self.cfg.clone_normalize:
                    ms = t.float().pow(2).mean() if mask is None else (t.float().pow(2).mean(-1) * mask).sum() / mask.sum().clamp_min(1)
                    weights.append(1.0 / ms.clamp_min(1e-6).item())
                else:
                    weights.append(1.0)
            closs = clone_loss(pairs, mask=mask, weights=weights)
            parts["clone"] = closs.item()
            loss = loss + self.cfg.clone_weight * closs
        if self.output_loss != "none":
            oloss = self._output_loss(s_out.hidden_states[-1], t_acts[_LAST], batch)
            parts[self.output_loss] = oloss.item()
            loss = loss + self.cfg.output_weight * oloss
        parts["loss"] = loss.item()
        return loss, parts

    def _teacher_targets(self, batch: dict, want_hidden: bool) -> dict:
        """The teacher's activations at the clone modules (and its last hidden state under ``_LAST``),
        from the cache when every row of the batch is there."""
        cache = self.cache if self.cache is not None and set(batch) <= TeacherCache.KEYED_INPUTS else None
        if cache is not None:
            hit = cache.get(batch)
            if hit is not None:
                return hit
        with torch.no_grad(), self._autocast(batch["input_ids"].device):
            t_out = self._forward["teacher"](**batch, output_hidden_states=want_hidden)
        acts = self._t_catch.pop()
        if want_hidden:
            acts[_LAST] = t_out.hidden_states[-1]
        if cache is not None:
            cache.put(batch, acts)
        return acts

    def _output_loss(self, hs, ht, batch):
        mask = batch.get("attention_mask")
        if self.output_loss == "kd":
            from .ops.kd_loss import kd_loss

            ids = batch["input_ids"]
            labels = ids[:, 1:].clone()
            if mask is not None:
                labels = labels.masked_fill(mask[:, 1:] == 0, -100)
            head_s = self.student.get_output_embeddings()
            head_t = self.teacher.get_output_embeddings()
            return kd_loss(hs[:, :-1], head_s.weight, labels, teacher_hidden=ht[:, :-1].to(hs.dtype),
                           teacher_weight=head_t.weight.to(hs.dtype), student_bias=getattr(head_s, "bias", None),
                           teacher_bias=getattr(head_t, "bias", None), temperature=self.cfg.temperature,
                           ce_weight=self.cfg.ce_weight)
        es, et = mean_pool(hs.float(), mask), mean_pool(ht.float(), mask)
        if self.output_loss == "cosine":
            return (1 - F.cosine_similarity(es, et, dim=-1)).mean()
        return F.mse_loss(es, et)


def distill(student: nn.Module, teacher: nn.Module, data, config: Optional[DistillConfig] = None,
            resume_from: Optional[str] = None, **overrides) -> dict:
    """Distill ``student`` toward ``teacher`` on ``data``; returns the training history.

    ``overrides`` set :class:`DistillConfig` fields directly: ``distill(s, t, data, steps=100, lr=5e-4)``.
    """
    cfg = config or DistillConfig()
    if overrides:
        cfg = DistillConfig(**{**asdict(cfg), **overrides})
    d = Distiller(student, teacher, cfg)
    try:
        return d.train(data, resume_from=resume_from)
    finally:
        d.close()
