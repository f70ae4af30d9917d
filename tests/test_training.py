"""The shared optimizer loop: schedule, progress, time cap, checkpoints of the trainable state."""
import math

import pytest
import torch
from torch import nn

from lrkd_fast.training import TrainConfig, TrainingLoop


class _Regression(TrainingLoop):
    """Least squares on fixed data: the smallest real training loop."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model = nn.Linear(3, 1)
        self.params = list(self.model.parameters())
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3

    def compute_loss(self, batch):
        loss = (self.model(self.x) - self.y).pow(2).mean()
        return loss, {"loss": loss.item()}


BATCHES = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]


def test_fixed_steps_run_to_the_end_and_the_bar_shows_the_real_total(capsys):
    loop = _Regression(TrainConfig(steps=40, lr=0.1, warmup=0.0, progress=True))
    hist = loop.train(BATCHES)
    err = capsys.readouterr().err
    assert len(hist["step"]) == 40 and not hist["stopped_early"]
    assert "40/40" in err and "100%" in err
    assert hist["loss"][-1] < 0.05 * hist["loss"][0]


def test_a_time_cap_stops_the_run_and_the_bar_ends_at_what_ran(capsys):
    loop = _Regression(TrainConfig(steps=1000, lr=0.1, max_minutes=1e-9, progress=True))
    hist = loop.train(BATCHES)
    err = capsys.readouterr().err
    assert len(hist["step"]) == 1 and hist["stopped_early"]
    assert "1/1" in err and "100%" in err and "minute cap" in err


def test_trainable_state_round_trip_and_checkpoint_resume(tmp_path):
    loop = _Regression(TrainConfig(steps=6, lr=0.05, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=3))
    start = loop.trainable_state()
    full = loop.train(BATCHES)
    end = loop.trainable_state()
    assert set(start) == {"weight", "bias"} and not torch.equal(start["weight"], end["weight"])
    loop.load_trainable_state(start)
    assert torch.equal(loop.model.weight, start["weight"])
    with pytest.raises(ValueError, match="unknown parameters"):
        loop.load_trainable_state({"nope": torch.zeros(1)})
    # resuming from step 3 reproduces the last three losses exactly
    again = _Regression(TrainConfig(steps=6, lr=0.05, progress=False))
    resumed = again.train(BATCHES, resume_from=str(tmp_path / "step-3.pt"))
    assert resumed["loss"] == full["loss"]
    torch.testing.assert_close(again.model.weight, end["weight"], rtol=0, atol=0)


@pytest.mark.parametrize("kw, msg", [(dict(steps=0), "steps must be an int >= 1"), (dict(steps=2.5), "steps must be"),
                                     (dict(max_minutes=0), "max_minutes must be None or > 0"),
                                     (dict(lr=0), "lr must be > 0"), (dict(warmup=1.0), "warmup must be"),
                                     (dict(schedule="step"), "schedule must be one of"),
                                     (dict(max_grad_norm=-1), "max_grad_norm"), (dict(log_every=0), "log_every"),
                                     (dict(checkpoint_every=-1), "checkpoint_every"),
                                     (dict(max_grad_norm=float("inf")), "max_grad_norm"),
                                     (dict(lr=float("inf")), "lr must be > 0 and finite"),
                                     (dict(max_minutes=float("inf")), "max_minutes"),
                                     (dict(checkpoint_minutes=-1.0), "checkpoint_minutes")])
def test_train_config_checks_its_fields(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_time_budget_schedule_follows_the_clock_not_the_step_bound():
    from lrkd_fast.training import TrainingLoop

    loop = TrainingLoop()
    loop.cfg = TrainConfig(steps=10_000, warmup=0.05, max_minutes=10.0)
    clock = {"s": 0.0}
    loop._elapsed = lambda: clock["s"]
    at = lambda seconds, step: (clock.update(s=seconds), loop._lr_factor(step))[1]
    # warm-up ends after 5% of the 600 s budget, not after 5% of the 10k step bound
    assert at(15.0, 40) == pytest.approx(0.5)
    assert at(30.0, 80) == pytest.approx(1.0)
    # cosine decay over the remaining 95% of the budget; a step-bound-only loop would still be warming up
    assert at(30.0 + 0.5 * 570.0, 900) == pytest.approx(0.5)
    assert at(600.0, 1800) == pytest.approx(0.0, abs=1e-12)
    # without a budget the steps drive it: warm-up over the first 5% of them
    loop.cfg = TrainConfig(steps=100, warmup=0.05)
    assert [loop._lr_factor(s) for s in (0, 4)] == pytest.approx([0.2, 1.0])
    assert loop._lr_factor(5 + 95 // 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))


def test_resume_from_what_read_checkpoint_returned_and_the_weights_only_load(tmp_path):
    from lrkd_fast.training import read_checkpoint

    loop = _Regression(TrainConfig(steps=6, lr=0.05, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=3))
    full = loop.train(BATCHES)
    state = read_checkpoint(str(tmp_path / "step-3.pt"))  # torch.load(weights_only=True) reads our own checkpoints
    assert state["step"] == 3 and state["path"] == str(tmp_path / "step-3.pt") and set(state["params"]) == {"weight", "bias"}
    again = _Regression(TrainConfig(steps=6, lr=0.05, progress=False))
    assert again.train(BATCHES, resume_from=state)["loss"] == full["loss"]
    torch.testing.assert_close(again.model.weight, loop.model.weight, rtol=0, atol=0)
