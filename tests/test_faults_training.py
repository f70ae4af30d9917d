"""Training runs under faults: bad settings, a diverging student, an interrupt, resuming, and damaged or
crafted checkpoint files. Real loops on real (tiny) models; one test interrupts a real `lrkd-fast distill`
process with SIGINT and resumes it."""
import copy
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import lrkd_fast
from lrkd_fast import DistillConfig, Distiller, LowRankConfig, swap_linear_layers
from lrkd_fast.clone import LRCLoss
from lrkd_fast.ops.clone_loss import CloneLoss, clone_loss
from lrkd_fast.ops.kd_loss import KDLoss, kd_loss
from lrkd_fast.training import CheckpointError, TrainConfig, TrainingDiverged, TrainingLoop, read_checkpoint
from tests.conftest import VOCAB, tiny

NAN, INF = float("nan"), float("inf")


class _Regression(TrainingLoop):
    """Least squares on fixed data; ``poison`` steps return an infinite loss (a bad batch), ``fail_at``
    raises ``fail_with`` from the loss of that step."""

    def __init__(self, cfg, d_in=3, poison=(), fail_at=None, fail_with=RuntimeError):
        self.cfg = cfg
        self.model = nn.Linear(d_in, 1)
        self.params = list(self.model.parameters())
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, d_in, generator=g)
        self.y = self.x[:, :1] * 2.0 - 0.5
        self.poison, self.fail_at, self.fail_with, self.calls = set(poison), fail_at, fail_with, 0

    def compute_loss(self, batch):
        step = int(batch["step"])
        if step == self.fail_at:
            raise self.fail_with(f"failure inside step {step}")
        loss = (self.model(self.x) - self.y).pow(2).mean()
        if step in self.poison:
            loss = loss * INF
        return loss, {"loss": loss.item()}


class _Steps:
    """Data whose batch carries its step number (for the loops above)."""

    def __len__(self):
        return 1000

    def batch(self, step):
        return {"input_ids": torch.zeros(1, 2, dtype=torch.long), "step": torch.tensor(step)}


DATA = _Steps()
CFG = dict(lr=0.05, warmup=0.0, schedule="constant", progress=False)


# ------------------------------------------------------------------------------------ settings

def test_train_config_rejects_bad_numbers_naming_the_field():
    for kw, field in [(dict(max_grad_norm=-1.0), "max_grad_norm"), (dict(max_grad_norm=NAN), "max_grad_norm"),
                      (dict(max_grad_norm=INF), "max_grad_norm"), (dict(lr=INF), "lr"), (dict(lr=NAN), "lr"),
                      (dict(weight_decay=INF), "weight_decay"), (dict(max_minutes=INF), "max_minutes"),
                      (dict(max_minutes=-1.0), "max_minutes"), (dict(checkpoint_minutes=-1.0), "checkpoint_minutes"),
                      (dict(checkpoint_minutes=NAN), "checkpoint_minutes")]:
        with pytest.raises(ValueError, match=f"^{field} must be"):
            TrainConfig(**kw)
    assert TrainConfig(max_grad_norm=0.0).max_grad_norm == 0.0  # 0 still means "no clipping"


@pytest.mark.parametrize("value", [NAN, INF, -1.0])
def test_every_loss_weight_and_temperature_rejects_nan_inf_negative(value):
    for name in ("clone_weight", "output_weight", "ce_weight", "temperature"):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            DistillConfig(**{name: value})
    for name in ("alpha", "kd_weight", "lm_weight", "temperature"):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            LRCLoss(**{name: value})
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 10)
    for name in ("kl_weight", "ce_weight"):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            kd_loss(h, w, torch.zeros(4, dtype=torch.long), teacher_logits=t, **{name: value})
        with pytest.raises(ValueError, match=f"^{name} must be"):
            KDLoss(**{name: value})
    with pytest.raises(ValueError, match="^alpha must be"):
        CloneLoss(alpha=value)
    with pytest.raises((ValueError, TypeError), match="^alpha must be"):
        clone_loss([(h, h.clone())], alpha=value)
    with pytest.raises((ValueError, TypeError), match=r"^weights\[0\] must be"):
        clone_loss([(h, h.clone())], weights=[value])


# ------------------------------------------------------------------------------------ divergence

def test_a_diverging_student_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """A tiny swapped BERT at a learning rate that blows it up: the loop stops at the first NaN/inf
    loss or gradient, before that update, and writes nothing from it."""
    teacher = tiny("bert").eval()
    student = copy.deepcopy(teacher)
    swap_linear_layers(student, LowRankConfig(rank=4))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, VOCAB, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(3)]
    d = Distiller(student, teacher, DistillConfig(steps=30, lr=1e3, warmup=0.0, schedule="constant", progress=False,
                                                  checkpoint_dir=str(tmp_path), checkpoint_every=1,
                                                  checkpoint_minutes=1e-9))
    with lrkd_fast.set_backend("eager"), pytest.raises(TrainingDiverged) as info:
        d.train(data)
    exc, k = info.value, info.value.step
    assert 1 <= k < 30 and f"at step {k} " in str(exc) and exc.what in ("loss", "gradient norm")
    assert not math.isfinite(exc.value)
    # the last good checkpoint: written after step k-1, holding the parameters the refused update left alone
    assert exc.checkpoint == str(tmp_path / "last.pt") and f"{exc.checkpoint!r}" in str(exc)
    last = read_checkpoint(exc.checkpoint)
    assert last["step"] == k and len(last["history"]["loss"]) == k
    assert all(math.isfinite(v) for v in last["history"]["loss"])
    for n, v in last["params"].items():
        assert torch.isfinite(v).all(), n
        torch.testing.assert_close(v, dict(student.named_parameters())[n].detach(), rtol=0, atol=0)
    assert (tmp_path / f"step-{k}.pt").exists() and not (tmp_path / f"step-{k + 1}.pt").exists()
    assert not glob.glob(str(tmp_path / "*.tmp"))


def test_an_infinite_loss_at_step_k_stops_before_its_update(tmp_path):
    loop = _Regression(TrainConfig(steps=10, checkpoint_dir=str(tmp_path), checkpoint_every=2, **CFG), poison={5})
    with pytest.raises(TrainingDiverged, match="the loss is inf at step 5 ") as info:
        loop.train(DATA)
    assert info.value.checkpoint == str(tmp_path / "step-4.pt")
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "step-6.pt").exists()
    ref = _Regression(TrainConfig(steps=5, **CFG))
    ref.train(DATA)  # the same five good steps, uninterrupted
    torch.testing.assert_close(loop.model.weight, ref.model.weight, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ interrupts

@pytest.mark.parametrize("kind", [KeyboardInterrupt, RuntimeError])
def test_an_interrupt_or_error_mid_run_writes_a_resumable_checkpoint_and_says_where(tmp_path, kind):
    loop = _Regression(TrainConfig(steps=12, checkpoint_dir=str(tmp_path), **CFG), fail_at=7, fail_with=kind)
    with pytest.raises(kind) as info:
        loop.train(DATA)
    path = str(tmp_path / "last.pt")
    assert info.value.resume_checkpoint == path
    assert any(path in note and "after step 7 of 12" in note for note in info.value.__notes__)
    assert read_checkpoint(path)["step"] == 7 and not glob.glob(str(tmp_path / "*.tmp"))
    full = _Regression(TrainConfig(steps=12, **CFG)).train(DATA)
    again = _Regression(TrainConfig(steps=12, **CFG))
    resumed = again.train(DATA, resume_from=path)
    assert resumed["loss"] == full["loss"] and resumed["step"] == list(range(12))


def test_no_step_finished_means_no_checkpoint_and_the_note_says_so(tmp_path):
    loop = _Regression(TrainConfig(steps=5, checkpoint_dir=str(tmp_path), **CFG), fail_at=0,
                       fail_with=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        loop.train(DATA)
    assert not os.listdir(tmp_path) and "no checkpoint was written" in info.value.__notes__[0]


def test_checkpoint_minutes_keeps_last_pt_current(tmp_path):
    seen = []
    loop = _Regression(TrainConfig(steps=5, checkpoint_dir=str(tmp_path), checkpoint_minutes=1e-9, **CFG))
    # on_step(step) runs before that step's checkpoint: last.pt then holds the state after the previous step
    loop.train(DATA, on_step=lambda step, parts: seen.append(
        read_checkpoint(str(tmp_path / "last.pt"))["step"] if step else None))
    assert seen == [None, 1, 2, 3, 4] and read_checkpoint(str(tmp_path / "last.pt"))["step"] == 5


def test_a_failed_checkpoint_write_leaves_no_tmp_file(tmp_path):
    (tmp_path / "step-2.pt").mkdir()  # the checkpoint's name is taken by a folder: the write fails
    loop = _Regression(TrainConfig(steps=6, checkpoint_dir=str(tmp_path), checkpoint_every=2, **CFG))
    with pytest.raises(OSError, match="cannot write checkpoint .*step-2.pt") as info:
        loop.train(DATA)
    assert not glob.glob(str(tmp_path / "*.tmp")) and info.value.resume_checkpoint == str(tmp_path / "last.pt")


# ------------------------------------------------------------------------------------ resume

def test_resume_continues_to_the_new_total_and_a_finished_run_trains_nothing(tmp_path):
    first = _Regression(TrainConfig(steps=6, checkpoint_dir=str(tmp_path), **CFG))
    first.train(DATA)
    last = str(tmp_path / "last.pt")
    again = _Regression(TrainConfig(steps=6, checkpoint_dir=str(tmp_path), **CFG))
    with pytest.warns(UserWarning, match="at step 6 .*nothing to train"):
        hist = again.train(DATA, resume_from=last)
    assert len(hist["step"]) == 6 and read_checkpoint(last)["step"] == 6  # not bumped
    torch.testing.assert_close(again.model.weight, first.model.weight, rtol=0, atol=0)
    longer = _Regression(TrainConfig(steps=10, **CFG))
    hist = longer.train(DATA, resume_from=last)  # the new budget: 4 more steps
    ref = _Regression(TrainConfig(steps=10, **CFG)).train(DATA)
    assert hist["loss"] == ref["loss"] and hist["step"] == list(range(10))


def test_resuming_a_run_that_hit_its_time_cap_with_the_same_cap_trains_nothing(tmp_path):
    capped = _Regression(TrainConfig(steps=50, max_minutes=1e-9, checkpoint_dir=str(tmp_path), **CFG))
    assert capped.train(DATA)["stopped_early"]
    again = _Regression(TrainConfig(steps=50, max_minutes=1e-9, **CFG))
    with pytest.warns(UserWarning, match="at step 1 .*max_minutes=1e-09.*nothing to train"):
        hist = again.train(DATA, resume_from=str(tmp_path / "last.pt"))
    assert hist["step"] == [0] and hist["stopped_early"]


def test_a_checkpoint_of_other_shapes_is_refused_naming_the_parameter(tmp_path):
    _Regression(TrainConfig(steps=2, checkpoint_dir=str(tmp_path), **CFG)).train(DATA)
    wider = _Regression(TrainConfig(steps=4, **CFG), d_in=5)
    before = wider.model.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"parameter 'weight' has shape \(1, 3\) in the saved state but "
                                              r"\(1, 5\) in this model"):
        wider.train(DATA, resume_from=str(tmp_path / "last.pt"))
    assert torch.equal(wider.model.weight, before)  # nothing copied
    with pytest.raises(ValueError, match=r"parameter 'bias' has shape \(2,\)"):
        wider.load_trainable_state({"bias": torch.zeros(2)})  # copy_ would have broadcast (1,) -> silently


class _RunsCode:
    """Unpickling this creates a file: what a crafted checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    _Regression(TrainConfig(steps=2, checkpoint_dir=str(tmp_path), **CFG)).train(DATA)
    state = torch.load(str(tmp_path / "last.pt"), weights_only=True)
    marker = tmp_path / "code-ran"
    state["history"]["extra"] = _RunsCode(str(marker))
    crafted = str(tmp_path / "crafted.pt")
    torch.save(state, crafted)
    with pytest.raises(CheckpointError, match=r"crafted.pt' was refused: it holds a pickled Python object \(io.open\)"):
        _Regression(TrainConfig(steps=4, **CFG)).train(DATA, resume_from=crafted)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 10, 0.5])
def test_a_truncated_checkpoint_gives_a_clear_error_naming_the_file(tmp_path, keep):
    _Regression(TrainConfig(steps=2, checkpoint_dir=str(tmp_path), **CFG)).train(DATA)
    data = (tmp_path / "last.pt").read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[:int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"checkpoint '.*cut.pt' cannot be read: the file is truncated or "
                                              r"not a torch checkpoint"):
        read_checkpoint(str(bad))
    torch.save({"weights": torch.zeros(2)}, str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match=r"other.pt' is not an lrkd_fast training checkpoint"):
        read_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        read_checkpoint(str(tmp_path))


# ------------------------------------------------------------------------------------ a real run, interrupted

def _losses(out):
    with open(os.path.join(out, "lrkd_fast_run.json")) as f:
        return json.load(f)["training"]["loss"]


def test_sigint_to_a_real_distill_run_then_resume_reaches_the_uninterrupted_loss(tmp_path, tiny_teacher_dir,
                                                                                 small_text_file):
    from lrkd_fast.cli import main

    common = ["distill", "--teacher", tiny_teacher_dir, "--data", small_text_file, "--steps", "16", "--init", "svd",
              "--calib-texts", "8", "--batch-size", "4", "--seq-len", "16", "--quiet", "--checkpoint-every", "1",
              # the cache would serve epoch-two targets computed inside other batches (other padding),
              # which the resumed run recomputes: equal only up to a CPU's rounding, amplified by Adam
              "--no-teacher-cache"]
    out = str(tmp_path / "run")
    env = dict(os.environ, LRKD_FAST_BACKEND="eager")
    proc = subprocess.Popen([sys.executable, "-m", "lrkd_fast.cli", *common, "--output", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not os.path.exists(os.path.join(out, "checkpoints", "step-2.pt")) and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    last = os.path.join(out, "checkpoints", "last.pt")
    assert proc.returncode == 130, stderr[-3000:]
    assert f"interrupted; the run so far is in {last}: continue it with the same command and --resume {last}" \
        in stderr and "Traceback" not in stderr
    stopped = read_checkpoint(last)["step"]
    assert 2 <= stopped < 16 and not os.path.exists(os.path.join(out, "model.safetensors"))
    with lrkd_fast.set_backend("eager"):
        assert main([*common, "--output", out, "--resume", last]) == 0
        ref = str(tmp_path / "ref")
        assert main([*common, "--output", ref]) == 0
    resumed, full = _losses(out), _losses(ref)
    assert len(resumed) == len(full) == 16
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full), rtol=1e-5, atol=1e-9)
