"""torchrun worker for tests/test_swap.py::test_sensitivity_ranks_and_initial_factors_agree_across_processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/swap_ddp_worker.py OUT_DIR

Each process calibrates the same tiny BERT on different text, so its own sensitivity measurement
gives different ranks. It swaps once alone (before joining the group) and once inside the group;
then it distills the group's student for one step. Rank 0 writes every process's ranks from both
swaps and the student's factors before and after that step.
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers as tf

from lrkd_fast import DistillConfig, Distiller, LowRankConfig, swap_linear_layers


def main(out_dir):
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    model = tf.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 96, (4, 12), generator=g)
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    config = LowRankConfig(rank=0.4, init="whitened", allocation="sensitivity")

    def swapped():
        student = copy.deepcopy(model)
        rep = swap_linear_layers(student, config, calibration=calib, progress=False)
        return student, [l.rank for l in rep.layers]

    alone = swapped()[1]
    dist.init_process_group("gloo")
    student, together = swapped()
    factor = lambda: student.encoder.layer[1].output.dense.U.detach().flatten()[:8].tolist()
    before = factor()  # calibrated on this process's own text
    d = Distiller(student, model, DistillConfig(steps=1, progress=False))
    d.train(calib)
    d.close()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"alone": alone, "together": together, "before": before, "after": factor()})
    if rank == 0:
        with open(os.path.join(out_dir, "ranks.json"), "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
