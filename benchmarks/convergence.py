"""Convergence: does SGD on a low-rank student keep the O(1/sqrt(T)) rate?

A test of the claim "low-rank projection keeps SGD's O(1/sqrt(T)) convergence" (arXiv 2603.22355,
abstract only) on the rank sweep's controlled task (``benchmarks/rank_sweep.py``)::

    python -m benchmarks.convergence                # default settings, a few minutes on 2 CPU cores
    python -m benchmarks.convergence --tiny         # smoke test, seconds
    python -m benchmarks.convergence --out DIR      # where convergence.csv / .png / summary.json / README.md go

Task. The rank sweep's teacher: a fixed linear map ``y = W x`` (d_out x d_in) with singular values
``s_k = k^-decay``; inputs ``x ~ N(0, I)``, labels ``W x`` plus Gaussian noise of std ``noise``.

Student. A rank-r factorization ``y_hat = (x U) V`` (what :class:`lrkd_fast.LowRankLinear` computes)
from a small random init, trained by plain SGD on fresh minibatches of ``batch`` samples (online
SGD: every step sees new data, so it optimizes the population loss) with a constant step
``lr0 / sqrt(T)`` for a horizon of T steps, the schedule of the nonconvex SGD theorem. A dense
student (one full matrix, convex) runs beside it for comparison.

Measurement. The population loss (squared error per sample, summed over outputs) has a closed form,
``f(U, V) = ||U V - W^T||_F^2 + d_out noise^2``, and so do its gradient (``2 G V^T``, ``2 U^T G``
with ``G = U V - W^T``) and its minimum over rank-r students (Eckart-Young:
``f* = sum_{k>r} s_k^2 + d_out noise^2``). Each run records, exactly and at every step, the squared
norm of the population gradient; its average over the T steps is the quantity the theorem bounds by
O(1/sqrt(T)). Also recorded: the suboptimality ``f - f*`` at the end and averaged over the run.
Fit: ``log metric = a + b log T`` over the horizons (seed-averaged metric), with the regression's
standard error and the spread of per-seed fits; the paper predicts b = -1/2 for the gradient norm.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .rank_sweep import fit_power_law, machine, make_teacher

CSV_FIELDS = ["student", "rank", "T", "seed", "lr", "avg_grad_norm_sq", "final_subopt", "avg_subopt", "init_subopt"]
METRICS = ("avg_grad_norm_sq", "final_subopt", "avg_subopt")


@dataclass
class ConvergenceConfig:
    d_in: int = 64
    d_out: int = 64
    decay: float = 1.0
    noise: float = 0.5
    ranks: tuple = (4, 16)
    dense: bool = True  # also run a dense (full-matrix) student
    horizons: tuple = tuple(2 ** k for k in range(8, 15))  # 256 .. 16384 steps
    seeds: int = 6
    batch: int = 16
    lr0: float = 0.8  # step size lr0 / sqrt(T); the largest (T = 256) is 0.05
    init_scale: float = 0.3  # entries of U, V ~ N(0, init_scale^2 / sqrt(d_in d_out)) -> |UV| ~ init_scale^2
    teacher_seed: int = 0

    def __post_init__(self):
        self.ranks, self.horizons = tuple(sorted(set(self.ranks))), tuple(sorted(set(self.horizons)))
        for name in ("d_in", "d_out", "seeds", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("decay", "lr0", "init_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if not (isinstance(self.noise, (int, float)) and self.noise >= 0):
            raise ValueError(f"noise must be >= 0, got {self.noise!r}")
        if not self.ranks and not self.dense:
            raise ValueError("nothing to run: ranks is empty and dense=False")
        if self.ranks and (self.ranks[0] < 1 or self.ranks[-1] > min(self.d_in, self.d_out)):
            raise ValueError(f"ranks must lie in 1..{min(self.d_in, self.d_out)}, got {self.ranks!r}")
        if len(self.horizons) < 3 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.horizons):
            raise ValueError(f"horizons must hold at least three ints >= 1, got {self.horizons!r}")


TINY = dict(d_in=16, d_out=16, ranks=(2,), horizons=(32, 64, 128, 256), seeds=2, batch=8, lr0=0.4)


# ------------------------------------------------------------------------------------ runs

def _optimum(W: Tensor, rank: int, noise: float) -> float:
    s = torch.linalg.svdvals(W)
    return s[rank:].square().sum().item() + W.shape[0] * noise ** 2


def sgd_run(W: Tensor, rank: int, T: int, cfg: ConvergenceConfig, seeds: int, dense: bool = False) -> dict:
    """SGD for T steps at lr0 / sqrt(T), ``seeds`` independent runs at once (batched matmuls).

    rank: the student's rank (ignored for ``dense``). Returns per-seed float64 tensors: the average
    over the T steps of the population gradient's squared norm, the final and averaged suboptimality,
    and the initial suboptimality.
    """
    d_out, d_in = W.shape
    Wt = W.t().to(torch.float64)
    lr = cfg.lr0 / math.sqrt(T)
    f_star = _optimum(W, d_in if dense else rank, cfg.noise) - d_out * cfg.noise ** 2  # noise term cancels
    g_init = torch.Generator().manual_seed(10_000 + 7919 * cfg.teacher_seed)  # same init for every horizon
    g_data = torch.Generator().manual_seed(20_000 + T)
    scale = cfg.init_scale / (d_in * d_out) ** 0.25
    if dense:
        M = torch.zeros(seeds, d_in, d_out, dtype=torch.float64)
    else:
        U = torch.randn(seeds, d_in, rank, generator=g_init, dtype=torch.float64) * scale
        V = torch.randn(seeds, rank, d_out, generator=g_init, dtype=torch.float64) * scale

    def population():
        G = (M if dense else U @ V) - Wt
        sub = G.square().sum((1, 2)) - f_star
        if dense:
            gn = 4 * G.square().sum((1, 2))
        else:
            gn = 4 * ((G @ V.transpose(1, 2)).square().sum((1, 2)) + (U.transpose(1, 2) @ G).square().sum((1, 2)))
        return gn, sub

    gn_sum = torch.zeros(seeds, dtype=torch.float64)
    sub_sum = torch.zeros(seeds, dtype=torch.float64)
    init_sub = population()[1]
    for _ in range(T):
        gn, sub = population()
        gn_sum += gn
        sub_sum += sub
        x = torch.randn(seeds, cfg.batch, d_in, generator=g_data, dtype=torch.float64)
        y = x @ Wt + cfg.noise * torch.randn(seeds, cfg.batch, d_out, generator=g_data, dtype=torch.float64)
        if dense:
            R = x @ M - y
            M = M - lr * (2.0 / cfg.batch) * (x.transpose(1, 2) @ R)
        else:
            xu = x @ U
            R = xu @ V - y
            gU = (2.0 / cfg.batch) * (x.transpose(1, 2) @ (R @ V.transpose(1, 2)))
            gV = (2.0 / cfg.batch) * (xu.transpose(1, 2) @ R)
            U, V = U - lr * gU, V - lr * gV
    final_sub = population()[1]
    if not torch.isfinite(final_sub).all():
        raise FloatingPointError(f"SGD diverged (rank {rank}, T {T}, lr {lr:.3g}): lower lr0")
    return dict(avg_grad_norm_sq=gn_sum / T, final_subopt=final_sub, avg_subopt=sub_sum / T, init_subopt=init_sub,
                lr=lr)


def run_all(cfg: ConvergenceConfig, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    W = make_teacher(cfg.d_in, cfg.d_out, cfg.decay, cfg.teacher_seed)
    students = [("lowrank", r) for r in cfg.ranks] + ([("dense", min(cfg.d_in, cfg.d_out))] if cfg.dense else [])
    rows = []
    with tqdm(total=len(students) * sum(cfg.horizons), desc="convergence", disable=not progress) as bar:
        for kind, r in students:
            for T in cfg.horizons:
                out = sgd_run(W, r, T, cfg, cfg.seeds, dense=kind == "dense")
                for s in range(cfg.seeds):
                    rows.append(dict(student=kind, rank=r, T=T, seed=s, lr=out["lr"],
                                     **{k: out[k][s].item() for k in CSV_FIELDS[5:]}))
                bar.update(T)
    return rows


# ------------------------------------------------------------------------------------ analysis

def _label(kind: str, rank: int) -> str:
    return "dense" if kind == "dense" else f"rank {rank}"


def analyze(rows: list[dict]) -> dict:
    """Per student and metric: the fitted exponent b of ``metric ~ T^b`` (seed-averaged), its
    standard error, the per-seed fits' mean and std, and the seed-averaged values per T."""
    out = {}
    for kind, rank in dict.fromkeys((r["student"], r["rank"]) for r in rows):
        sel = [r for r in rows if r["student"] == kind and r["rank"] == rank]
        Ts = sorted({r["T"] for r in sel})
        seeds = sorted({r["seed"] for r in sel})
        res = dict(student=kind, rank=rank, T=Ts, fits={})
        for m in METRICS:
            vals = torch.tensor([[next(r[m] for r in sel if r["T"] == T and r["seed"] == s) for s in seeds]
                                 for T in Ts], dtype=torch.float64)  # [T, seed]
            mean = vals.mean(1)
            ok = bool((mean > 0).all())
            a, b, se = fit_power_law(Ts, mean.tolist()) if ok else (float("nan"),) * 3
            per_seed = [fit_power_law(Ts, vals[:, j].tolist())[1] for j in range(len(seeds))
                        if (vals[:, j] > 0).all()]
            ps = torch.tensor(per_seed, dtype=torch.float64)
            # exponents of the first and the last half of the horizons: does the rate settle?
            h = len(Ts) // 2 + 1
            b_lo = fit_power_law(Ts[:h], mean[:h].tolist())[1] if ok else float("nan")
            b_hi = fit_power_law(Ts[-h:], mean[-h:].tolist())[1] if ok else float("nan")
            res["fits"][m] = dict(exponent=b, intercept=a, exponent_se=se, values=mean.tolist(),
                                  per_seed_mean=ps.mean().item() if len(ps) else float("nan"),
                                  per_seed_std=ps.std().item() if len(ps) > 1 else float("nan"),
                                  exponent_short_T=b_lo, exponent_long_T=b_hi)
        out[_label(kind, rank)] = res
    return out


# ------------------------------------------------------------------------------------ output

def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.7g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [dict(student=r["student"], rank=int(r["rank"]), T=int(r["T"]), seed=int(r["seed"]),
                     **{k: float(r[k]) for k in CSV_FIELDS[4:]}) for r in csv.DictReader(f)]


def plot(summary: dict, cfg: ConvergenceConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"avg_grad_norm_sq": "mean over steps of ||grad f||^2 (the theorem's quantity)",
              "final_subopt": "final suboptimality f(theta_T) - f*",
              "avg_subopt": "mean suboptimality over the run"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, m in zip(axes, METRICS):
        for label, s in summary.items():
            fit = s["fits"][m]
            Ts = torch.tensor(s["T"], dtype=torch.float64)
            line = ax.plot(s["T"], fit["values"], "o", ms=5,
                           label=f"{label}: b = {fit['exponent']:.3f} ± {fit['exponent_se']:.3f}")[0]
            if math.isfinite(fit["exponent"]):
                ax.plot(s["T"], torch.exp(fit["intercept"] + fit["exponent"] * Ts.log()).tolist(), "-",
                        color=line.get_color(), lw=1)
        first = next(iter(summary.values()))
        T0, v0 = first["T"][0], first["fits"][m]["values"][0]
        ax.plot([T0, first["T"][-1]], [v0, v0 * (first["T"][-1] / T0) ** -0.5], "--", color="gray", lw=1,
                label="slope -1/2 (paper)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("horizon T (steps, step size lr0/sqrt(T))")
        ax.set_title(titles[m], fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"SGD on a {cfg.d_out}x{cfg.d_in} linear teacher (s_k = k^-{cfg.decay}), label noise {cfg.noise}, "
                 f"batch {cfg.batch}, {cfg.seeds} seeds: population quantities, exact", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_summary(summary: dict) -> str:
    lines = [f"{'student':<9} {'metric':<17} {'exponent b':>10} {'s.e.':>6} {'per-seed b':>16} "
             f"{'b short T':>9} {'b long T':>9}"]
    for label, s in summary.items():
        for m in METRICS:
            f = s["fits"][m]
            lines.append(f"{label:<9} {m:<17} {f['exponent']:>10.3f} {f['exponent_se']:>6.3f} "
                         f"{f['per_seed_mean']:>8.3f} ± {f['per_seed_std']:<5.3f} {f['exponent_short_T']:>9.3f} "
                         f"{f['exponent_long_T']:>9.3f}")
    return "\n".join(lines)


def _readme(cfg: ConvergenceConfig, summary: dict, meta: dict, command: str) -> str:
    rows = []
    for label, s in summary.items():
        for m in METRICS:
            f = s["fits"][m]
            rows.append(f"| {label} | `{m}` | {f['exponent']:.3f} | {f['exponent_se']:.3f} | "
                        f"{f['per_seed_mean']:.3f} ± {f['per_seed_std']:.3f} | {f['exponent_short_T']:.3f} | "
                        f"{f['exponent_long_T']:.3f} |")
    values = []
    for label, s in summary.items():
        values.append(f"| {label} | " + " | ".join(f"{v:.4g}" for v in s["fits"]["avg_grad_norm_sq"]["values"]) + " |")
    Ts = next(iter(summary.values()))["T"]
    return f"""# Convergence: does SGD on a low-rank student keep the O(1/sqrt(T)) rate?

Written by `benchmarks/convergence.py` on {meta['date']}, on a {meta['machine_short']} ({meta['machine']},
{meta['threads']} torch thread(s)); the run took {meta['seconds']:.0f} s.

    {command}

Files: `convergence.csv` (one row per student, horizon T and seed: {', '.join(f'`{c}`' for c in CSV_FIELDS)}),
`convergence.png`, `summary.json` (configuration and every number below).

## Setup

- Teacher: the rank sweep's linear map, {cfg.d_out} x {cfg.d_in}, singular values k^-{cfg.decay}; inputs
  N(0, I), label noise std {cfg.noise}.
- Students: rank {', '.join(str(r) for r in cfg.ranks)} factorizations (x U) V from a small random init
  (|UV| ~ {cfg.init_scale}^2){' and a dense matrix from zero' if cfg.dense else ''}; online SGD, batch {cfg.batch},
  constant step {cfg.lr0}/sqrt(T) for horizons T = {', '.join(str(t) for t in cfg.horizons)}; {cfg.seeds} seeds
  (the initialization is shared across horizons, the data streams are not).
- Every reported quantity is the exact population value (closed forms in the script's docstring),
  not a noisy estimate: f is the squared error per sample summed over outputs, f* the best rank-r
  student's (Eckart-Young).

## Fitted exponents b of metric ~ T^b (paper: b = -1/2 for the mean squared gradient norm)

| student | metric | b (seed mean) | s.e. | per-seed b (mean ± std) | b, shortest half of T | b, longest half |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Mean over steps of the population ||grad f||^2, seed-averaged, per horizon:

| student | {' | '.join(f'T={t}' for t in Ts)} |
|---|{'---:|' * len(Ts)}
{chr(10).join(values)}
"""


def run(cfg: ConvergenceConfig, out_dir: str, progress: bool = True, quiet: bool = False, command: str = "") -> dict:
    t0 = time.perf_counter()
    rows = run_all(cfg, progress=progress)
    summary = analyze(rows)
    seconds = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "convergence.csv"))
    plot(summary, cfg, os.path.join(out_dir, "convergence.png"))
    meta = dict(date=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), machine=machine(),
                machine_short=f"{os.cpu_count()}-core CPU", threads=torch.get_num_threads(),
                seconds=round(seconds, 1), config=asdict(cfg), results=summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_readme(cfg, summary, meta, command or "python -m benchmarks.convergence"))
    if not quiet:
        print(format_summary(summary))
        print(f"{machine()}, {torch.get_num_threads()} thread(s): {seconds:.1f} s")
        print(f"wrote {out_dir}/convergence.csv, convergence.png, summary.json, README.md")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small smoke-test settings (seconds)")
    p.add_argument("--out", default="runs/convergence", help="output folder (default: runs/convergence)")
    p.add_argument("--seeds", type=int, help="independent runs per (student, T)")
    p.add_argument("--ranks", type=int, nargs="+", help="student ranks")
    p.add_argument("--horizons", type=int, nargs="+", help="horizons T (steps)")
    p.add_argument("--lr0", type=float, help="step size lr0 / sqrt(T)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense student")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = dict(TINY) if args.tiny else {}
    for k in ("seeds", "ranks", "horizons", "lr0"):
        if getattr(args, k) is not None:
            kw[k] = tuple(getattr(args, k)) if k in ("ranks", "horizons") else getattr(args, k)
    if args.no_dense:
        kw["dense"] = False
    try:
        cfg = ConvergenceConfig(**kw)
    except ValueError as exc:
        p.error(str(exc))
    command = "python -m benchmarks.convergence " + " ".join(argv if argv is not None else sys.argv[1:])
    run(cfg, args.out, progress=not args.no_progress, command=command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
