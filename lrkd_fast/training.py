"""The optimizer loop every distillation method here trains with: :class:`TrainConfig` and
:class:`TrainingLoop` (AdamW, warm-up and decay, gradient clipping, progress bar, checkpoints,
exact resume, gradient averaging under ``torch.distributed``)."""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["SCHEDULES", "TrainConfig", "TrainingLoop"]

SCHEDULES = ("cosine", "linear", "constant", "wsd")


@dataclass
class TrainConfig:
    """How the loop trains (the loss is the subclass's business).

    steps: optimizer steps; the schedule runs over them.
    max_minutes: optional time cap: the run stops (with its final checkpoint) once this much time has
        passed, and the schedule then follows whichever of steps and minutes is further along.
    warmup: fraction of the run spent warming the learning rate up.
    schedule: after the warm-up, "cosine" or "linear" decay to 0 over the rest of the run, "constant",
        or "wsd" (warm-up-stable-decay): the peak until the last ``decay_fraction`` of the run, then a
        linear decay to 0 over it.
    dropout: keep the model's dropout on while training (off: it trains in eval mode).
    checkpoint_every: steps between checkpoints in ``checkpoint_dir`` (0: only ``last.pt`` at the end).
    diagnostics_every: steps between representation diagnostics (0: off): per-layer linear CKA and
        Gaussian mutual information between teacher and student activations
        (:mod:`lrkd_fast.diagnostics`), measured before the first step, every this many steps and at
        the end, on ``diagnostics_batches`` fixed batches (the first batches of the training data,
        or the ``diagnostics_data`` given to ``train``), and logged in the history under
        ``"diagnostics"``; the run writes a plot of both per layer over training to
        ``diagnostics_plot`` (default: ``checkpoint_dir/diagnostics.png`` when there is a checkpoint_dir).
    diagnostics_components: the MI's components per layer (None: min(32, widths)).
    """

    steps: int = 300
    max_minutes: Optional[float] = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05
    schedule: str = "cosine"  # after warm-up: "cosine" | "linear" | "constant" | "wsd"
    decay_fraction: float = 0.1  # "wsd": the final fraction of the run that decays linearly to 0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    dropout: bool = False
    log_every: int = 10
    checkpoint_every: int = 0
    checkpoint_dir: Optional[str] = None
    seed: int = 0
    progress: bool = True
    diagnostics_every: int = 0
    diagnostics_batches: int = 2
    diagnostics_components: Optional[int] = None
    diagnostics_plot: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be None or > 0, got {self.max_minutes}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.decay_fraction, bool) or not isinstance(self.decay_fraction, (int, float)) \
                or not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be a fraction in (0, 1], got {self.decay_fraction!r}")
        if self.schedule == "wsd" and self.warmup + self.decay_fraction > 1:
            raise ValueError(f"warmup + decay_fraction must be <= 1 for schedule 'wsd', got "
                             f"{self.warmup} + {self.decay_fraction}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        for name in ("diagnostics_every", "diagnostics_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "diagnostics_every" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'diagnostics_every' else 1}, got {v!r}")
        c = self.diagnostics_components
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"diagnostics_components must be None or an int >= 1, got {c!r}")


def process_rank() -> int:
    """This process's rank under ``torch.distributed`` (0 when it is not running)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_parameters(params) -> None:
    """Give every process rank 0's values (as DDP does when it wraps a model): an init calibrated on each
    process's own data (whitened, sequential) would otherwise leave the replicas apart for good."""
    import torch.distributed as dist

    if not _distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params) -> None:
    """All-reduce (mean) the gradients when running under torch.distributed with several processes."""
    import torch.distributed as dist

    if not _distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


class TrainingLoop:
    """The optimizer loop shared by every distillation method.

    Subclasses set ``self.cfg`` (a :class:`TrainConfig`), ``self.params`` (the trainable
    parameters), ``self.model`` (the module that owns them, for checkpoints) and implement
    ``compute_loss(batch) -> (loss, parts)``. Under ``torch.distributed`` (torchrun) gradients are
    averaged across processes after each backward, each process should be given its own shard of the
    data, and only rank 0 writes checkpoints.
    """

    cfg: TrainConfig
    params: list
    model: nn.Module
    _elapsed = None

    def compute_loss(self, batch):  # pragma: no cover - abstract
        raise NotImplementedError

    def diagnostics(self, batches: list) -> dict:
        """Per-site representation diagnostics ({site: LayerDiagnostics}) on ``batches``; subclasses
        that support ``diagnostics_every`` implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no representation diagnostics: "
                                  f"set diagnostics_every=0")

    def _measure(self, history: dict, step: int, batches: list) -> None:
        from .diagnostics import history_entry

        if process_rank() != 0:
            return
        history.setdefault("diagnostics", []).append(history_entry(step, self.diagnostics(batches)))
        self.model.train(self.cfg.dropout)

    def _diagnostics_plot_path(self) -> Optional[str]:
        if self.cfg.diagnostics_plot:
            return self.cfg.diagnostics_plot
        return os.path.join(self.cfg.checkpoint_dir, "diagnostics.png") if self.cfg.checkpoint_dir else None

    # ------------------------------------------------------------------ training
    def _lr_factor(self, step: int) -> float:
        """Warm-up over the first ``warmup`` of the run, then the decay. With a time cap the run's
        progress is whichever is further along, steps or minutes, so the schedule ends with the run."""
        total, w = self.cfg.steps, self.cfg.warmup
        warm_p, decay_p = (step + 1) / total, step / total
        if self.cfg.max_minutes is not None and self._elapsed is not None:
            t = self._elapsed() / (60.0 * self.cfg.max_minutes)
            warm_p, decay_p = max(warm_p, t), max(decay_p, t)
        if warm_p < w:
            return warm_p / w
        if self.cfg.schedule == "constant":
            return 1.0
        if self.cfg.schedule == "wsd":  # stable at the peak, then linear to 0 over the last decay_fraction
            return min(1.0, max(0.0, (1 - decay_p) / self.cfg.decay_fraction))
        frac = min(1.0, max(0.0, (decay_p - w) / (1 - w)))
        return 1 - frac if self.cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    def train(self, data, resume_from: Optional[str] = None, on_step: Optional[Callable] = None,
              diagnostics_data: Optional[list] = None) -> dict:
        """Train for ``config.steps`` steps (or until ``max_minutes``).

        data: an object with ``batch(step) -> dict`` (e.g. :class:`lrkd_fast.data.TextBatches`), or a
        non-empty list of batch dicts (cycled). Returns the history: per-step losses and timing,
        ``stopped_early`` (True when the time cap ended the run before ``steps``) and, with
        ``diagnostics_every``, ``diagnostics``: a list of ``{"step", "sites": {site: {"cka", "mi", ...}}}``.
        diagnostics_data: batches for the diagnostics (e.g. held-out texts); default the first
        ``diagnostics_batches`` batches of ``data``.
        """
        from tqdm.auto import tqdm

        get_batch = self._batch_getter(data)
        # a reader with a read position (e.g. lrkd_fast.packed.PackedBatches): saved in and restored from checkpoints
        self._data = data if hasattr(data, "state_dict") and hasattr(data, "load_state_dict") else None
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
        broadcast_parameters(self.params)
        self.model.train(cfg.dropout)
        t0 = time.time() - history["seconds"]
        self._elapsed = lambda: time.time() - t0
        diag_batches = None
        if cfg.diagnostics_every:
            diag_batches = list(diagnostics_data) if diagnostics_data is not None else \
                [get_batch(i) for i in range(cfg.diagnostics_batches)]
            if not diag_batches:
                raise ValueError("diagnostics_data is empty")
            if start == 0:
                self._measure(history, 0, diag_batches)
        bar = tqdm(total=cfg.steps, initial=start, desc="distilling", disable=not cfg.progress, dynamic_ncols=True)
        step = start - 1
        try:
            for step in range(start, cfg.steps):
                batch = get_batch(step)
                loss, parts = self.compute_loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(self.params)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                m = batch.get("attention_mask")  # a 4-D (block) mask says nothing about padding: count every id
                n_tok = int(m.sum()) if m is not None and m.dim() == 2 else batch["input_ids"].numel()
                history["tokens"] += n_tok
                history["step"].append(step)
                history["loss"].append(parts["loss"])
                history["parts"].append(parts)
                history["seconds"] = time.time() - t0
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    post = {k: f"{v:.4g}" for k, v in parts.items()}
                    post["tok/s"] = f"{history['tokens'] / max(history['seconds'], 1e-9):.0f}"
                    bar.set_postfix(post)
                if on_step is not None:
                    on_step(step, parts)
                done = step + 1
                if diag_batches is not None and (done % cfg.diagnostics_every == 0 or done == cfg.steps):
                    self._measure(history, done, diag_batches)
                if cfg.checkpoint_dir and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self.save_checkpoint(os.path.join(cfg.checkpoint_dir, f"step-{done}.pt"), done, opt, sched, history)
                if cfg.max_minutes is not None and history["seconds"] > 60 * cfg.max_minutes:
                    history["stopped_early"] = done < cfg.steps
                    if history["stopped_early"]:  # the bar ends at 100% of what was run, and says why
                        bar.total = done
                        bar.set_description(f"distilling (stopped at the {cfg.max_minutes:g}-minute cap)")
                    break
        finally:
            bar.close()
        if diag_batches is not None and history.get("diagnostics"):
            if history["diagnostics"][-1]["step"] != step + 1:  # stopped by the time cap between two measurements
                self._measure(history, step + 1, diag_batches)
            path = self._diagnostics_plot_path()
            if path and process_rank() == 0:
                from .diagnostics import plot_diagnostics

                plot_diagnostics(history["diagnostics"], path, f"{type(self.model).__name__}: teacher vs student "
                                                               f"per layer over training")
                history["diagnostics_plot"] = path
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
    def trainable_state(self) -> dict:
        """A copy of the trainable parameters, by name in ``self.model``."""
        ids = {id(p) for p in self.params}
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if id(p) in ids}

    def load_trainable_state(self, state: dict) -> None:
        """Copy ``state`` (from :meth:`trainable_state` or a checkpoint) into the parameters."""
        named = dict(self.model.named_parameters())
        unknown = [n for n in state if n not in named]
        if unknown:
            raise ValueError(f"state does not fit this model (unknown parameters {unknown[:3]})")
        with torch.no_grad():
            for n, v in state.items():
                named[n].copy_(v)

    def save_checkpoint(self, path: str, step: int, opt, sched, history: dict) -> None:
        if process_rank() != 0:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        state = {"step": step, "params": self.trainable_state(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "history": history, "config": asdict(self.cfg),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        if getattr(self, "_data", None) is not None:
            state["data"] = self._data.state_dict()  # the read position: a resume continues on unseen data
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind

    def load_checkpoint(self, path: str, opt, sched) -> tuple[int, dict]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=False)
        try:
            self.load_trainable_state(state["params"])
        except ValueError as exc:
            raise ValueError(f"checkpoint {path!r} does not fit this student: {exc}") from None
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("data") is not None and getattr(self, "_data", None) is not None:
            self._data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["step"], state["history"]
