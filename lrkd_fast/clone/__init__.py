"""Low-Rank Clone: model-family descriptions (data), the clone (student builder, co-training forward,
export to a plain Hugging Face model) and its training loop / recipe."""
from .families import FAMILIES, Family, family_for, supported_model_types
from .model import CloneOutput, LowRankClone

__all__ = ["FAMILIES", "Family", "family_for", "supported_model_types", "CloneOutput", "LowRankClone",
           "LRCTrainer", "LRCRecipe", "run_lrc_recipe"]


def __getattr__(name):  # the recipe imports the data / evaluation stack: load it on first use
    if name in ("LRCTrainer", "LRCRecipe", "run_lrc_recipe"):
        from . import recipe
        return getattr(recipe, name)
    raise AttributeError(name)
