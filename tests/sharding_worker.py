"""torchrun worker for tests/test_sharding.py: FSDP2 sharding (lrkd_fast.sharding) on 2 gloo processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/sharding_worker.py OUT_DIR TEACHER_DIR TEXT_FILE

For each method (Low-Rank Clone and swap distillation, tiny Llama teachers in float64) every process
builds the same teacher and student, shards the training loop with FSDP2 and trains one step on its
half of one batch, writing the sharded checkpoint ``OUT_DIR/<method>/last.pt`` (through
torch.distributed.checkpoint, each process its own shard). The weights are gathered back
(ShardedTraining.unshard) and rank 0 writes them. Then a fresh student (another init) is sharded,
resumed from that checkpoint for a second step on the same half, and written the same way. The test
compares both with single-process runs on the whole batch, and resumes the checkpoint in one process.
Then plain DDP runs (no sharding) of both methods under a time cap that only rank 0 reaches write
how many steps each process ran (OUT_DIR/ddp_time_cap.pt).
A Low-Rank Clone sharded from rank 0's teacher (the other process built it on the meta device) writes
its pca start, teacher embeddings and first step to OUT_DIR/from_rank0.pt.
Last, in the same process group, ``lrkd-fast distill --method lrc --fsdp --init pca`` runs 2 steps on the
tiny BERT TEACHER_DIR and TEXT_FILE into OUT_DIR/cli (CLI_ARGS): its teacher is read by rank 0 alone.
A copy of it is resumed by the 2 processes for a third step (OUT_DIR/cli-resumed, its table in
OUT_DIR/cli-resumed.txt).
"""
import contextlib
import copy
import io
import os
import shutil
import sys

import torch
import transformers as tf

from lrkd_fast import DistillConfig, Distiller, LowRankConfig, set_backend, swap_linear_layers
from lrkd_fast.clone import LowRankClone, LRCTrainer
from lrkd_fast.training import TrainConfig

VOCAB, ROWS, SEQ = 97, 4, 8
# an active clipping norm: the step also checks the gradient norm over the shards
STEP = dict(lr=5e-3, warmup=0.0, schedule="constant", max_grad_norm=0.05, progress=False)


def teacher_config():
    return tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)


def teacher():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(teacher_config()).double().eval()


def calibration():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, ROWS, SEQ), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def from_rank0_run(mine, rank: int) -> dict:
    """A Low-Rank Clone sharded from rank 0's teacher (shard_training(..., from_rank0=True)): every other
    process builds the teacher with its parameters on the meta device. The pca init, the teacher's
    embeddings and the student's weights go through the sharded teacher; then one step on this process's
    half of the batch."""
    from lrkd_fast.evaluate import sentence_embeddings
    from lrkd_fast.sharding import parameters_on_meta, shard_training

    if rank == 0:
        t = teacher()
    else:
        with parameters_on_meta():
            t = tf.LlamaForCausalLM(teacher_config()).double().eval()
    on_meta = all(p.is_meta for p in t.parameters())
    clone = LowRankClone.from_teacher(t, 16, init="random")
    loop = LRCTrainer(clone, TrainConfig(steps=1, **STEP))
    sharding = shard_training(loop, from_rank0=True)
    sharding.pca_init(calibration())
    with sharding.teacher_forward():
        emb = sentence_embeddings(t, [batch()])
    start = sharding.student_state_dict()
    teacher_rows = {n: tuple(p.to_local().shape) for n, p in t.named_parameters()}
    loop.train([mine])
    return {"meta_before": on_meta, "embeddings": emb, "start": start, "step1": sharding.student_state_dict(),
            "exported": dict(sharding.export_student().state_dict()), "teacher_rows": teacher_rows}


def batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def half(b, rank, world):
    """Process ``rank``'s rows: halves have the same number of real tokens, so the mean of the halves'
    losses (every term is a per-token or per-text mean) is the whole batch's."""
    n = ROWS // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in b.items()}


def lrc_loop(steps, checkpoint_dir=None, init_seed=1, cfg_kw=None, **clone_kw):
    t = teacher()
    torch.manual_seed(init_seed)
    clone = LowRankClone.from_teacher(t, 16, **clone_kw)
    return LRCTrainer(clone, TrainConfig(steps=steps, checkpoint_dir=checkpoint_dir, **STEP, **(cfg_kw or {})))


def lrc_recompute_loop(steps, checkpoint_dir=None, init_seed=1):
    """Gradient checkpointing with the teacher weights fed to the student modules as they are (factorized
    order) and the teacher-width attention term: the student block is recomputed in backward, inside
    its FSDP unit's gathered weights."""
    return lrc_loop(steps, checkpoint_dir, init_seed, gradient_checkpointing=True, association="factorized",
                    attn_clone="teacher")


def swap_loop(steps, checkpoint_dir=None, init_seed=1, cfg_kw=None):
    t = teacher()
    student = copy.deepcopy(t)
    torch.manual_seed(init_seed)
    swap_linear_layers(student, LowRankConfig(rank=8, init="random"), progress=False)
    # clone_normalize off: its weights are each batch's own statistics, which differ between halves
    cfg = DistillConfig(steps=steps, checkpoint_dir=checkpoint_dir, clone_normalize=False, teacher_cache=False,
                        autocast="off", **STEP, **(cfg_kw or {}))
    return Distiller(student, t, cfg)


CLI_ARGS = ["distill", "--method", "lrc", "--device", "cpu", "--student-hidden", "16", "--init", "random",
            "--batch-size", "4", "--seq-len", "16", "--heldout", "8", "--calib-texts", "8", "--checkpoint-minutes", "0",
            "--save-worse", "--quiet"]

LOOPS = {"lrc": lrc_loop, "lrc_recompute": lrc_recompute_loop, "swap": swap_loop}


def gradients(loop, b) -> dict:
    """Loss, gradient norm (as the loop clips with it) and gradients of ``loop`` on batch ``b``; a sharded
    loop's are gathered over the processes (its loss: the mean of theirs)."""
    from torch.distributed.tensor import DTensor

    loss, _ = loop.compute_loss(b)
    loss.backward()
    norm = loop._grad_norm()
    grads = {}
    names = loop.sharding.named_parameters() if loop.sharding is not None else \
        {n: p for n, p in loop.model.named_parameters() if p.requires_grad}
    for n, p in names.items():
        grads[n] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        p.grad = None
    loss = loss.detach().clone()
    if loop.sharding is not None:
        import torch.distributed as dist

        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return {"loss": loss, "norm": norm.detach().clone(), "grads": grads}


def trained_state(loop) -> dict:
    ids = {id(p) for p in loop.params}
    return {n: p.detach().clone() for n, p in loop.model.named_parameters() if id(p) in ids}


def main(out_dir, teacher_dir, text_file):
    import torch.distributed as dist

    from lrkd_fast.sharding import shard_training

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = half(batch(), rank, world)
    with set_backend("eager"):
        for method, make in LOOPS.items():
            ckpt = os.path.join(out_dir, method)
            loop = make(1, ckpt)
            sharding = shard_training(loop)
            shapes = {n: tuple(p.to_local().shape) for n, p in sharding.named_parameters().items()}
            grads = gradients(loop, mine)
            loop.train([mine])
            sharding.unshard()
            step1 = trained_state(loop)
            resumed = make(2, os.path.join(out_dir, method + "-resumed"), init_seed=5)
            again = shard_training(resumed)
            resumed.train([mine], resume_from=os.path.join(ckpt, "last.pt"))
            again.unshard()
            gathered = [None] * world
            dist.all_gather_object(gathered, shapes)
            if rank == 0:
                torch.save({"step1": step1, "resumed_step2": trained_state(resumed), "local_shapes": gathered,
                            **grads},
                           os.path.join(out_dir, f"{method}.pt"))
            dist.barrier()
        got = from_rank0_run(mine, rank)
        gathered = [None] * world
        dist.all_gather_object(gathered, {k: got[k] for k in ("meta_before", "teacher_rows")})
        if rank == 0:
            torch.save(dict(got, ranks=gathered), os.path.join(out_dir, "from_rank0.pt"))
    # plain DDP under a time cap that only rank 0 reaches: every process must stop at rank 0's step
    stops = {}
    for method in ("lrc", "swap"):
        loop = LOOPS[method](500, cfg_kw={"max_minutes": 0.002 if rank == 0 else 60.0})
        hist = loop.train([mine])
        stops[method] = (len(hist["step"]), hist["stopped_early"])
    gathered = [None] * world
    dist.all_gather_object(gathered, stops)
    if rank == 0:
        torch.save(gathered, os.path.join(out_dir, "ddp_time_cap.pt"))
    from lrkd_fast.cli import main as cli

    assert cli(CLI_ARGS + ["--fsdp", "--init", "pca", "--teacher", teacher_dir, "--data", text_file, "--steps", "2",
                           "--keep-checkpoints", "--output", os.path.join(out_dir, "cli")]) == 0
    # the same run resumed by 2 processes from its sharded checkpoint (a copy: the test resumes the original in 1)
    again = os.path.join(out_dir, "cli-resumed")
    if rank == 0:
        shutil.copytree(os.path.join(out_dir, "cli"), again)
    dist.barrier()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli(CLI_ARGS + ["--fsdp", "--init", "pca", "--teacher", teacher_dir, "--data", text_file, "--steps", "3",
                               "--output", again, "--resume", os.path.join(again, "checkpoints", "last.pt")]) == 0
    if rank == 0:
        with open(os.path.join(out_dir, "cli-resumed.txt"), "w") as f:
            f.write(printed.getvalue())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
