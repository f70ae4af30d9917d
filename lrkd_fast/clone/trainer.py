"""Training a :class:`~lrkd_fast.clone.LowRankClone` with the shared loop."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..training import TrainConfig, TrainingLoop
from .model import LowRankClone

__all__ = ["LRCTrainer"]


def _train_config(config: Optional[TrainConfig]) -> TrainConfig:
    """``config`` as a plain TrainConfig. The clone's loss settings live on the clone (:class:`LRCLoss`):
    a config that sets loss fields of another trainer (a DistillConfig's temperature, ...) would be
    ignored here, so it is refused."""
    if config is None:
        return TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if type(config) is TrainConfig:
        return config
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    defaults = type(config)()
    ignored = [f.name for f in dataclasses.fields(config)
               if f.name not in names and getattr(config, f.name) != getattr(defaults, f.name)]
    if ignored:
        raise ValueError(f"LRCTrainer trains with the loss the LowRankClone was built with (LRCLoss); "
                         f"config sets {ignored}, which it would ignore: pass a TrainConfig")
    return TrainConfig(**{n: getattr(config, n) for n in names})


class LRCTrainer(TrainingLoop):
    """Trains a :class:`LowRankClone`'s projections and norms with the shared loop (AdamW, schedule,
    clipping, progress, checkpoints, resume, gradient averaging under torchrun). The loss is the
    clone's own (``clone.loss``)."""

    def __init__(self, clone: LowRankClone, config: Optional[TrainConfig] = None):
        if not isinstance(clone, LowRankClone):
            raise TypeError(f"clone must be a LowRankClone, got {type(clone).__name__}")
        self.cfg = _train_config(config)
        self.model = clone
        self.params = [p for p in clone.parameters() if p.requires_grad]
        self._elapsed = None

    def compute_loss(self, batch):
        sharding = getattr(self, "sharding", None)  # lrkd_fast.sharding: the clone runs through its FSDP root
        out = (self.model if sharding is None else sharding.forward_module("clone"))(**batch)
        return out.loss, out.parts

    def diagnostics(self, batches: list) -> dict:
        """CKA and Gaussian MI between teacher and student at every clone site (``layer{i}.{site}``);
        see :func:`lrkd_fast.diagnostics.representation_diagnostics`."""
        from ..diagnostics import representation_diagnostics

        return representation_diagnostics(None, self.model, batches, components=self.cfg.diagnostics_components)
