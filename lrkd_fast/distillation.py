"""Distill a low-rank student back toward its dense teacher.

The teacher is frozen; the student's low-rank factors (optionally its norms) train on

    loss = clone_weight * clone_loss(student activations, teacher activations)
         + output_weight * output loss

Activations are caught with forward hooks at ``clone_modules`` (default: every transformer block's
output) and compared with the fused clone loss; the output loss is the fused KD loss on the LM head
for causal LMs, and cosine (or MSE) between mean-pooled embeddings for encoders.

``Distiller.compute_loss(batch)`` gives the loss for one batch, for use in any training loop
(Hugging Face Trainer included); ``Distiller.train`` / :func:`distill` run a complete loop with
AdamW, warm-up and decay, gradient clipping, bf16 autocast where the device supports it, a progress
bar, checkpoints and exact resume.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import mean_pool
from .layers import LowRankLinear
from .swap import find_blocks

__all__ = ["DistillConfig", "Distiller", "TrainingLoop", "TeacherCache", "distill", "find_blocks"]

OUTPUT_LOSSES = ("auto", "kd", "cosine", "mse", "none")
CLONE_CHOICES = ("auto", "inner", "lowrank")
_LAST = "\0last_hidden_state"  # key of the teacher's last hidden state among its targets


@dataclass
class DistillConfig:
    steps: int = 300
    max_minutes: Optional[float] = None  # stop early (with a final save) once this much time passed
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the run: of the steps, or of max_minutes when that ends it first
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warm-up)
    max_grad_norm: float = 1.0
    # "auto" = every transformer block's output; "inner" = every block's but the last, whose job the output
    # loss does (on MiniLM this generalizes better: see SwapRecipe); "lowrank" = every swapped layer's
    # output; a list of module names; None = off
    clone_modules: Union[str, list, None] = "auto"
    clone_weight: float = 1.0
    clone_normalize: bool = True  # divide each term by the teacher activation's mean square
    output_loss: str = "auto"  # "kd" for causal LMs, "cosine" otherwise
    output_weight: float = 1.0
    temperature: float = 1.0  # for output_loss="kd"
    ce_weight: float = 0.0  # for output_loss="kd": next-token cross-entropy on the data besides the KL
    train_norms: bool = False
    train_bias: bool = False
    dropout: bool = False  # keep the student's dropout on while training (off: it copies an eval-mode teacher)
    # "auto" (bf16 on CUDA with bf16 support), "bf16", "off". "auto" leaves the CPU in fp32: on a 2-core AMX
    # Xeon, bf16 made MiniLM distillation slower (SDPA's bf16 CPU backward; with eager attention, uneven
    # step times): benchmarks/results/swap_variants/cpu_bf16_steps.py
    autocast: str = "auto"
    # keep the teacher's targets per text (token sequence) and reuse them when the text comes back in a
    # later epoch: skips the teacher's forward, about a quarter of a step (see TeacherCache). Not saved
    # in checkpoints: a resumed run refills it, so its losses match up to float rounding, not bit for bit
    teacher_cache: bool = False
    teacher_cache_gb: float = 2.0  # memory cap; texts beyond it are recomputed each time
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end (when checkpoint_dir is set)
    checkpoint_dir: Optional[str] = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}")
        if self.output_loss not in OUTPUT_LOSSES:
            raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES}, got {self.output_loss!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if isinstance(self.clone_modules, str) and self.clone_modules not in CLONE_CHOICES:
            raise ValueError(f"clone_modules must be one of {CLONE_CHOICES}, a list of module names or None, "
                             f"got {self.clone_modules!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.teacher_cache_gb > 0:
            raise ValueError(f"teacher_cache_gb must be > 0, got {self.teacher_cache_gb}")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TypeError(f"cannot find an activation tensor in a module output of type {type(out).__name__}")


class _Catcher:
    """Forward hooks that record the output of named modules during one forward."""

    def __init__(self, model: nn.Module, names: list[str], detach: bool):
        self.acts: dict[str, torch.Tensor] = {}
        self.handles = []
        for n in names:
            try:
                m = model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"clone module {n!r} not found in {type(model).__name__}") from None
            self.handles.append(m.register_forward_hook(self._hook(n, detach)))

    def _hook(self, name, detach):
        def fn(module, args, out):
            t = _first_tensor(out)
            self.acts[name] = t.detach() if detach else t
        return fn

    def pop(self) -> dict:
        acts, self.acts = self.acts, {}
        return acts

    def remove(self):
        for h in self.handles:
            h.remove()


class TeacherCache:
    """The frozen teacher's targets for each text seen, to reuse when the same text comes back.

    Keyed per batch row by its unpadded token ids (and token type ids) and where they start, so a
    text gives a hit whatever batch or padding length it comes in. Each entry holds that row's
    unpadded target activations; a batch is served from the cache only when every row hits, else
    the teacher runs and the rows are stored (until ``max_bytes`` are held). Targets computed inside
    different batches can differ from a fresh forward by float rounding only. Batches carrying any
    other model input (``position_ids``, ...) are never cached: the key would not describe them.
    """

    KEYED_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})

    def __init__(self, max_bytes: int):
        if not max_bytes > 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.rows: dict = {}
        self.nbytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def _layout(batch: dict):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        return ids, valid

    def _keys(self, batch: dict) -> list:
        ids, valid = self._layout(batch)
        ids, valid = ids.cpu(), valid.cpu()
        tt = batch.get("token_type_ids")
        tt = None if tt is None else tt.cpu()
        keys = []
        for b in range(ids.shape[0]):
            pos = valid[b].nonzero().flatten()
            start = int(pos[0]) if pos.numel() else 0
            key = (start, ids[b][valid[b]].numpy().tobytes())
            if tt is not None:
                key += (tt[b][valid[b]].numpy().tobytes(),)
            keys.append(key)
        return keys

    def get(self, batch: dict) -> Optional[dict]:
        """The targets of every row (padded like ``batch``), or None if any row is missing."""
        keys = self._keys(batch)
        entries = [self.rows.get(k) for k in keys]
        if any(e is None for e in entries):
            self.misses += 1
            return None
        self.hits += 1
        ids, valid = self._layout(batch)
        out, built = {}, {}
        for name, first in entries[0].items():
            if id(first) not in built:  # names sharing one stored tensor share the padded one too
                full = first.new_zeros((*ids.shape, *first.shape[1:]))
                for b, e in enumerate(entries):
                    full[b][valid[b]] = e[name]
                built[id(first)] = full
            out[name] = built[id(first)]
        return out

    def put(self, batch: dict, targets: dict) -> None:
        if self.nbytes >= self.max_bytes:
            return
        _, valid = self._layout(batch)
        for b, key in enumerate(self._keys(batch)):
            if key in self.rows:
                continue
            entry, by_storage = {}, {}
            for n, t in targets.items():  # one copy for names that share a tensor (last block = output)
                sid = (t.data_ptr(), t.shape, t.stride())
                if sid not in by_storage:
                    by_storage[sid] = t[b][valid[b]].clone()
                    self.nbytes += by_storage[sid].numel() * by_storage[sid].element_size()
                entry[n] = by_storage[sid]
            self.rows[key] = entry
            if self.nbytes >= self.max_bytes:
                return


def _is_causal_lm(model) -> bool:
    """A model with an output head whose class is a causal LM (…ForCausalLM, GPT-2's LMHeadModel)."""
    get = getattr(model, "get_output_embeddings", None)
    name = type(model).__name__
    return callable(get) and get() is not None and ("CausalLM" in name or "LMHead" in name)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast_parameters(params) -> None:
    """Give every process rank 0's values (as DDP does when it wraps a model): an init calibrated on each
    process's own data (whitened, sequential) would otherwise leave the replicas apart for good."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def _average_gradients(params) -> None:
    """All-reduce (mean) the gradients when running under torch.distributed with several processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


class TrainingLoop:
    """The optimizer loop shared by every distillation method.

    Subclasses set ``self.cfg`` (a :class:`DistillConfig`), ``self.params`` (the trainable
    parameters), ``self.model`` (the module that owns them, for checkpoints) and implement
    ``compute_loss(batch) -> (loss, parts)``. Under ``torch.distributed`` (torchrun) gradients are
    averaged across processes after each backward, each process should be given its own shard of the
    data, and only rank 0 writes checkpoints.
    """

    cfg: DistillConfig
    params: list
    model: nn.Module
    _elapsed = None

    def compute_loss(self, batch):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def _lr_factor(self, step: int) -> float:
        """Warm-up over the first ``warmup`` of the run, then the decay. With a time budget the run's
        progress is whichever is further along, steps or minutes, so a large step bound (the usual
        setting with ``max_minutes``) stretches neither the warm-up nor the decay."""
        total, w = self.cfg.steps, self.cfg.warmup
        warm_p, decay_p = (step + 1) / total, step / total
        if self.cfg.max_minutes is not None and self._elapsed is not None:
            t = self._elapsed() / (60.0 * self.cfg.max_minutes)
            warm_p, decay_p = max(warm_p, t), max(decay_p, t)
        if warm_p < w:
            return warm_p / w
        if self.cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, max(0.0, (decay_p - w) / (1 - w)))
        return 1 - frac if self.cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    def train(self, data, resume_from: Optional[str] = None, on_step: Optional[Callable] = None) -> dict:
        """Train for ``config.steps`` steps (or until ``max_minutes``).

        data: an object with ``batch(step) -> dict`` (e.g. :class:`lrkd_fast.data.TextBatches`), or a
        non-empty list of batch dicts (cycled). Returns the history: per-step losses and timing.
        """
        from tqdm.auto import tqdm

        get_batch = self._batch_getter(data)
        cfg = self.cfg
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        history = {"step": [], "loss": [], "parts": [], "tokens": 0, "seconds": 0.0, "stopped_early": False}
        start = 0
        if resume_from:
            start, history = self.load_checkpoint(resume_from, opt, sched)
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
        _broadcast_parameters(self.params)
        self.model.train(cfg.dropout)
        t0 = time.time() - history["seconds"]
        self._elapsed = lambda: time.time() - t0
        bar = tqdm(total=cfg.steps, initial=start, desc="distilling", disable=not cfg.progress, dynamic_ncols=True)
        step = start
        try:
            for step in range(start, cfg.steps):
                batch = get_batch(step)
                loss, parts = self.compute_loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _average_gradients(self.params)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                n_tok = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                history["tokens"] += n_tok
                history["step"].append(step)
                history["loss"].append(parts["loss"])
                history["parts"].append(parts)
                history["seconds"] = time.time() - t0
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    post = {k: f"{v:.4g}" for k, v in parts.items()}
                    post["tok/s"] = f"{history['tokens'] / max(history['seconds'], 1e-9):.0f}"
                    if cfg.max_minutes is not None:  # the budget, not the step count, usually ends the run
                        post["budget left"] = f"{max(0.0, 60 * cfg.max_minutes - history['seconds']):.0f}s"
                    bar.set_postfix(post)
                if on_step is not None:
                    on_step(step, parts)
                done = step + 1
                if cfg.checkpoint_dir and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self.save_checkpoint(os.path.join(cfg.checkpoint_dir, f"step-{done}.pt"), done, opt, sched, history)
                if cfg.max_minutes is not None and history["seconds"] > 60 * cfg.max_minutes:
                    history["stopped_early"] = done < cfg.steps
                    break
        finally:
            bar.close()
        if cfg.checkpoint_dir:
            self.save_checkpoint(os.path.join(cfg.checkpoint_dir, "last.pt"), step + 1, opt, sched, history)
        self.model.eval()
        return history

    @staticmethod
    def _batch_getter(data):
        if hasattr(data, "batch"):
            if len(data) == 0:
                raise ValueError("data is empty")
            return data.batch
        if isinstance(data, (list, tuple)):
            if not data:
                raise ValueError("data is empty: pass a non-empty list of batches")
            return lambda step: data[step % len(data)]
        raise TypeError("data must have a batch(step) method (TextBatches) or be a list of batch dicts")

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict:
        ids = {id(p) for p in self.params}
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if id(p) in ids}

    def save_checkpoint(self, path: str, step: int, opt, sched, history: dict) -> None:
        if _rank() != 0:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        state = {"step": step, "params": self._trainable_state(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "history": history, "config": asdict(self.cfg),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind

    def load_checkpoint(self, path: str, opt, sched) -> tuple[int, dict]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=False)
        named = dict(self.model.named_parameters())
        missing = [n for n in state["params"] if n not in named]
        if missing:
            raise ValueError(f"checkpoint {path!r} does not fit this student (unknown parameters {missing[:3]})")
        with torch.no_grad():
            for n, v in state["params"].items():
                named[n].copy_(v)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["step"], state["history"]



class Distiller(TrainingLoop):
    """Holds the frozen teacher, the student, hooks and loss settings; see module docs."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: Optional[DistillConfig] = None):
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("student and teacher must be nn.Modules")
        if student is teacher:
            raise ValueError("student and teacher are the same object: distill a copy (copy.deepcopy(teacher))")
        self.cfg = config or DistillConfig()
        self.student, self.teacher = student, teacher
        self.model = student
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
        self._s_catch = _Catcher(student, self.clone_names, detach=False)
        self._t_catch = _Catcher(teacher, self.clone_names, detach=True)
        out = self.cfg.output_loss
        if out == "auto":
            out = "kd" if _is_causal_lm(student) else "cosine"
        self.output_loss = out
        if not self.clone_names and out == "none":
            raise ValueError("nothing to train on: clone_modules is empty and output_loss='none'")
        if self.cfg.clone_modules == "inner" and out == "none":
            raise ValueError("clone_modules='inner' leaves the last block to the output loss, but output_loss='none'")
        self.cache = TeacherCache(self.cfg.teacher_cache_gb * 2**30) if self.cfg.teacher_cache else None

    def train(self, data, resume_from: Optional[str] = None, on_step: Optional[Callable] = None) -> dict:
        history = super().train(data, resume_from=resume_from, on_step=on_step)
        if self.cache is not None:  # how much of the teacher's work the cache saved
            history["teacher_cache"] = {"hits": self.cache.hits, "misses": self.cache.misses,
                                        "texts": len(self.cache.rows), "gib": self.cache.nbytes / 2**30}
        return history

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
            s_out = self.student(**batch, output_hidden_states=want_hidden)
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
            t_out = self.teacher(**batch, output_hidden_states=want_hidden)
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
