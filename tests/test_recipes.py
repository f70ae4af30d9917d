"""The end-to-end recipes on a tiny saved teacher and 300 lines of real text."""
import json
import os

import pytest
import torch
import transformers as T

from lrkd_fast import load_lowrank
from lrkd_fast._table import format_table
from lrkd_fast.clone import LRCLoss
from lrkd_fast.data import TextBatches
from lrkd_fast.evaluate import EmbeddingFidelity, embedding_fidelity, sentence_embeddings
from lrkd_fast.recipes import (LRCRecipe, RecipeError, SwapRecipe, evaluate_student, export_merged, run_lrc_recipe,
                               run_swap_recipe)
from lrkd_fast.recipes.base import RUN_FILE, RecipeResult, Row, default_heldout, keep_better

pytestmark = pytest.mark.usefixtures("eager_backend")  # whole-model runs: see conftest

SMALL = dict(steps=3, batch_size=8, seq_len=32, calib_texts=16, progress=False)


def test_defaults_have_one_owner_and_a_fixed_length():
    assert SwapRecipe().steps == 800 and SwapRecipe().minutes is None and LRCRecipe().minutes is None
    assert SwapRecipe().resolved_allocation == "sensitivity"
    assert SwapRecipe(rank=4).resolved_allocation == SwapRecipe(init="svd").resolved_allocation == "uniform"
    assert LRCRecipe().loss == LRCLoss() and LRCLoss().temperature == 40.0 and LRCLoss().alpha == 0.2
    assert [default_heldout(n) for n in (3, 300, 1921, 5119, 10_000)] == [2, 30, 192, 512, 512]


@pytest.mark.parametrize("cls, kw, field", [
    (SwapRecipe, dict(keep=1.5), "keep"), (SwapRecipe, dict(keep=0), "keep"), (SwapRecipe, dict(rank=0), "rank"),
    (SwapRecipe, dict(heldout=1), "heldout"), (SwapRecipe, dict(steps=0), "steps"),
    (SwapRecipe, dict(minutes=0), "minutes"), (SwapRecipe, dict(init="pca"), "init"),
    (SwapRecipe, dict(init="svd", allocation="sensitivity"), "allocation"),
    (SwapRecipe, dict(clone_modules="blocks"), "clone_modules"), (SwapRecipe, dict(seq_len=1), "seq_len"),
    (SwapRecipe, dict(optimizer="sgd"), "optimizer"), (SwapRecipe, dict(whiten_max_features=0), "whiten_max_features"),
    (LRCRecipe, dict(init="whitened"), "init"), (LRCRecipe, dict(student_hidden=1), "student_hidden"),
    (LRCRecipe, dict(loss=0.2), "loss")])
def test_settings_are_checked_and_errors_name_the_setting(cls, kw, field):
    with pytest.raises(RecipeError) as info:
        cls(**kw)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LRCLoss(temperature=0.0)


def test_the_table_and_keeping_the_better_student():
    fid = lambda c: EmbeddingFidelity(c, c - 0.1, 0.5, 10, c - 0.05)  # noqa: E731
    result = RecipeResult(rows=[Row("teacher", fid(1.0), 1000, 1.25), Row("start", fid(0.9), 500, 2.0)])
    assert result.table() == format_table(
        ["model", "mean cos", "Spearman", "min cos", "NN agree", "params", "stage time s"],
        [["teacher", "1.0000", "0.9500", "0.9000", "0.500", "1,000", "1.2"],
         ["start", "0.9000", "0.8500", "0.8000", "0.500", "500", "2.0"]])
    # the built-in data's second, other-source held-out set: two more columns
    two = RecipeResult(rows=[Row("start", fid(0.9), 500, 2.0, other=fid(0.8))], other_name="stdlib")
    assert two.table() == format_table(
        ["model", "mean cos", "Spearman", "min cos", "NN agree", "stdlib cos", "Spearman", "params", "stage time s"],
        [["start", "0.9000", "0.8500", "0.8000", "0.500", "0.8000", "0.7500", "500", "2.0"]])
    assert format_table(["a", "bb"], [["xyz", "1"]]) == "a    bb\n---  --\nxyz   1"
    restored = []
    better = Row("distilled", fid(0.95), 500, 3.0)
    keep_better(result, result.rows[1], better, lambda: restored.append(1), save_worse=False)
    assert not restored and result.saved == "distilled" and better.label == "distilled"
    worse = Row("distilled", fid(0.85), 500, 3.0)
    keep_better(result, result.rows[1], worse, lambda: restored.append(1), save_worse=False)
    assert restored == [1] and result.saved == "start" and worse.label == "distilled, worse than start"
    assert "the start was saved" in result.notes[-1]
    worse2 = Row("distilled", fid(0.85), 500, 3.0)
    keep_better(result, result.rows[1], worse2, lambda: restored.append(2), save_worse=True)
    assert restored == [1] and result.saved == "distilled" and "saved anyway" in result.notes[-1]


def _fidelity_of_saved(path, teacher_dir, result):
    """The saved student's fidelity on the run's held-out texts, recomputed from the files on disk."""
    run = json.load(open(os.path.join(path, RUN_FILE)))
    from lrkd_fast.data import read_texts, split_texts

    _, held = split_texts(read_texts(run["data"]), run["heldout"], seed=run["seed"])
    tok = T.AutoTokenizer.from_pretrained(path)
    batches = list(TextBatches(held, tok, 64, run["seq_len"], shuffle=False))
    teacher = T.AutoModel.from_pretrained(teacher_dir)
    return embedding_fidelity(sentence_embeddings(load_lowrank(path), batches), sentence_embeddings(teacher, batches))


def test_swap_recipe_on_small_data_saves_the_better_student_and_cleans_up(tmp_path, tiny_teacher_dir, small_text_file):
    out = str(tmp_path / "worse")
    # a far too high learning rate: the run ends worse than it started, so the start is what gets saved
    r = run_swap_recipe(SwapRecipe(teacher=tiny_teacher_dir, data=small_text_file, lr=1.0, output=out,
                                   checkpoint_every=2, **SMALL))
    assert [row.label for row in r.rows] == ["teacher", "low-rank start (whitened, sensitivity ranks)",
                                             "distilled (3 steps), worse than start"]
    assert r.rows[0].fidelity.n == 30  # 10% of 300 texts held out
    assert r.saved == "start" and "the start was saved" in r.notes[0]
    saved = _fidelity_of_saved(out, tiny_teacher_dir, r)
    assert saved.mean_cosine == pytest.approx(r.rows[1].fidelity.mean_cosine, abs=1e-5)
    assert os.path.exists(os.path.join(out, "checkpoints", "step-2.pt"))
    assert not os.path.exists(os.path.join(out, "checkpoints", "last.pt"))
    run = json.load(open(os.path.join(out, RUN_FILE)))
    assert (run["method"], run["heldout"], run["teacher"]) == ("swap", 30, tiny_teacher_dir)

    out2 = str(tmp_path / "kept")
    r2 = run_swap_recipe(SwapRecipe(teacher=tiny_teacher_dir, data=small_text_file, lr=1.0, output=out2,
                                    save_worse=True, keep_checkpoints=True, **SMALL))
    assert r2.saved == "distilled" and os.path.exists(os.path.join(out2, "checkpoints", "last.pt"))
    assert _fidelity_of_saved(out2, tiny_teacher_dir, r2).mean_cosine == pytest.approx(
        r2.rows[2].fidelity.mean_cosine, abs=1e-5)

    # eval recomputes the table's numbers from the files; export writes a plain dense model
    rep = evaluate_student(out, batch_size=64, speed_batches=1, repeats=1)
    assert rep.fidelity.mean_cosine == pytest.approx(r.rows[1].fidelity.mean_cosine, abs=1e-5)
    assert rep.params["student"] == r.rows[1].params and rep.params["teacher"] == r.rows[0].params
    assert rep.file_bytes["student"] == os.path.getsize(os.path.join(out, "model.safetensors"))
    assert rep.file_bytes["teacher"] == os.path.getsize(os.path.join(tiny_teacher_dir, "model.safetensors"))
    assert all(rep.file_measured.values()) and all(v > 0 for v in rep.speed.values()) and not rep.readout
    assert "student / teacher" in rep.table() and "texts/s" in rep.table()
    merged = export_merged(out, str(tmp_path / "merged"))
    plain = T.AutoModel.from_pretrained(merged).eval()
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).last_hidden_state,
                                   load_lowrank(out)(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="another folder"):
        export_merged(out, out)
    with pytest.raises(ValueError, match="nothing to merge"):
        export_merged(tiny_teacher_dir, str(tmp_path / "m2"))


def test_rank_checks_come_before_any_work(tiny_teacher_dir, small_text_file, tmp_path):
    base = dict(teacher=tiny_teacher_dir, data=small_text_file, init="svd", output=str(tmp_path / "o"), **SMALL)
    with pytest.raises(RecipeError) as info:
        run_swap_recipe(SwapRecipe(rank=40, **base))  # the 32 x 32 attention layers allow at most 32
    assert info.value.field == "rank" and "rank must be in 1..min" in info.value.message
    with pytest.warns(UserWarning, match=r"rank 20 makes 8 of 12 swapped layers larger than the dense layers"):
        r = run_swap_recipe(SwapRecipe(rank=20, **base))  # break-even: 16 for 32 x 32, 21 for 32 x 64
    assert r.swap_report.params_after > r.swap_report.params_before
    with pytest.raises(RecipeError) as info:
        run_swap_recipe(SwapRecipe(heldout=295, **base))
    assert info.value.field == "heldout"


def test_lrc_recipe_exports_a_student_that_eval_reads_out(tmp_path, tiny_teacher_dir, small_text_file):
    out = str(tmp_path / "lrc")
    r = run_lrc_recipe(LRCRecipe(teacher=tiny_teacher_dir, data=small_text_file, student_hidden=16, fit_texts=64,
                                 output=out, **SMALL))
    assert [row.label.split(" (")[0] for row in r.rows] == ["teacher", "LRC start", "LRC trained"]
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    rep = evaluate_student(out, batch_size=64, speed_batches=1, repeats=1)
    assert rep.readout and rep.params["student"] == r.rows[1].params
    saved = r.rows[2] if r.saved == "distilled" else r.rows[1]
    assert rep.fidelity.mean_cosine == pytest.approx(saved.fidelity.mean_cosine, abs=1e-4)
