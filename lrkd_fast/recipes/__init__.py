"""End-to-end runs behind the ``lrkd-fast`` command, usable from Python as well:
:mod:`~lrkd_fast.recipes.swap` (``distill``), :mod:`~lrkd_fast.recipes.lrc` (``distill --method lrc``),
:mod:`~lrkd_fast.recipes.student` (``eval``, ``export``); :mod:`~lrkd_fast.recipes.base` holds what
they share."""
from .base import Recipe, RecipeError, RecipeResult, init_distributed, load_teacher, prepare
from .lrc import LRCRecipe, lrc_preset, run_lrc_recipe
from .student import StudentReport, evaluate_student, export_merged, load_student
from .swap import SwapRecipe, default_targets, run_swap_recipe

__all__ = ["LRCRecipe", "Recipe", "RecipeError", "RecipeResult", "StudentReport", "SwapRecipe", "default_targets",
           "evaluate_student", "export_merged", "init_distributed", "load_student", "load_teacher", "lrc_preset",
           "prepare", "run_lrc_recipe", "run_swap_recipe"]
