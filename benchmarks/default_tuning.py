"""The default run's settings against its held-out quality, from one calibrated start.

The default ``lrkd-fast distill`` (all-MiniLM-L6-v2 at half its encoder's linear parameters) is
prepared once: the built-in split, the teacher, the swapped and calibrated student. Each arm then
trains a copy of that start with its own learning rate, steps and training text, and is measured on
the default table's two held-out sets (512 pydoc sentences, 512 standard-library sentences never
trained on) every ``--eval-every`` steps and at the end::

    python -m benchmarks.default_tuning --arms lr=3e-4 lr=1e-3 --out benchmarks/results/default_tuning
    python -m benchmarks.default_tuning --arms lr=1e-3,steps=2000,text=all --out DIR
    python -m benchmarks.default_tuning --arms text=pydoc text=pydoc4 --out DIR

An arm is ``key=value`` pairs joined by commas: ``lr``, ``steps``, ``batch``, ``text`` (``all``:
the whole training split once, ``pydoc``: its pydoc sentences alone, ``pydocK``: the whole split with
its pydoc sentences K times, as ``pydoc_repeats=K`` gives it; ``N``: the pydoc sentences plus a fixed
random N of the others), ``opt`` (``whitened`` or ``adamw``) and ``whiten`` (the most inputs of a
whitened layer; 0: no limit).
Unnamed keys take the default run's values. Writes ``default_tuning.csv`` (one row per measurement),
``default_tuning.png`` (held-out fidelity against steps, one line per arm) and a README with the
final table, the command and the machine.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import os
import random
import sys
import tempfile
import time

import torch

from .corpus_size import fidelity_cells, fidelity_columns, write_readme

FIELDS = ["arm", "lr", "steps", "batch", "text", "opt", "whiten", "train_texts", "step", "train_s", "pydoc_mean_cos",
          "pydoc_spearman", "pydoc_nn_agree", "stdlib_mean_cos", "stdlib_spearman"]
KEYS = ("lr", "steps", "batch", "text", "opt", "whiten")


def parse_arm(spec: str, defaults: dict) -> dict:
    """``"lr=1e-3,steps=2000"`` -> the arm's settings (the others from ``defaults``)."""
    arm = dict(defaults)
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in KEYS or not value:
            raise ValueError(f"arm {spec!r}: each part must be key=value with key one of {KEYS}, got {part!r}")
        arm[key] = value if key in ("text", "opt") else (float(value) if key == "lr" else int(value))
    text = arm["text"]
    if not (text in ("all", "pydoc") or (text.startswith("pydoc") and text[5:].isdigit()) or text.isdigit()):
        raise ValueError(f"arm {spec!r}: text must be all, pydoc, pydocK or a number of texts, got {text!r}")
    if arm["lr"] <= 0 or arm["steps"] < 1 or arm["batch"] < 1 or arm["whiten"] < 0:
        raise ValueError(f"arm {spec!r}: lr must be > 0, steps and batch >= 1, whiten >= 0")
    if arm["opt"] not in ("whitened", "adamw"):
        raise ValueError(f"arm {spec!r}: opt must be whitened or adamw, got {arm['opt']!r}")
    arm["name"] = spec or "default"
    return arm


def training_texts(train: list, n_pydoc: int, text: str, seed: int = 0) -> list:
    """The arm's training texts from the split's ``train`` (its first ``n_pydoc`` are pydoc's)."""
    pydoc, rest = train[:n_pydoc], train[n_pydoc:]
    if text == "all":
        return list(train)
    if text == "pydoc":
        return list(pydoc)
    if text.startswith("pydoc"):  # ordered as lrkd_fast.data.builtin_split orders it: the same shuffles
        return pydoc + rest + pydoc * (int(text[5:]) - 1)
    keep = sorted(random.Random(seed).sample(range(len(rest)), min(len(rest), int(text) - n_pydoc)))
    return pydoc + [rest[i] for i in keep]


def calibrated_start(recipe):
    """What the default run builds before training: (prepared run, student at its start)."""
    from lrkd_fast.recipes.base import prepare
    from lrkd_fast.recipes.swap import swapped_student

    pre = prepare(recipe)
    return pre, swapped_student(pre, recipe)[0]


def measure(pre, student) -> dict:
    from lrkd_fast.evaluate import embedding_fidelity, sentence_embeddings

    with torch.no_grad():
        m = pre.measure(lambda batches, t_emb: embedding_fidelity(sentence_embeddings(student, batches), t_emb))
    return fidelity_columns(m["fidelity"], m["other"])


def run_arm(pre, start, arm: dict, eval_every: int, recipe, progress: bool = True) -> list:
    """Train a copy of ``start`` as ``arm`` says; one row per measurement (step 0, every ``eval_every``, the end)."""
    from lrkd_fast.data import TextBatches
    from lrkd_fast.distillation import Distiller
    from lrkd_fast.recipes.swap import swap_distill_config

    texts = training_texts(pre.train, pre.result.train_counts["pydoc"], arm["text"], seed=recipe.seed)
    student = copy.deepcopy(start)
    base = {k: arm[k] for k in ("name", "lr", "steps", "batch", "text", "opt", "whiten")}
    base = {"arm": base.pop("name"), **base, "train_texts": len(texts)}
    rows = [{**base, "step": 0, "train_s": 0.0, **measure(pre, student)}]
    cfg = dataclasses.replace(swap_distill_config(recipe), steps=arm["steps"], lr=arm["lr"], checkpoint_dir=None,
                              progress=progress, optimizer=arm["opt"], whiten_max_features=arm["whiten"] or None)
    d = Distiller(student, pre.teacher, cfg)
    clock = {"train": 0.0, "since": time.time()}

    def on_step(step, parts):  # step counts from 0: step + 1 steps are done
        if (step + 1) % eval_every == 0 and step + 1 < arm["steps"]:
            clock["train"] += time.time() - clock["since"]
            rows.append({**base, "step": step + 1, "train_s": round(clock["train"], 1), **measure(pre, student)})
            d._s_catch.pop()  # the measuring forwards were caught by the loss hooks too
            clock["since"] = time.time()

    try:
        d.train(TextBatches(texts, pre.tok, arm["batch"], recipe.seq_len, seed=recipe.seed), on_step=on_step)
    finally:
        d.close()
    clock["train"] += time.time() - clock["since"]
    rows.append({**base, "step": arm["steps"], "train_s": round(clock["train"], 1), **measure(pre, student)})
    return rows


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in ((axes[0], "pydoc_mean_cos", "pydoc held-out"), (axes[1], "stdlib_mean_cos",
                                                                             "standard library (never trained on)")):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            pts = [(r["step"], r[key]) for r in rows if r["arm"] == arm]
            ax.plot(*zip(*pts), marker="o", label=arm)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean cosine to the teacher")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list, out: str, command: str, setup_s: float) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "default_tuning.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(out, "default_tuning.png"))
    finals = [r for i, r in enumerate(rows) if i + 1 == len(rows) or rows[i + 1]["arm"] != r["arm"]]
    write_readme(out, "The default run's settings and its held-out quality", command,
                 f"One start for every arm: the default run's split, teacher and calibrated low-rank student (built "
                 f"in {setup_s:.0f} s). Held-out sets: 512 pydoc sentences and 512 standard-library docstring sentences "
                 "never trained on; Spearman: rank correlation of teacher and student cosine similarities over all "
                 "pairs. `train s`: training time without the measurements.",
                 ["arm", "training texts", "steps", "train s"],
                 [f"| {r['arm']} | {r['train_texts']:,} | {r['step']} | {r['train_s']:.0f} | {fidelity_cells(r)}"
                  for r in finals], figure="![held-out fidelity against steps](default_tuning.png)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=["lr=3e-4"], help="key=value,... per arm (see the module doc)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out measurements")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--calib-texts", type=int, default=None, help="(default: the default run's)")
    p.add_argument("--out", default="runs/default_tuning")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.eval_every < 1:
        p.error(f"--eval-every must be >= 1, got {a.eval_every}")
    from lrkd_fast.recipes import SwapRecipe

    with tempfile.TemporaryDirectory() as tmp:
        extra = {} if a.calib_texts is None else {"calib_texts": a.calib_texts}
        # the split's distinct texts; each arm repeats the pydoc ones itself
        recipe = SwapRecipe(teacher=a.teacher, output=os.path.join(tmp, "s"), progress=not a.quiet, pydoc_repeats=1,
                            **extra)
        defaults = {"lr": recipe.lr, "steps": recipe.steps, "batch": recipe.batch_size,
                    "text": f"pydoc{SwapRecipe.DEFAULT_PYDOC_REPEATS}", "opt": recipe.optimizer,
                    "whiten": recipe.whiten_max_features or 0}
        try:
            arms = [parse_arm(s, defaults) for s in a.arms]
        except ValueError as exc:
            p.error(str(exc))
        t0 = time.time()
        pre, start = calibrated_start(recipe)
        setup = time.time() - t0
        command = "python -m benchmarks.default_tuning " + " ".join(argv if argv is not None else sys.argv[1:])
        rows = []
        for arm in arms:
            rows += run_arm(pre, start, arm, a.eval_every, recipe, progress=not a.quiet)
            print(rows[-1], flush=True)
            write(rows, a.out, command, setup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
