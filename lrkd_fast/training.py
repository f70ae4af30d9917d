"""The optimizer loop every distillation method here trains with: :class:`TrainConfig` and
:class:`TrainingLoop` (AdamW, warm-up and decay, gradient clipping, progress bar, checkpoints,
exact resume, gradient averaging under ``torch.distributed``).

Nothing is lost or silently wrong: a NaN or infinite loss or gradient stops the run with
:class:`TrainingDiverged` before the optimizer takes the bad step (no checkpoint is written from it,
so the last one on disk is the last good state); an exception or Ctrl-C in the middle of a run
writes a resumable ``checkpoint_dir/last.pt`` and names it on the exception; checkpoints are read
with ``torch.load(weights_only=True)`` (:func:`read_checkpoint`), which refuses pickled code."""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["SCHEDULES", "CheckpointError", "TrainConfig", "TrainingDiverged", "TrainingLoop", "load_parameters",
           "read_checkpoint"]

LAST_CHECKPOINT = "last.pt"  # in checkpoint_dir: the latest state (every checkpoint_minutes, on an interrupt, at the end)
_CHECKPOINT_KEYS = ("step", "params", "optimizer", "scheduler", "history", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, not one of ours, refused by
    ``weights_only`` loading, or not fitting the model it is loaded into. The message names the file."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite at ``step`` (0-based, the step whose update
    was refused). ``checkpoint`` is the latest checkpoint written before it (None when there is none)."""

    def __init__(self, step: int, what: str, value: float, lr: float, checkpoint: Optional[str]):
        self.step, self.what, self.value, self.checkpoint = step, what, value, checkpoint
        keep = (f"the last good checkpoint is {checkpoint!r}" if checkpoint else
                "no checkpoint had been written before it")
        super().__init__(f"training diverged: the {what} is {value} at step {step} (learning rate {lr:.3g}); "
                         f"stopped before that update and saved nothing from it, {keep}. A lower learning rate "
                         f"(or stronger gradient clipping) usually helps")


def _finite_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

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
    checkpoint_every: steps between checkpoints ``step-N.pt`` in ``checkpoint_dir`` (0: none of these).
    checkpoint_minutes: minutes between checkpoints to ``checkpoint_dir/last.pt``, each replacing the one
        before (0: off). ``last.pt`` is also written at the end and when an exception or Ctrl-C stops the run.
    max_grad_norm: gradient clipping norm (0: no clipping).
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
    checkpoint_minutes: float = 0.0
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
        if self.max_minutes is not None and not (_finite_number(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"max_minutes must be None or > 0 and finite, got {self.max_minutes!r}")
        if not (_finite_number(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr!r}")
        if not (_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay!r}")
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
        if not (_finite_number(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be >= 0 and finite (0 turns clipping off), "
                             f"got {self.max_grad_norm!r}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, got {self.checkpoint_every!r}")
        if not (_finite_number(self.checkpoint_minutes) and self.checkpoint_minutes >= 0):
            raise ValueError(f"checkpoint_minutes must be >= 0 and finite (0: off), got {self.checkpoint_minutes!r}")
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


def any_process(flag: bool, device=None) -> bool:
    """``flag`` of this process, or of any process under torch.distributed with several processes
    (``device``: where the backend reduces, e.g. a CUDA device under NCCL)."""
    import torch.distributed as dist

    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


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
    sharding = None  # lrkd_fast.sharding.ShardedTraining once shard_training(loop) has sharded it with FSDP2

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
    def _optimizer(self, get_batch: Callable) -> torch.optim.Optimizer:
        """The optimizer of ``train`` (``get_batch(step)`` gives the run's batches): AdamW."""
        return torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

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

    def train(self, data, resume_from=None, on_step: Optional[Callable] = None,
              diagnostics_data: Optional[list] = None) -> dict:
        """Train for ``config.steps`` steps (or until ``max_minutes``).

        data: an object with ``batch(step) -> dict`` (e.g. :class:`lrkd_fast.data.TextBatches`), or a
        non-empty list of batch dicts (cycled). Returns the history: per-step losses and timing,
        ``stopped_early`` (True when the time cap ended the run before ``steps``) and, with
        ``diagnostics_every``, ``diagnostics``: a list of ``{"step", "sites": {site: {"cka", "mi", ...}}}``.
        resume_from: a checkpoint path (or what :func:`read_checkpoint` returned for it) to continue from.
            ``steps`` and ``max_minutes`` count the whole run, the checkpoint's part included: the run
            continues up to them, and a checkpoint that already meets them trains nothing (a warning
            says so; the step count stays).
        diagnostics_data: batches for the diagnostics (e.g. held-out texts); default the first
        ``diagnostics_batches`` batches of ``data``.

        A NaN or infinite loss or gradient norm raises :class:`TrainingDiverged` before that update.
        Any other exception (KeyboardInterrupt included) during the steps first writes the state after
        the last finished step to ``checkpoint_dir/last.pt`` (with a checkpoint_dir, once a step has
        finished), names it in a note on the exception and in its ``resume_checkpoint`` attribute, and
        is re-raised.
        """
        from tqdm.auto import tqdm

        get_batch = self._batch_getter(data)
        # a reader with a read position (e.g. lrkd_fast.packed.PackedBatches): saved in and restored from checkpoints
        self._data = data if hasattr(data, "state_dict") and hasattr(data, "load_state_dict") else None
        cfg = self.cfg
        opt = self._optimizer(get_batch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        history = {"step": [], "loss": [], "parts": [], "tokens": 0, "seconds": 0.0, "stopped_early": False}
        start = 0
        self._good_checkpoint = None  # the latest checkpoint known good: the resumed one, then each one written
        resumed = resume_from is not None and not (isinstance(resume_from, str) and not resume_from)
        if resumed:
            start, history = self.load_checkpoint(resume_from, opt, sched)
            self._good_checkpoint = resume_from.get("path") if isinstance(resume_from, dict) else resume_from
            history["stopped_early"] = False
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
        if self.sharding is None:  # a sharded run broadcast rank 0's values before sharding
            broadcast_parameters(self.params)
        self.model.train(cfg.dropout)
        t0 = time.time() - history["seconds"]
        self._elapsed = lambda: time.time() - t0
        end = cfg.steps
        if resumed:
            capped = cfg.max_minutes is not None and history["seconds"] >= 60 * cfg.max_minutes
            if start >= cfg.steps or capped:
                end = start  # nothing left of the budget: train nothing, and say so
                history["stopped_early"] = start < cfg.steps
                budget = f"steps={cfg.steps}" + (f", max_minutes={cfg.max_minutes:g}" if cfg.max_minutes else "")
                warnings.warn(f"the checkpoint is at step {start} after {history['seconds'] / 60:.3g} minutes, which "
                              f"already meets this run's budget ({budget}; both count the whole run): nothing to "
                              f"train; raise steps (--steps) or max_minutes (--minutes) to continue it",
                              UserWarning, stacklevel=2)
        diag_batches = None
        if cfg.diagnostics_every:
            diag_batches = list(diagnostics_data) if diagnostics_data is not None else \
                [get_batch(i) for i in range(cfg.diagnostics_batches)]
            if not diag_batches:
                raise ValueError("diagnostics_data is empty")
            if start == 0:
                self._measure(history, 0, diag_batches)
        last_path = os.path.join(cfg.checkpoint_dir, LAST_CHECKPOINT) if cfg.checkpoint_dir else None
        bar = tqdm(total=cfg.steps, initial=start, desc="distilling", disable=not cfg.progress, dynamic_ncols=True)
        completed, pending, last_save = start, None, time.time()
        try:
            for step in range(start, end):
                batch = get_batch(step)
                loss, parts = self.compute_loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.sharding is None:  # FSDP reduce-scatters (averages) a sharded run's gradients itself
                    average_gradients(self.params)
                norm = self._grad_norm()
                self._check_finite(step, loss, norm, sched)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grads_with_norm_(self.params, cfg.max_grad_norm, norm)
                m = batch.get("attention_mask")  # a 4-D (block) mask says nothing about padding: count every id
                n_tok = int(m.sum()) if m is not None and m.dim() == 2 else batch["input_ids"].numel()
                pending = (step, parts, n_tok)
                opt.step()
                sched.step()
                completed = step + 1
                self._record(history, pending, t0)
                pending = None
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    post = {k: f"{v:.4g}" for k, v in parts.items()}
                    post["tok/s"] = f"{history['tokens'] / max(history['seconds'], 1e-9):.0f}"
                    bar.set_postfix(post)
                if on_step is not None:
                    on_step(step, parts)
                done = completed
                if diag_batches is not None and (done % cfg.diagnostics_every == 0 or done == cfg.steps):
                    self._measure(history, done, diag_batches)
                if cfg.checkpoint_dir and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self.save_checkpoint(os.path.join(cfg.checkpoint_dir, f"step-{done}.pt"), done, opt, sched, history)
                if last_path and cfg.checkpoint_minutes and done < cfg.steps \
                        and self._agree(time.time() - last_save >= 60 * cfg.checkpoint_minutes):
                    self.save_checkpoint(last_path, done, opt, sched, history)
                    last_save = time.time()
                if cfg.max_minutes is not None and self._agree(history["seconds"] > 60 * cfg.max_minutes):
                    history["stopped_early"] = done < cfg.steps
                    if history["stopped_early"]:  # the bar ends at 100% of what was run, and says why
                        bar.total = done
                        bar.set_description(f"distilling (stopped at the {cfg.max_minutes:g}-minute cap)")
                    break
        except BaseException as exc:
            # the update of the step in flight went through (the scheduler counts it) but was not recorded
            # yet: record it, so the checkpoint's history matches its parameters
            if pending is not None and sched.last_epoch == pending[0] + 1:
                self._record(history, pending, t0)
                completed = pending[0] + 1
            bar.close()
            if not isinstance(exc, TrainingDiverged):
                self._save_on_exception(exc, last_path, completed, start, opt, sched, history)
            raise
        finally:
            bar.close()
        if diag_batches is not None and history.get("diagnostics"):
            if history["diagnostics"][-1]["step"] != completed:  # stopped by the time cap between two measurements
                self._measure(history, completed, diag_batches)
            path = self._diagnostics_plot_path()
            if path and process_rank() == 0:
                from .diagnostics import plot_diagnostics

                plot_diagnostics(history["diagnostics"], path, f"{type(self.model).__name__}: teacher vs student "
                                                               f"per layer over training")
                history["diagnostics_plot"] = path
        if last_path:
            self.save_checkpoint(last_path, completed, opt, sched, history)
        self.model.eval()
        return history

    @staticmethod
    def _record(history: dict, pending: tuple, t0: float) -> None:
        step, parts, n_tok = pending
        history["tokens"] += n_tok
        history["step"].append(step)
        history["loss"].append(parts["loss"])
        history["parts"].append(parts)
        history["seconds"] = time.time() - t0

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded gradients: over every shard

    def _agree(self, flag: bool) -> bool:
        """A time-based decision (checkpoint now, stop now) taken by every process together (any process's
        True counts): each process's clock differs, and a process that stopped alone would leave the others
        waiting in the next step's collectives."""
        if self.sharding is not None:
            return self.sharding.agree(flag)
        return any_process(flag, self.params[0].device)

    def _check_finite(self, step: int, loss: torch.Tensor, norm: torch.Tensor, sched) -> None:
        """Raise :class:`TrainingDiverged` when the loss or the gradient norm is NaN or infinite (on any
        process: the values are summed across processes first, so every process stops together)."""
        import torch.distributed as dist

        vals = torch.stack([loss.detach().float().reshape(()), norm.detach().float().to(loss.device).reshape(())])
        if _distributed():
            dist.all_reduce(vals, op=dist.ReduceOp.SUM)
        if bool(torch.isfinite(vals).all()):
            return
        lv, nv = float(loss.detach()), float(norm)
        what, value = ("loss", lv) if not math.isfinite(lv) else ("gradient norm", nv) if not math.isfinite(nv) \
            else ("loss summed over the processes", float(vals[0]))
        raise TrainingDiverged(step, what, value, sched.get_last_lr()[0], self._good_checkpoint)

    def _save_on_exception(self, exc: BaseException, path: Optional[str], completed: int, start: int, opt, sched,
                           history: dict) -> None:
        """Write the state after the last finished step to ``path`` and say so on ``exc``."""
        if path is not None and self.sharding is not None:  # the save is a collective: not from one process's error
            exc.add_note(f"a sharded run writes no checkpoint when an exception stops it (every process takes part in a "
                         f"save); the last one written is {self._good_checkpoint!r}")
            return
        if path is None or process_rank() != 0:
            return
        why = f"{type(exc).__name__} stopped the run after step {completed} of {self.cfg.steps}"
        if completed <= start:
            exc.add_note(f"{why}: no step finished in this run, so no checkpoint was written"
                         + (f" (the run started from {self._good_checkpoint!r})" if self._good_checkpoint else ""))
            return
        try:
            self.save_checkpoint(path, completed, opt, sched, history)
        except Exception as err:  # noqa: BLE001 - the original exception is the one to raise
            exc.add_note(f"{why}; writing a resumable checkpoint to {path!r} failed as well: {err}")
            return
        exc.resume_checkpoint = path
        exc.add_note(f"{why}: a resumable checkpoint is in {path!r} (train(..., resume_from={path!r}) continues it)")

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
        """A copy of the trainable parameters, by name in ``self.model`` (a sharded loop: of this
        process's shards, by the unsharded names)."""
        if self.sharding is not None:
            return {n: p.detach().clone() for n, p in self.sharding.named_parameters().items()}
        ids = {id(p) for p in self.params}
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if id(p) in ids}

    def load_trainable_state(self, state: dict) -> None:
        """Copy ``state`` (from :meth:`trainable_state` or a checkpoint) into the parameters
        (:func:`load_parameters`: every entry must name a parameter of the model, with its shape; a
        sharded loop takes the shards :meth:`trainable_state` gave)."""
        if self.sharding is not None:
            named = self.sharding.named_parameters()
            if state.keys() != named.keys():
                raise ValueError(f"state must hold this sharded loop's trainable parameters {list(named)[:3]}..., "
                                 f"got {list(state)[:3]}...")
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(state[n])
            return
        load_parameters(self.model, state)

    def save_checkpoint(self, path: str, step: int, opt, sched, history: dict) -> None:
        if self.sharding is not None:  # every process writes its shard (torch.distributed.checkpoint)
            return self.sharding.save_checkpoint(self, path, step, opt, sched, history)
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
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)  # never leave a half-written checkpoint behind
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)  # nor a stray .tmp
            if isinstance(exc, OSError):
                raise OSError(exc.errno, f"cannot write checkpoint {path!r}: {exc.strerror or exc}") from exc
            raise
        self._good_checkpoint = path

    def load_checkpoint(self, path, opt, sched) -> tuple[int, dict]:
        """Load a checkpoint (a path, or what :func:`read_checkpoint` returned) into the parameters,
        ``opt``, ``sched`` and the random generators; returns (step, history). Nothing is loaded when
        its parameters do not match the ones this loop trains (names and shapes)."""
        state = path if isinstance(path, dict) else read_checkpoint(path)
        where = state.get("path", "given as a dict")
        if isinstance(state.get("sharded"), dict):  # written by a sharded run: its shards load on any process count
            from .sharding import load_sharded_checkpoint

            return load_sharded_checkpoint(self, state, opt, sched)
        ids = {id(p) for p in self.params}
        missing = [n for n, p in self.model.named_parameters() if id(p) in ids and n not in state["params"]]
        if missing:
            raise CheckpointError(f"checkpoint {where!r} does not fit this student: it lacks {len(missing)} of the "
                                  f"parameters this run trains, e.g. {missing[:3]} (written with other settings?)")
        try:
            self.load_trainable_state(state["params"])
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {where!r} does not fit this student: {exc}") from None
        try:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {where!r}: its optimizer state does not fit this run: {exc}") from None
        return restore_data_and_rng(self, state, where)


def restore_data_and_rng(loop, state: dict, where: str) -> tuple:
    """The rest of a resume, plain or sharded: the data's read position (when the loop's data keeps
    one) and the random generators; returns (step, history) of the checkpoint ``state``."""
    data = getattr(loop, "_data", None)
    if state.get("data") is not None and data is not None:
        try:
            data.load_state_dict(state["data"])
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {where!r}: its data position does not fit this data: {exc}") from None
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["history"]


def load_parameters(model: nn.Module, state: dict) -> None:
    """Copy ``state`` ({parameter name: tensor}) into ``model``'s parameters. Every name must be a
    parameter of ``model`` and every tensor have its shape; otherwise nothing is copied and the
    ValueError names the first parameter that does not fit and both shapes."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of parameter name -> tensor, got {type(state).__name__}")
    named = dict(model.named_parameters())
    unknown = [n for n in state if n not in named]
    if unknown:
        raise ValueError(f"state does not fit this model (unknown parameters {unknown[:3]})")
    for n, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state[{n!r}] is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(named[n].shape):
            raise ValueError(f"parameter {n!r} has shape {tuple(v.shape)} in the saved state but "
                             f"{tuple(named[n].shape)} in this model")
    with torch.no_grad():
        for n, v in state.items():
            named[n].copy_(v)


def read_checkpoint(path) -> dict:
    """The training checkpoint at ``path`` (written by :meth:`TrainingLoop.save_checkpoint`), read with
    ``torch.load(weights_only=True)``: tensors and plain data only, so a file holding a pickled Python
    object is refused instead of run. ``"path"`` is added to the returned dict. A missing file raises
    FileNotFoundError; one that cannot be used (a folder, truncated, not a checkpoint, refused)
    :class:`CheckpointError`, naming the file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".pt"))
        raise CheckpointError(f"checkpoint {path!r} is a folder, not a checkpoint file"
                              + (f" (it holds {', '.join(found[:4])})" if found else ""))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on a damaged file
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(f"checkpoint {path!r} was refused: it holds a pickled Python object{what}, which "
                                  f"could run code when loaded. lrkd_fast checkpoints hold only tensors and plain data "
                                  f"(read with torch.load(weights_only=True)); load other files only if you trust "
                                  f"where they came from") from None
        first = text.strip().splitlines()[0][:160] if text.strip() else "no message"
        raise CheckpointError(f"checkpoint {path!r} cannot be read: the file is truncated or not a torch "
                              f"checkpoint ({type(exc).__name__}: {first})") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path!r} is not an lrkd_fast training checkpoint (it lacks {missing})")
    if not isinstance(state["params"], dict) or not all(isinstance(v, torch.Tensor) for v in state["params"].values()):
        raise CheckpointError(f"checkpoint {path!r} is damaged: its 'params' are not a dict of tensors")
    state = dict(state)
    state["path"] = path
    return state
