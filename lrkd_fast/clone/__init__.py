"""Low-Rank Clone: model-family descriptions (data), the clone (student builder, co-training forward,
export to a plain Hugging Face model) and its trainer. The end-to-end run is
:mod:`lrkd_fast.recipes.lrc`."""
from .families import FAMILIES, Family, family_for, supported_model_types
from .model import CloneOutput, LowRankClone, LRCLoss
from .trainer import LRCTrainer

__all__ = ["FAMILIES", "CloneOutput", "Family", "LRCLoss", "LRCTrainer", "LowRankClone", "family_for",
           "supported_model_types"]
