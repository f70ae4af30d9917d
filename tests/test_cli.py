"""The `lrkd-fast` command end to end: help, errors, and short runs of every subcommand."""
import argparse
import json
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
             (["--method", "lrc", "--optimizer", "adamw"], "argument --optimizer: is for --method swap"),
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


# ------------------------------------------------------------------------------------ user errors and faults

def _ours(err):
    """The command's own lines of stderr (transformers may draw a loading bar there)."""
    return [line for line in err.splitlines() if line.startswith("lrkd-fast ")]


def _one_line_error(capsys, argv, message):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(_ours(err)) == 1, (argv, err)


def test_bad_paths_devices_and_numbers_are_one_line_errors_before_any_loading(tmp_path, capsys, monkeypatch,
                                                                              tiny_teacher_dir):
    from lrkd_fast.training import TrainConfig, TrainingLoop

    afile = tmp_path / "afile"
    afile.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    crafted = tmp_path / "crafted.pt"
    torch.save({"step": 1, "params": {}, "optimizer": {}, "scheduler": {}, "history": {}, "rng": {},
                "x": TrainConfig()}, str(crafted))  # a pickled object (a dataclass), not plain data
    cut = tmp_path / "cut.pt"
    loop = TrainingLoop()
    loop.cfg, loop.model = TrainConfig(), torch.nn.Linear(2, 1)
    loop.params = list(loop.model.parameters())
    opt = torch.optim.AdamW(loop.params)
    loop.save_checkpoint(str(cut), 1, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         {"step": [], "loss": [], "parts": [], "tokens": 0, "seconds": 0.0})
    cut.write_bytes(cut.read_bytes()[:200])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    o = ["--output", str(tmp_path / "new")]
    t = ["--teacher", tiny_teacher_dir]
    cuda = "cuda:99" if torch.cuda.is_available() else "cuda"
    cases = [
        (["--output", str(afile), *t], f"argument --output: '{afile}' is a file, not a folder"),
        (["--output", str(afile / "sub"), *t], f"argument --output: '{afile / 'sub'}' cannot be created: '{afile}' is a file"),
        (["--output", str(foreign), *t], f"argument --output: '{foreign}' is a folder with other files in it (notes.txt)"),
        (["--device", "tpu", *t, *o], "argument --device: unknown device 'tpu': use cpu or cuda"),
        (["--device", cuda, *t, *o], f"argument --device: '{cuda}'"),
        (["--teacher", "./no-such-model", *o], "argument --teacher: no such folder: './no-such-model'"),
        (["--method", "lrc", "--preset", "paper", "--teacher", "./no-such-model", *o], "argument --teacher: no such folder"),
        (["--teacher", str(no_config), *o], "is not a model folder (it has no config.json)"),
        (["--teacher", "nobody-here/no-such-model", *o], "no model of that name in the local Hugging Face cache"),
        (["--data", str(tmp_path / "none.txt"), *t, *o], "argument --data: "),
        (["--resume", str(tmp_path / "none.pt"), *t, *o], "argument --resume: checkpoint '"),
        (["--resume", str(crafted), *t, *o], "argument --resume: checkpoint '" + str(crafted) + "' was refused: it holds a "
                                             "pickled Python object"),
        (["--resume", str(cut), *t, *o], f"argument --resume: checkpoint '{cut}' cannot be read: the file is truncated"),
    ]
    for args, message in cases:
        _one_line_error(capsys, ["distill", *args], message)
    assert (foreign / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()
    for flag, value, message in [("--minutes", "0", "must be a number > 0"), ("--minutes", "-1", "must be a number > 0"),
                                 ("--minutes", "nan", "must be a finite number"), ("--lr", "inf", "must be a finite"),
                                 ("--checkpoint-minutes", "-1", "must be a number >= 0"),
                                 ("--alpha", "nan", "must be a finite number")]:
        with pytest.raises(SystemExit):
            main(["distill", flag, value])
        assert f"argument {flag}: {message}" in capsys.readouterr().err, flag


def test_output_folder_rules():
    from lrkd_fast.recipes.base import RUN_FILE, RecipeError, check_output

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        check_output(d)  # empty
        check_output(os.path.join(d, "a", "b"))  # to be created
        os.makedirs(os.path.join(d, "checkpoints"))
        check_output(d)  # what an interrupted run leaves
        open(os.path.join(d, "weights.bin"), "w").close()
        with pytest.raises(RecipeError, match="not a previous lrkd-fast output"):
            check_output(d)
        check_output(d, overwrite=True)
        open(os.path.join(d, RUN_FILE), "w").close()
        check_output(d)  # a finished run's folder


def test_a_diverging_run_stops_with_one_line_and_saves_nothing(tmp_path, capsys, tiny_teacher_dir, small_text_file):
    out = tmp_path / "s"
    rc = main(["distill", "--teacher", tiny_teacher_dir, "--data", small_text_file, "--output", str(out),
               "--lr", "1000", "--checkpoint-every", "1", *SHORT[:-1], "--steps", "8", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(_ours(err)) == 1, err
    assert "error: training diverged: the " in err and " at step " in err and "nothing was saved to the output" in err
    assert "--resume" not in err or f"--resume {out / 'checkpoints'}" in err
    assert not (out / "model.safetensors").exists() and not (out / "lrkd_fast_run.json").exists()


def test_resume_skips_the_init_counts_the_whole_run_and_refuses_other_shapes(tmp_path, capsys, tiny_teacher_dir,
                                                                            small_text_file):
    base = ["distill", "--teacher", tiny_teacher_dir, "--data", small_text_file, "--calib-texts", "16",
            "--batch-size", "8", "--seq-len", "32", "--quiet", "--keep-checkpoints"]
    out = tmp_path / "s"
    assert main([*base, "--output", str(out), "--steps", "4", "--checkpoint-every", "2", "--save-worse"]) == 0
    first = capsys.readouterr().out
    distilled = next(line for line in first.splitlines() if line.startswith("distilled (4 steps)"))
    last = str(out / "checkpoints" / "last.pt")
    # the same budget: nothing to train, and the start is the checkpoint's student (its factors, not a new init)
    assert main([*base, "--output", str(out), "--steps", "4", "--resume", last, "--save-worse"]) == 0
    cap = capsys.readouterr()
    assert "at step 4 after" in cap.err and "nothing to train" in cap.err
    start = next(line for line in cap.out.splitlines() if line.startswith("low-rank start (resumed at step 4)"))
    assert start.split()[-5:-1] == distilled.split()[-5:-1]  # fidelity columns and params: the same student
    assert "distilled (4 steps)" in cap.out
    with open(out / "lrkd_fast_run.json") as f:
        assert len(json.load(f)["training"]["loss"]) == 4
    # a rank the checkpoint was not written with: refused, naming the parameter and both shapes
    _one_line_error(capsys, [*base, "--output", str(out), "--resume", last, "--rank", "3", "--init", "svd"],
                    "argument --resume: checkpoint '" + last + "' does not fit this student: parameter "
                    "'encoder.layer.0.attention.self.query.U' has shape (32, ")
    _one_line_error(capsys, [*base, "--output", str(out), "--resume", last, "--target-modules", r".*\.query"],
                    "swapped other layers than this run selects")


def test_lrc_resume_refuses_a_clone_of_another_width(tmp_path, capsys, tiny_teacher_dir, small_text_file):
    from lrkd_fast.clone import LowRankClone, LRCTrainer
    from lrkd_fast.recipes.base import load_teacher
    from lrkd_fast.training import TrainConfig

    teacher, tok = load_teacher(tiny_teacher_dir, "cpu")
    clone = LowRankClone.from_teacher(teacher, 16)
    batch = TextBatches(pydoc_sentences()[:4], tok, 4, 16, shuffle=False).batch(0)
    LRCTrainer(clone, TrainConfig(steps=1, progress=False, checkpoint_dir=str(tmp_path / "c"))).train([batch])
    clone.close()
    last = str(tmp_path / "c" / "last.pt")
    _one_line_error(capsys, ["distill", "--method", "lrc", "--teacher", tiny_teacher_dir, "--data", small_text_file,
                             "--student-hidden", "8", "--output", str(tmp_path / "o"), "--resume", last, *SHORT],
                    f"argument --resume: checkpoint '{last}' does not fit this student: parameter 'proj.emb' has shape "
                    f"(32, 16) in the saved state but (32, 8) in this model")


def test_eval_checks_the_device_and_folder_before_loading(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--device", "tpu"]) == 2
    assert "lrkd-fast eval: error: argument --device: unknown device 'tpu': use cpu or cuda" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
