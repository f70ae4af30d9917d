"""Training either method with Hugging Face's ``transformers.Trainer`` (docs/trainer.md).

:class:`DistillationTrainer` is a ``transformers.Trainer`` whose loss is lrkd_fast's own:

* swap distillation: give it a :class:`~lrkd_fast.distillation.Distiller` (student, teacher and the
  loss settings of a :class:`~lrkd_fast.distillation.DistillConfig`); the Trainer trains the
  student's trainable parameters (the LowRankLinear factors, optionally norms and biases) on
  ``Distiller.compute_loss``;
* Low-Rank Clone: give it a :class:`~lrkd_fast.clone.LowRankClone`; the Trainer trains its
  projections and norms on the clone's co-training loss.

Everything else (optimizer, schedule, gradient accumulation, clipping, mixed precision, logging,
checkpoints, multi-GPU through accelerate) is the Trainer's. The loss of a step is the package's for
the same batch and parameters, and with the same optimizer settings (AdamW, constant learning rate,
clipping norm) the Trainer takes the same steps as :meth:`~lrkd_fast.training.TrainingLoop.train`.
The batch's ``labels`` are not used (the losses take their targets from ``input_ids`` and the teacher).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from torch import nn

try:
    import transformers
except ImportError as exc:  # pragma: no cover - transformers is a dependency of the package
    raise ImportError("lrkd_fast.hf_trainer needs transformers") from exc

__all__ = ["MODEL_INPUTS", "DistillationTrainer"]

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")  # what the losses are given


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` training with lrkd_fast's loss (module docstring).

    method: a :class:`~lrkd_fast.distillation.Distiller` (swap distillation; its ``student`` is the
        Trainer's model and the teacher is moved to the Trainer's device) or a
        :class:`~lrkd_fast.clone.LowRankClone` (the clone is the Trainer's model; build it from a teacher
        already on ``args.device``, since the clone shares the teacher's tensors).
    dropout: keep the student's dropout on while training. Off by default, as in the package's own loop
        (``TrainConfig.dropout``); a Low-Rank Clone always trains without dropout.
    The other arguments are ``transformers.Trainer``'s (``args``, ``train_dataset``,
    ``data_collator``, ...), except ``model``, which comes from ``method``.

    After each step, ``last_parts`` holds that step's loss terms (floats, as the package's loop logs them).
    Save a swap student with :func:`lrkd_fast.save_lowrank` and a clone's student with
    ``clone.save_student``; the Trainer's own checkpoints resume the Trainer.
    """

    loss_is_scaled_for_ga = False  # the losses are per-batch means: the Trainer divides by the accumulation steps

    def __init__(self, method: Union["Distiller", "LowRankClone"], args=None, *, dropout: bool = False, **kwargs):  # noqa: F821
        from .clone import LowRankClone
        from .distillation import Distiller

        if "model" in kwargs:
            raise TypeError("DistillationTrainer takes no model: the student comes from method")
        if not isinstance(dropout, bool):
            raise TypeError(f"dropout must be a bool, got {type(dropout).__name__}")
        if isinstance(method, Distiller):
            model = method.student
            if method.cfg.optimizer != "adamw" and kwargs.get("optimizers", (None, None))[0] is None:
                raise ValueError(f"method: its DistillConfig(optimizer={method.cfg.optimizer!r}) is for Distiller.train; "
                                 f"the Trainer makes its own AdamW. Pass optimizers=(lrkd_fast.optim.WhitenedAdamW("
                                 f"method.params, method.whitening_bases(batches), lr=...), scheduler) to use it")
        elif isinstance(method, LowRankClone):
            model = method
        else:
            raise TypeError(f"method must be a Distiller or a LowRankClone, got {type(method).__name__}")
        self.method, self.dropout, self.last_parts = method, dropout, {}
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is the method's; num_items_in_batch is not used
        device = self.args.device
        if isinstance(method, Distiller):
            method.teacher.to(device)
        else:
            have = next(method.teacher.parameters()).device
            if have.type != device.type:
                raise ValueError(f"method: the LowRankClone's teacher is on {have}, the Trainer trains on {device}: "
                                 f"move the teacher there before LowRankClone.from_teacher (or set args.use_cpu)")

    def compute_loss(self, model: nn.Module, inputs: Mapping, return_outputs: bool = False, num_items_in_batch=None):
        """The method's loss on ``inputs`` (their :data:`MODEL_INPUTS`); with ``return_outputs`` also its parts."""
        from .distillation import Distiller

        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise ValueError("inputs must be a mapping with at least 'input_ids' (a tokenized batch)")
        batch = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
        if isinstance(self.method, Distiller):
            if model.training and not self.dropout:
                model.eval()  # the Trainer put it in train mode; the package's loop trains without dropout
            self.method._forward["student"] = model  # the Trainer's model: the student, or its (DDP) wrapper
            loss, parts = self.method.compute_loss(batch)
        else:
            out = model(**batch)
            loss, parts = out.loss, out.parts
        self.last_parts = parts
        return (loss, parts) if return_outputs else loss
