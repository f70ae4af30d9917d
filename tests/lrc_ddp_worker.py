"""torchrun worker for tests/test_lrc.py::test_ddp_matches_single_process.

    python -m torch.distributed.run --nproc_per_node 2 tests/lrc_ddp_worker.py OUT_DIR

Each of 2 gloo processes takes its half of one batch, computes the LRC loss and backward, and the
gradients are averaged as TrainingLoop does (lrkd_fast.training.average_gradients). Rank 0 also
computes the single-process result on the concatenated batch and writes both. Halves have the same
number of real tokens and clone terms are per-block means, so the mean over ranks equals the full
batch's loss (KD uses batchmean over 2 texts per rank = the full batch's per-text mean).
"""
import os
import sys

import torch
import torch.distributed as dist
import transformers as tf

from lrkd_fast import set_backend
from lrkd_fast.clone import LowRankClone
from lrkd_fast.training import average_gradients


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    teacher = tf.AutoModelForCausalLM.from_config(cfg).eval()
    torch.manual_seed(1)
    clone = LowRankClone.from_teacher(teacher, 16)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2 * world, 8), generator=g)
    am = torch.ones_like(ids)
    with set_backend("eager"):
        shard = slice(2 * rank, 2 * rank + 2)
        out = clone(ids[shard], attention_mask=am[shard])
        out.loss.backward()
        params = list(clone.parameters())
        average_gradients(params)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        loss /= world
        if rank == 0:
            torch.save({"loss": loss, "grads": {n: p.grad.clone() for n, p in clone.named_parameters()}},
                       os.path.join(out_dir, "rank0.pt"))
            for p in params:
                p.grad = None
            full = clone(ids, attention_mask=am)
            full.loss.backward()
            torch.save({"loss": full.loss.detach(), "grads": {n: p.grad.clone() for n, p in clone.named_parameters()}},
                       os.path.join(out_dir, "single.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
