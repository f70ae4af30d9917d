"""lrkd_fast.hf_trainer: both methods trained with transformers.Trainer take the package loop's steps
(same loss at step 0, same parameters after each step; float64, tiny Llama), and docs/trainer.md runs."""
import copy
import re
from pathlib import Path

import pytest
import torch
import transformers as tf

from lrkd_fast import DistillConfig, Distiller, LowRankConfig, set_backend, swap_linear_layers
from lrkd_fast.clone import LowRankClone, LRCTrainer
from lrkd_fast.hf_trainer import DistillationTrainer
from lrkd_fast.training import TrainConfig

STEPS, LR = 3, 5e-3
# the same optimizer both ways: AdamW, constant learning rate, no warm-up, clipping at 1, no weight decay
LOOP = dict(steps=STEPS, lr=LR, warmup=0.0, schedule="constant", max_grad_norm=1.0, progress=False)


def teacher():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(cfg).double().eval()


def rows():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (4, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    return [{"input_ids": i, "attention_mask": m, "labels": i} for i, m in zip(ids, mask)]


def as_batch(examples):
    return {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask")}


def swap_method():
    t = teacher()
    student = copy.deepcopy(t)
    torch.manual_seed(1)
    swap_linear_layers(student, LowRankConfig(rank=8, init="random"), progress=False)
    return Distiller(student, t, DistillConfig(teacher_cache=False, autocast="off", **LOOP))


def lrc_method():
    t = teacher()
    torch.manual_seed(1)
    return LRCTrainer(LowRankClone.from_teacher(t, 16), TrainConfig(**LOOP))


def trained(loop):
    ids = {id(p) for p in loop.params}
    return {n: p.detach().clone() for n, p in loop.model.named_parameters() if id(p) in ids}


class Record(tf.TrainerCallback):
    def __init__(self):
        self.trainer, self.losses = None, []

    def on_step_end(self, args, state, control, **kw):
        self.losses.append(self.trainer.last_parts["loss"])


@pytest.mark.parametrize("make", [swap_method, lrc_method], ids=["swap", "lrc"])
def test_trainer_takes_the_package_loops_steps(make, tmp_path):
    data = rows()  # one batch: every step of both runs sees these four rows
    with set_backend("eager"):
        ours = make()
        history = ours.train([as_batch(data)])
        loop = make()
        method = loop if isinstance(loop, Distiller) else loop.model
        args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
                                    learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                                    max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                                    use_cpu=True, disable_tqdm=True, seed=0, train_sampling_strategy="sequential")
        rec = Record()
        trainer = DistillationTrainer(method, args, train_dataset=data, data_collator=tf.default_data_collator,
                                      callbacks=[rec])
        rec.trainer = trainer
        start = trained(loop)
        out = trainer.train()
    assert out.global_step == STEPS
    # step 0: same parameters, same batch -> the same loss
    assert rec.losses[0] == pytest.approx(history["loss"][0], rel=1e-12, abs=0)
    assert rec.losses == pytest.approx(history["loss"], rel=1e-10, abs=0)
    assert rec.losses[-1] < rec.losses[0]
    got, want = trained(loop), trained(ours)
    for n in want:
        assert not torch.equal(got[n], start[n]), n  # it trained
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)


def test_trainer_refuses_what_it_cannot_train(tmp_path):
    args = tf.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="method must be a Distiller or a LowRankClone"):
        DistillationTrainer(teacher(), args)
    with pytest.raises(TypeError, match="takes no model"):
        DistillationTrainer(swap_method(), args, model=teacher())
    with pytest.raises(ValueError, match="inputs must be a mapping"):
        DistillationTrainer(swap_method(), args).compute_loss(None, [1, 2])
    whitened = swap_method()
    whitened.cfg.optimizer = "whitened"
    with pytest.raises(ValueError, match=r"optimizer='whitened'\) is for Distiller.train.*optimizers="):
        DistillationTrainer(whitened, args)
    from lrkd_fast.optim import WhitenedAdamW

    opt = WhitenedAdamW(whitened.params, whitened.whitening_bases([as_batch(rows()[:2])]), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    assert DistillationTrainer(whitened, args, optimizers=(opt, sched)).optimizer is opt


def test_docs_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks, "docs/trainer.md lost its example"
    monkeypatch.chdir(tmp_path)
    with set_backend("eager"):
        for code in blocks:
            exec(compile(code, "docs/trainer.md", "exec"), {"__name__": "__docs__"})
