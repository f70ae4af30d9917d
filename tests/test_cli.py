"""The `lrkd-fast` command end to end on the real MiniLM (short runs)."""
import pytest
import torch
import transformers as T

from lrkd_fast import load_lowrank
from lrkd_fast.cli import main
from lrkd_fast.data import TextBatches, pydoc_sentences


pytestmark = pytest.mark.usefixtures("eager_backend")  # real-model runs: see conftest


def test_distill_swap_short_run_saves_a_reloadable_student(tmp_path, capsys):
    out = tmp_path / "student"
    rc = main(["distill", "--steps", "4", "--minutes", "0", "--heldout", "48", "--calib-texts", "32",
               "--batch-size", "8", "--seq-len", "48", "--output", str(out), "--quiet", "--checkpoint-every", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "low-rank start (whitened, sensitivity ranks)" in text and "distilled (4 steps)" in text and "kept 49.9%" in text
    assert (out / "checkpoints" / "step-2.pt").exists() and (out / "checkpoints" / "last.pt").exists()
    student = load_lowrank(str(out))
    tok = T.AutoTokenizer.from_pretrained(str(out))
    batch = TextBatches(pydoc_sentences()[:4], tok, 4, 32, shuffle=False).batch(0)
    with torch.no_grad():
        assert torch.isfinite(student(**batch).last_hidden_state).all()


def test_distill_lrc_short_run_exports_a_plain_model(tmp_path, capsys):
    out = tmp_path / "lrc"
    rc = main(["distill", "--method", "lrc", "--student-hidden", "192", "--steps", "3", "--minutes", "0",
               "--heldout", "48", "--calib-texts", "16", "--batch-size", "8", "--seq-len", "48",
               "--output", str(out), "--quiet"])
    assert rc == 0
    assert "LRC trained (3 steps)" in capsys.readouterr().out
    model = T.AutoModel.from_pretrained(str(out), trust_remote_code=True)
    assert model.config.hidden_size == 192


def test_distill_errors_are_clear(tmp_path, capsys):
    assert main(["distill", "--data", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["distill", "--init", "pca", "--output", str(tmp_path / "o")]) == 2
    assert "--init pca is for --method lrc" in capsys.readouterr().err
    assert main(["distill", "--method", "lrc", "--clone", "auto", "--output", str(tmp_path / "o")]) == 2
    assert "--clone is for --method swap" in capsys.readouterr().err
    assert main(["distill", "--method", "lrc", "--allocation", "uniform", "--output", str(tmp_path / "o")]) == 2
    assert "--allocation is for --method swap" in capsys.readouterr().err
    assert main(["distill", "--init", "svd", "--allocation", "sensitivity", "--output", str(tmp_path / "o")]) == 2
    assert "needs init='whitened'" in capsys.readouterr().err
