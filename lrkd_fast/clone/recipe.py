"""Old import path of :class:`LRCTrainer` and :func:`readout_fidelity`; import them from
:mod:`lrkd_fast.clone` and :mod:`lrkd_fast.evaluate` (the LRC recipe is :mod:`lrkd_fast.recipes.lrc`)."""
from ..evaluate import readout_fidelity
from .trainer import LRCTrainer

__all__ = ["LRCTrainer", "readout_fidelity"]
