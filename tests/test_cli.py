"""The `lrkd-fast` command end to end: help, errors, and short runs of every subcommand."""
import argparse
import os
import subprocess
import sys

import pytest
import torch
import transformers as T

import lrkd_fast
from lrkd_fast import load_lowrank
from lrkd_fast.cli import _HelpFormatter, build_parser, main
from lrkd_fast.data import TextBatches, pydoc_sentences

pytestmark = pytest.mark.usefixtures("eager_backend")  # real-model runs: see conftest

SHORT = ["--steps", "3", "--calib-texts", "16", "--batch-size", "8", "--seq-len", "32", "--quiet"]


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_flag_has_help_that_shows_its_default():
    parser, subs = _subparsers()
    assert set(subs) == {"distill", "eval", "export", "tokenize", "bench"}
    for name, p in subs.items():
        text = p.format_help()
        assert "%%" not in text and "%(" not in text, name
        fmt = _HelpFormatter(name)
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.option_strings)
            if not action.required:
                assert "(default:" in fmt._get_help_string(action) % {"default": action.default}, \
                    (name, action.option_strings)
    keep = next(a for a in subs["distill"]._actions if "--keep" in a.option_strings)
    assert "one global budget" in keep.help.lower()
    assert "%%" not in parser.format_help()


def test_version_and_no_benchmark_import(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"lrkd-fast {lrkd_fast.__version__}"
    # the benchmarks are imported by `bench` only, not by the command's module
    code = "import sys, lrkd_fast.cli; print(sorted(m for m in sys.modules if m.startswith('lrkd_fast.benchmarks')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_errors_name_the_flag(tmp_path, capsys, tiny_teacher_dir):
    with pytest.raises(SystemExit):
        main(["distill", "--keep", "1.5"])
    assert "argument --keep: must be a fraction in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--steps", "0"])
    assert "argument --steps: must be an int >= 1, got 0" in capsys.readouterr().err
    o = ["--output", str(tmp_path / "o")]
    cases = [(["--data", str(tmp_path / "nope.txt")], "does not exist"),
             (["--init", "pca"], "argument --init: pca is for --method lrc"),
             (["--method", "lrc", "--clone", "auto"], "argument --clone: is for --method swap"),
             (["--method", "lrc", "--rank", "4"], "argument --rank: is for --method swap"),
             (["--init", "svd", "--allocation", "sensitivity"], "argument --allocation: 'sensitivity' needs init='whitened'"),
             (["--teacher", tiny_teacher_dir, "--rank", "40"], "argument --rank: layer 'encoder.layer.0.attention.self.query'"),
             (["--teacher", tiny_teacher_dir, "--heldout", "1915"], "argument --heldout: the data has 1921 texts")]
    for args, message in cases:
        assert main(["distill", *args, *o]) == 2, args
        assert message in capsys.readouterr().err, args


def test_distill_eval_export_on_small_data(tmp_path, capsys, tiny_teacher_dir, small_text_file):
    out, merged = str(tmp_path / "student"), str(tmp_path / "merged")
    rc = main(["distill", "--teacher", tiny_teacher_dir, "--data", small_text_file, "--output", out,
               "--diagnostics-every", "2", *SHORT])
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out fidelity to the teacher (30 texts" in text and "stage time s" in text
    # per-block CKA / MI at the last step (3), the lowest CKA flagged, the plot over steps 0, 2, 3 written
    assert "representation diagnostics at step 3 (held-out texts" in text and text.count("<- lags most") == 1
    assert text.count(" CKA ") == 2 and os.path.getsize(os.path.join(out, "diagnostics.png")) > 0
    assert "distilled (3 steps)" in text and "total wall time" in text and "swapped layers:" in text
    assert not os.path.exists(os.path.join(out, "checkpoints"))  # last.pt removed after the final save
    assert main(["eval", out, "--speed-batches", "1", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "30 texts: the held-out texts of its training run" in text and "student / teacher" in text
    assert main(["export", out, "--merged", merged]) == 0
    assert f"merged dense model saved to {merged}" in capsys.readouterr().out
    plain = T.AutoModel.from_pretrained(merged).eval()
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).last_hidden_state,
                                   load_lowrank(out)(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-5)
    assert main(["export", tiny_teacher_dir, "--merged", merged]) == 2
    assert "nothing to merge" in capsys.readouterr().err


def test_a_rank_that_grows_layers_warns(tmp_path, capsys, tiny_teacher_dir, small_text_file):
    rc = main(["distill", "--teacher", tiny_teacher_dir, "--data", small_text_file, "--rank", "20", "--init", "svd",
               "--output", str(tmp_path / "s"), "--keep-checkpoints", *SHORT])
    assert rc == 0
    err = capsys.readouterr().err
    assert "lrkd-fast distill: warning: rank 20 makes 8 of 12 swapped layers larger than the dense layers" in err
    assert os.path.exists(tmp_path / "s" / "checkpoints" / "last.pt")  # --keep-checkpoints


def test_lrc_short_run_exports_a_plain_model(tmp_path, capsys, tiny_teacher_dir, small_text_file):
    out = tmp_path / "lrc"
    rc = main(["distill", "--method", "lrc", "--teacher", tiny_teacher_dir, "--data", small_text_file,
               "--student-hidden", "16", "--temperature", "20", "--output", str(out), "--diagnostics-every", "1",
               *SHORT])
    assert rc == 0
    text = capsys.readouterr().out
    assert "LRC trained (3 steps)" in text and "representation diagnostics at step 3" in text
    assert "  layer1.o  " in text and (out / "diagnostics.png").exists()  # the LRC clone sites
    model = T.AutoModel.from_pretrained(str(out), trust_remote_code=True)
    assert model.config.hidden_size == 16


def test_default_teacher_and_data_short_run(tmp_path, capsys):
    # the packaged MiniLM on the built-in text, as a newcomer runs it (a few steps instead of the default)
    out = tmp_path / "student"
    rc = main(["distill", "--steps", "2", "--heldout", "48", "--calib-texts", "32", "--batch-size", "8",
               "--seq-len", "32", "--output", str(out), "--quiet", "--checkpoint-every", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "low-rank start (whitened, sensitivity ranks)" in text and "distilled (2 steps" in text
    assert "kept 49.9%" in text
    assert (out / "checkpoints" / "step-1.pt").exists() and not (out / "checkpoints" / "last.pt").exists()
    student = load_lowrank(str(out))
    tok = T.AutoTokenizer.from_pretrained(str(out))
    batch = TextBatches(pydoc_sentences()[:4], tok, 4, 32, shuffle=False).batch(0)
    with torch.no_grad():
        assert torch.isfinite(student(**batch).last_hidden_state).all()
