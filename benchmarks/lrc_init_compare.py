"""Low-Rank Clone: the paper's random init against the data-informed "pca" init (issue 6).

::

    python -m benchmarks.lrc_init_compare            # default settings, ~6 minutes on 2 shared CPU cores
    python -m benchmarks.lrc_init_compare --quick    # smoke test, seconds
    python -m benchmarks.lrc_init_compare --steps N --out DIR

Task. Clone the packaged all-MiniLM-L6-v2 (BERT, hidden 384) into a hidden-256 student with
:class:`lrkd_fast.clone.LowRankClone` on CPython's pydoc sentences, once per init, with everything
else equal: the same seed, the same held-out split, the same training batches in the same order,
the same steps, learning rate and schedule. The "pca" init additionally reads ``calib_texts``
training texts (teacher forward only) to find the principal directions of the teacher's hidden
states; that time is reported as the init time.

Measurements (one CSV row per init and step; ``step`` = optimizer updates done so far):

* ``loss`` and its parts (``embed`` = 1 - cos of the pooled output, ``clone`` = the sum over layers
  of the clone terms, ``clone_<site>`` = their per-layer means) on the training batch of that step,
  before its update. The clone loss is NOT a scale-free number: its output-side targets are the
  teacher's outputs projected by the trainable P (o_T @ P_o), so a P with small entries makes those
  targets small. Loss curves of the two inits are therefore not a clean comparison of quality.
* at ``eval_at`` steps (default: 0, half-way and the end), held-out fidelity as in
  :func:`lrkd_fast.clone.readout_fidelity` (the recipe's measure): a ridge read-out student -> teacher
  embedding fitted on ``fit_texts`` training texts, applied to the held-out texts; mean / min cosine
  to the teacher's embeddings and nearest-neighbour agreement. This is the scale-free quality
  measure. Also the LRC loss on the held-out texts (``heldout_loss``, same caveat as ``loss``).

Outputs in ``--out``: ``lrc_init_compare.csv``, ``lrc_init_compare.png`` (loss vs step, log y; held-out
metric bars at the start and the end) and ``summary.json`` (settings, timings, the summary numbers).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

PART_FIELDS = ["loss", "embed", "clone", "clone_q", "clone_k", "clone_v", "clone_up", "clone_o", "clone_down"]
EVAL_FIELDS = ["heldout_loss", "heldout_mean_cos", "heldout_min_cos", "heldout_nn_agree"]
CSV_FIELDS = ["init", "step"] + PART_FIELDS + EVAL_FIELDS


@dataclass
class CompareConfig:
    """Settings of one comparison; every init gets exactly these."""

    inits: tuple = ("random", "pca")
    teacher: Optional[str] = None  # None = the packaged all-MiniLM-L6-v2
    student_hidden: int = 256
    steps: int = 120
    lr: float = 1e-3  # the recipe's default (LRCRecipe.lr)
    batch_size: int = 16
    seq_len: int = 64
    alpha: float = 0.2
    heldout: int = 256
    fit_texts: int = 256  # training texts the read-out is fitted on
    calib_texts: int = 128  # training texts the pca init reads
    train_texts: Optional[int] = None  # cap on the training texts (None = all but the held-out ones)
    eval_at: Optional[tuple] = None  # steps with held-out metrics; None = 0, half-way, end
    seed: int = 0
    init_std: float = 0.02  # the paper's N(0, 0.02) for init="random"

    def __post_init__(self):
        self.inits = tuple(self.inits)
        if not self.inits:
            raise ValueError("inits is empty")
        for name in ("student_hidden", "steps", "batch_size", "seq_len", "heldout", "fit_texts", "calib_texts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.eval_at is None:
            self.eval_at = tuple(sorted({0, self.steps // 2, self.steps}))  # one evaluation costs ~15 training steps
        else:
            self.eval_at = tuple(sorted(set(int(s) for s in self.eval_at) | {0, self.steps}))
        if any(s < 0 or s > self.steps for s in self.eval_at):
            raise ValueError(f"eval_at steps must lie in 0..{self.steps}, got {self.eval_at}")


def quick_config(**overrides) -> CompareConfig:
    """Smoke-test settings: a few steps on a few short texts (seconds)."""
    kw = dict(steps=8, batch_size=4, seq_len=16, heldout=16, fit_texts=16, calib_texts=8, train_texts=8,
              eval_at=(0, 8))
    kw.update(overrides)
    return CompareConfig(**kw)


@dataclass
class CompareResult:
    config: CompareConfig
    rows: list = field(default_factory=list)  # dicts with CSV_FIELDS keys (None = not measured)
    timing: dict = field(default_factory=dict)  # init -> {"init_s", "train_s", "eval_s"}

    def rows_for(self, init: str) -> list:
        return [r for r in self.rows if r["init"] == init]

    def train_losses(self, init: str) -> list:
        return [r["loss"] for r in self.rows_for(init) if r["loss"] is not None]

    def evals(self, init: str) -> list:
        return [r for r in self.rows_for(init) if r["heldout_mean_cos"] is not None]

    def summary(self) -> dict:
        out = {}
        for init in self.config.inits:
            lo, ev = self.train_losses(init), self.evals(init)
            k = max(1, min(10, len(lo) // 4))
            out[init] = dict(
                loss_first=lo[0], loss_last=lo[-1], loss_first_mean=sum(lo[:k]) / k, loss_last_mean=sum(lo[-k:]) / k,
                mean_over=k, start={f: ev[0][f] for f in EVAL_FIELDS}, end={f: ev[-1][f] for f in EVAL_FIELDS},
                **self.timing.get(init, {}))
        return out

    def table(self) -> str:
        s = self.summary()
        head = (f"{'init':<8} {'init s':>7} {'train s':>8} {'train loss first→last (mean of k)':>34} "
                f"{'held-out loss':>16} {'mean cos':>15} {'min cos':>15} {'NN agree':>15}")
        lines = [head, "-" * len(head)]
        for init, d in s.items():
            a, b = d["start"], d["end"]
            lines.append(
                f"{init:<8} {d.get('init_s', 0):7.1f} {d.get('train_s', 0):8.1f} "
                f"{d['loss_first_mean']:14.4f} → {d['loss_last_mean']:8.4f} (k={d['mean_over']:<2})  "
                f"{a['heldout_loss']:7.3f}→{b['heldout_loss']:7.3f} "
                f"{a['heldout_mean_cos']:6.4f}→{b['heldout_mean_cos']:6.4f} "
                f"{a['heldout_min_cos']:6.4f}→{b['heldout_min_cos']:6.4f} "
                f"{a['heldout_nn_agree']:6.4f}→{b['heldout_nn_agree']:6.4f}")
        lines.append("held-out columns: at step 0 → at the last step; mean/min cos and NN agreement via the ridge "
                     "read-out (readout_fidelity)")
        return "\n".join(lines)


def run_compare(cfg: CompareConfig, progress: bool = False, log=print) -> CompareResult:
    """Train one clone per init with identical settings and data; see the module docstring."""
    from lrkd_fast.clone import LowRankClone
    from lrkd_fast.clone.recipe import LRCTrainer, readout_fidelity
    from lrkd_fast.data import TextBatches, pydoc_sentences, split_texts
    from lrkd_fast.distillation import DistillConfig
    from lrkd_fast.evaluate import sentence_embeddings
    from lrkd_fast.recipes import load_teacher

    teacher, tok = load_teacher(cfg.teacher, "cpu")
    texts = pydoc_sentences()
    train, held = split_texts(texts, cfg.heldout, seed=cfg.seed)
    if cfg.train_texts is not None:
        train = train[:cfg.train_texts]
    held_b = list(TextBatches(held, tok, 64, cfg.seq_len, shuffle=False))
    fit_b = list(TextBatches(train[:cfg.fit_texts], tok, 64, cfg.seq_len, shuffle=False))
    t_held, t_fit = sentence_embeddings(teacher, held_b), sentence_embeddings(teacher, fit_b)
    result = CompareResult(cfg)

    for init in cfg.inits:
        torch.manual_seed(cfg.seed)
        t0 = time.time()
        calib = list(TextBatches(train[:cfg.calib_texts], tok, 32, cfg.seq_len, shuffle=False)) \
            if init == "pca" else None
        clone = LowRankClone.from_teacher(teacher, cfg.student_hidden, init=init, init_std=cfg.init_std,
                                          calibration=calib, alpha=cfg.alpha)
        timing = {"init_s": time.time() - t0, "eval_s": 0.0}
        rows = {}  # step -> row

        def row(step):
            return rows.setdefault(step, {"init": init, "step": step, **{f: None for f in PART_FIELDS + EVAL_FIELDS}})

        @torch.no_grad()
        def evaluate(step):
            te = time.time()
            student = clone.export_student()
            fid = readout_fidelity(sentence_embeddings(student, fit_b), t_fit,
                                   sentence_embeddings(student, held_b), t_held)
            n_tok = [int(b["attention_mask"].sum()) for b in held_b]
            h_loss = sum(clone(**b).loss.item() * n for b, n in zip(held_b, n_tok)) / sum(n_tok)
            row(step).update(heldout_loss=h_loss, heldout_mean_cos=fid.mean_cosine, heldout_min_cos=fid.min_cosine,
                             heldout_nn_agree=fid.nn_agreement)
            timing["eval_s"] += time.time() - te
            if progress:
                log(f"  [{init}] step {step:4d}: held-out loss {h_loss:.4f}, mean cos {fid.mean_cosine:.4f}, "
                    f"NN agree {fid.nn_agreement:.4f}")

        def on_step(step, parts):  # called after the update of batch `step`
            row(step).update({f: parts.get(f) for f in PART_FIELDS})
            if step + 1 in cfg.eval_at:
                evaluate(step + 1)

        data = TextBatches(train, tok, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        trainer = LRCTrainer(clone, DistillConfig(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, progress=progress))
        try:
            evaluate(0)
            t1 = time.time()
            e1 = timing["eval_s"]
            trainer.train(data, on_step=on_step)
            timing["train_s"] = time.time() - t1 - (timing["eval_s"] - e1)
        finally:
            clone.close()
        result.rows.extend(rows[s] for s in sorted(rows))
        result.timing[init] = timing
        if progress:
            lo = result.train_losses(init)
            log(f"{init}: init {timing['init_s']:.1f}s, train {timing['train_s']:.1f}s, "
                f"loss {lo[0]:.4f} -> {lo[-1]:.4f}")
    return result


def write_csv(result: CompareResult, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in result.rows:
            w.writerow({k: ("" if r[k] is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                        for k in CSV_FIELDS})


def plot(result: CompareResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    colors = {"random": "tab:blue", "pca": "tab:orange", "identity": "tab:green"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.3, 1]})
    for init in cfg.inits:
        c = colors.get(init)
        pts = [(r["step"], r["loss"]) for r in result.rows_for(init) if r["loss"] is not None]
        steps, loss = zip(*pts)
        ax1.plot(steps, loss, color=c, alpha=0.3, lw=0.8)
        k = max(1, min(10, len(loss) // 10))  # running mean over k steps: batches differ in length and content
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax1.plot(steps, smooth, color=c, lw=1.8, label=f"{init}: train loss (running mean of {k})")
        ev = [(r["step"], r["heldout_loss"]) for r in result.evals(init)]
        ax1.plot(*zip(*ev), "o--", color=c, ms=5, lw=1, label=f"{init}: held-out loss")
    ax1.set_yscale("log")
    ax1.set_xlabel("step (optimizer updates)")
    ax1.set_ylabel("LRC loss = embed + alpha * clone (log)")
    ax1.set_title(f"all-MiniLM-L6-v2 384 -> {cfg.student_hidden}: LRC loss")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)

    metrics = [("heldout_mean_cos", "mean cos"), ("heldout_min_cos", "min cos"), ("heldout_nn_agree", "NN agree")]
    groups = [(init, when) for init in cfg.inits for when in ("start", "end")]
    width = 0.8 / len(groups)
    for j, (init, when) in enumerate(groups):
        ev = result.evals(init)
        r = ev[0] if when == "start" else ev[-1]
        xs = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(metrics))]
        vals = [r[m] for m, _ in metrics]
        bars = ax2.bar(xs, vals, width, color=colors.get(init), alpha=0.4 if when == "start" else 1.0,
                       hatch="//" if when == "start" else None, edgecolor="black", lw=0.5,
                       label=f"{init}, step {r['step']}")
        for b, v in zip(bars, vals):
            ax2.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=7,
                     rotation=90)
    ax2.set_xticks(range(len(metrics)), [n for _, n in metrics])
    ax2.set_ylim(0, 1.12)
    ax2.set_ylabel("held-out (ridge read-out to teacher space)")
    ax2.set_title(f"held-out fidelity, {cfg.heldout} texts")
    ax2.legend(fontsize=8, loc="upper right")
    ax2.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"LRC init: " + " vs ".join(cfg.inits) + f"; {cfg.steps} steps, lr {cfg.lr}, "
                 f"batch {cfg.batch_size} x <= {cfg.seq_len} tokens, seed {cfg.seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lrc_init_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke-test settings (seconds)")
    p.add_argument("--steps", type=int, help="training steps per init")
    p.add_argument("--out", default="runs/lrc_init", help="output folder (default: runs/lrc_init)")
    p.add_argument("--lr", type=float, help="learning rate (both inits)")
    p.add_argument("--seed", type=int, help="seed (both inits)")
    p.add_argument("--inits", nargs="+", choices=("random", "pca"), help="inits to compare (default: random pca)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    over = {k: v for k, v in dict(steps=a.steps, lr=a.lr, seed=a.seed,
                                   inits=tuple(a.inits) if a.inits else None).items() if v is not None}
    if a.quick:
        cfg = quick_config(**over)
    else:
        if "steps" in over:
            over["eval_at"] = None
        cfg = CompareConfig(**over)
    os.makedirs(a.out, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.time()
    result = run_compare(cfg, progress=not a.no_progress)
    wall = time.time() - t0
    write_csv(result, os.path.join(a.out, "lrc_init_compare.csv"))
    plot(result, os.path.join(a.out, "lrc_init_compare.png"))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump({"config": asdict(cfg), "summary": result.summary(), "wall_s": wall,
                   "started_utc": started.isoformat(timespec="seconds"), "torch": torch.__version__,
                   "threads": a.threads, "machine": platform.machine(), "processor": platform.processor()},
                  f, indent=2)
    print(result.table())
    print(f"wall time {wall:.0f} s; wrote {a.out}/lrc_init_compare.csv, lrc_init_compare.png, summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
