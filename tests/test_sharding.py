"""FSDP2 sharding (lrkd_fast.sharding): the wrapping plans, and on 2 real gloo processes (torchrun,
tests/sharding_worker.py) a sharded step equal to the single-process step on the whole batch, and the
torch.distributed.checkpoint round trip (written by 2 processes, resumed by 2 and by 1)."""
import glob
import os
import socket
import subprocess
import sys

import pytest
import torch

from lrkd_fast import set_backend
from lrkd_fast.sharding import distiller_plan, is_sharded_checkpoint, load_sharded_parameters, lrc_plan, shard_training
from lrkd_fast.training import CheckpointError, read_checkpoint
from tests.sharding_worker import CLI_ARGS, LOOPS, STEP, batch, calibration, gradients, teacher, trained_state

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tiny_teacher_dir, small_text_file):
    """The worker's output folder: one torchrun launch of 2 gloo processes for every method and the CLI."""
    out = str(tmp_path_factory.mktemp("sharded"))
    with socket.socket() as sock:  # a free port (torchrun's --master_port 0 does not work with gloo here)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), WORKER, out, tiny_teacher_dir, str(small_text_file)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=1e-12, atol=1e-14, msg=f"{what}: {n}")


def test_lrc_plan_puts_each_block_with_its_projections():
    loop = LOOPS["lrc"](1)
    plan = lrc_plan(loop.model)
    assert [u.name for u in plan] == ["top", "layer0", "layer1"]
    names = [n for u in plan for n in u.params]
    assert sorted(names) == sorted(n for n, _ in loop.model.named_parameters())  # each exactly once
    for i in (0, 1):
        u = plan[i + 1]
        assert u.modules == (f"teacher:model.layers.{i}",)
        assert set(u.params) == {f"proj.layer{i}_{s}" for s in ("q", "k", "v", "o", "gate", "up", "down")} | \
            {f"norms.model__layers__{i}__{n}__weight" for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(plan[0].params) == {"proj.emb", "norms.model__norm__weight"}
    assert set(plan[0].modules) == {"teacher:model.embed_tokens", "teacher:model.norm", "teacher:lm_head"}


def test_distiller_plan_shards_both_models_block_by_block():
    loop = LOOPS["swap"](1)
    plan = distiller_plan(loop)
    assert [u.name for u in plan] == ["teacher", "teacher:model.layers.0", "teacher:model.layers.1",
                                      "student", "student:model.layers.0", "student:model.layers.1"]
    assert all(not u.params for u in plan[:3])  # the teacher trains nothing
    ids = {id(p) for p in loop.params}
    trained = [n for n, p in loop.student.named_parameters() if id(p) in ids]
    assert sorted(n for u in plan for n in u.params) == sorted(trained)
    assert all(n.startswith("model.layers.1.") for n in plan[5].params) and len(plan[5].params) == 14


def test_skeleton_teacher_has_meta_parameters_and_the_real_buffers(tiny_teacher_dir):
    from torch import nn

    from lrkd_fast.recipes import load_teacher
    from lrkd_fast.sharding import parameters_on_meta

    real, _ = load_teacher(tiny_teacher_dir, "cpu")
    skeleton, tok = load_teacher(tiny_teacher_dir, "cpu", skeleton_dtype=torch.float64)
    assert tok is not None
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in real.named_parameters()]
    assert all(p.is_meta and p.dtype == torch.float64 for p in skeleton.parameters())
    bufs = dict(real.named_buffers())
    assert bufs and {n: b for n, b in skeleton.named_buffers()}.keys() == bufs.keys()
    for n, b in skeleton.named_buffers():
        assert not b.is_meta and torch.equal(b, bufs[n]), n
    register = nn.Module.register_parameter
    with pytest.raises(RuntimeError, match="boom"), parameters_on_meta():
        raise RuntimeError("boom")
    assert nn.Module.register_parameter is register and not nn.Linear(2, 2).weight.is_meta


def test_shard_training_needs_torch_distributed():
    with pytest.raises(ValueError, match="torchrun"):
        shard_training(LOOPS["lrc"](1))
    with pytest.raises(TypeError, match="loop must be a TrainingLoop"):
        shard_training(object())


@pytest.mark.parametrize("method", list(LOOPS))
def test_sharded_step_equals_single_process_step(sharded_runs, method):
    got = torch.load(os.path.join(sharded_runs, f"{method}.pt"))
    with set_backend("eager"):
        ref = gradients(LOOPS[method](1), batch())  # one process, the whole batch
        single = LOOPS[method](1)
        single.train([batch()])
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(got["norm"], ref["norm"], rtol=1e-12, atol=0)  # the clipping norm over the shards
    _close(got["grads"], ref["grads"], "gradient")
    _close(got["step1"], trained_state(single), "parameters after the step")
    # every trainable parameter was sharded: the processes held disjoint parts of its rows
    full = trained_state(single)
    for n in full:
        rows = [shapes[n][0] for shapes in got["local_shapes"]]
        assert sum(rows) == full[n].shape[0] and max(rows) < full[n].shape[0], (n, rows)


@pytest.mark.parametrize("method", ["lrc", "swap"])
def test_sharded_checkpoint_round_trip(sharded_runs, method):
    path = os.path.join(sharded_runs, method, "last.pt")
    state = read_checkpoint(path)
    assert is_sharded_checkpoint(state) and state["params"] == {} and state["sharded"]["world_size"] == 2
    shards = os.path.join(sharded_runs, method, state["sharded"]["dir"])
    assert sorted(os.path.basename(f) for f in glob.glob(os.path.join(shards, "*.distcp"))) == \
        ["__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shard
    got = torch.load(os.path.join(sharded_runs, f"{method}.pt"))
    with set_backend("eager"):
        fresh = LOOPS[method](1, init_seed=9)
        load_sharded_parameters(fresh.model, state)  # 2 processes' shards read by 1
        _close(trained_state(fresh), got["step1"], "parameters read back")
        continuous = LOOPS[method](2)
        continuous.train([batch()])
        resumed = LOOPS[method](2, init_seed=7)  # optimizer state and schedule come from the shards too
        history = resumed.train([batch()], resume_from=path)
    assert history["step"] == [0, 1]
    _close(trained_state(resumed), trained_state(continuous), "resumed in 1 process")
    _close(got["resumed_step2"], trained_state(continuous), "resumed in 2 processes")


def test_sharded_checkpoint_that_does_not_fit_is_refused(sharded_runs, tmp_path):
    state = read_checkpoint(os.path.join(sharded_runs, "lrc", "last.pt"))
    with set_backend("eager"):
        other = LOOPS["swap"](1)
        with pytest.raises(CheckpointError, match="does not fit this model"):
            load_sharded_parameters(other.model, state)
        with pytest.raises(CheckpointError, match="does not fit this student"):
            other.train([batch()], resume_from=state)
    moved = dict(state, path=str(tmp_path / "last.pt"))  # the file without its shard folder beside it
    with pytest.raises(CheckpointError, match="shards .* are missing"):
        load_sharded_parameters(LOOPS["lrc"](1).model, moved)


def test_clone_sharded_from_rank0_equals_the_unsharded_clone(sharded_runs):
    """Rank 1 never held the teacher's weights (it built it on the meta device) and holds half of every
    teacher weight's rows after sharding; the pca init, the teacher's embeddings and the student computed
    through the sharded teacher, and a step on the halves, equal one process's with the whole teacher."""
    from lrkd_fast.clone import LowRankClone, LRCTrainer
    from lrkd_fast.evaluate import sentence_embeddings
    from lrkd_fast.training import TrainConfig

    got = torch.load(os.path.join(sharded_runs, "from_rank0.pt"))
    assert [r["meta_before"] for r in got["ranks"]] == [False, True]
    with set_backend("eager"):
        t = teacher()
        clone = LowRankClone.from_teacher(t, 16, init="pca", calibration=calibration())
        emb = sentence_embeddings(t, [batch()])
        start = {n: w.clone() for n, w in clone.student_state_dict().items()}
        LRCTrainer(clone, TrainConfig(steps=1, **STEP)).train([batch()])
        step1 = clone.student_state_dict()
    for n, p in t.named_parameters():
        rows = [r["teacher_rows"][n][0] for r in got["ranks"]]
        assert sum(rows) == p.shape[0] and max(rows) < p.shape[0], (n, rows)
    torch.testing.assert_close(got["embeddings"], emb, rtol=1e-12, atol=1e-14)
    _close(got["start"], start, "pca start through the sharded teacher")
    _close(got["step1"], step1, "student after one step")
    exported = got["exported"]
    _close({n: exported[n] for n in step1}, dict(step1), "exported student")


def test_cli_fsdp_run_resumes_in_one_process(sharded_runs, tiny_teacher_dir, small_text_file, capsys):
    from lrkd_fast.cli import main

    out = os.path.join(sharded_runs, "cli")  # lrkd-fast distill --method lrc --fsdp, 2 processes, 2 steps
    assert os.path.isfile(os.path.join(out, "config.json"))
    state = read_checkpoint(os.path.join(out, "checkpoints", "last.pt"))
    assert state["step"] == 2 and state["sharded"]["world_size"] == 2
    with set_backend("eager"):
        assert main(CLI_ARGS + ["--teacher", tiny_teacher_dir, "--data", str(small_text_file), "--steps", "3",
                                "--output", out, "--resume", os.path.join(out, "checkpoints", "last.pt")]) == 0
    printed = capsys.readouterr().out
    assert "LRC start (resumed at step 2)" in printed and "LRC trained (3 steps)" in printed, printed
    # resumed by 2 processes, the checkpoint's shards read into new shards: the same start
    with open(os.path.join(sharded_runs, "cli-resumed.txt")) as f:
        sharded = f.read()
    def start(text):  # the start row without its stage time
        return [ln.rsplit(maxsplit=1)[0] for ln in text.splitlines() if ln.startswith("LRC start")]

    assert start(printed) and start(printed) == start(sharded), sharded
    assert "LRC trained (3 steps)" in sharded
    assert not os.path.exists(os.path.join(out, "checkpoints"))  # the checkpoint went with its shard folder
    # one process has nothing to shard across; the swap recipe does not shard
    assert main(CLI_ARGS + ["--fsdp", "--teacher", tiny_teacher_dir, "--steps", "1", "--output", out + "-1"]) == 2
    assert "argument --fsdp: shards across the processes of torchrun" in capsys.readouterr().err
    assert main(["distill", "--fsdp", "--teacher", tiny_teacher_dir, "--output", out + "-2"]) == 2
    assert "argument --fsdp: is for --method lrc" in capsys.readouterr().err


def test_plain_ddp_time_cap_stops_every_process_together(sharded_runs):
    """A time cap reached by one process stops all of them at the same step (else the others wait in
    the next step's gradient all-reduce for good)."""
    per_rank = torch.load(os.path.join(sharded_runs, "ddp_time_cap.pt"))
    for method in ("lrc", "swap"):
        (steps0, early0), (steps1, early1) = (r[method] for r in per_rank)
        assert steps0 == steps1 and 1 <= steps0 < 500 and early0 and early1, (method, per_rank)
