"""Generalization: does the train/held-out gap of a distilled low-rank layer grow like r(m+n)/sqrt(n)?

A test of the claim "generalization error grows like O(r (m + n) / sqrt(n_samples)) for an m x n
weight at rank r" (arXiv 2603.22355, abstract only) on the rank sweep's controlled task::

    python -m benchmarks.generalization              # default settings, about a minute on 2 CPU cores
    python -m benchmarks.generalization --tiny       # smoke test, seconds
    python -m benchmarks.generalization --out DIR    # where generalization.csv / .png / summary.json / README.md go

Task and student: as in ``benchmarks/rank_sweep.py`` (linear teacher with singular values k^-decay,
Gaussian inputs, label noise; the rank-r student is the exact minimizer of the training loss,
reduced-rank regression), for several weight shapes m x n (d_out x d_in) so that the (m + n) factor
is tested too, not only r and the sample count N.

Measurement. The error of a sample is its squared error summed over the m outputs. Training error:
on the N noisy training samples. Held-out error: the population risk of the fitted student, exact,
``||U V - W^T||_F^2 + m noise^2`` (no held-out sampling noise; ``tests/test_generalization.py``
checks it against a large fresh sample). The gap is held-out minus training error.

Fits, all by least squares on log gap over every (shape, r, N) cell:

* ``paper``: gap = c r (m + n) / sqrt(N) (one constant);
* ``free``: gap = c (r (m + n))^alpha N^beta (the paper's form has alpha = 1, beta = -1/2);
* ``parametric``: gap = c r (m + n - r) / N, the classical optimism of least squares with
  r (m + n - r) free parameters (2 noise^2 df / N for Gaussian noise; printed with the fitted c
  next to 2 noise^2).

Reported for each: R^2 in log space and the RMS of the log residuals (a factor), and per region
(small N, rank near full) where the residuals are largest.
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
from typing import Optional

import torch
from torch import Tensor

from .rank_sweep import ReducedRankFit, machine, make_teacher

CSV_FIELDS = ["d_out", "d_in", "n", "rank", "seed", "train_error", "heldout_error", "gap"]


@dataclass
class GeneralizationConfig:
    shapes: tuple = ((64, 64), (32, 128), (128, 128))  # (d_out, d_in) = (m, n)
    decay: float = 1.0
    noise: float = 0.5
    ns: tuple = tuple(256 * 2 ** k for k in range(9))  # 256 .. 65536 samples
    ranks: Optional[tuple] = None  # default 1, 2, 4, 8, 16, 32, 64, 128 up to full rank, and full rank
    seeds: int = 10
    teacher_seed: int = 0
    block: int = 16384

    def __post_init__(self):
        self.shapes = tuple(tuple(int(v) for v in s) for s in self.shapes)
        self.ns = tuple(sorted(set(self.ns)))
        if not self.shapes or any(len(s) != 2 or min(s) < 1 for s in self.shapes):
            raise ValueError(f"shapes must be (d_out, d_in) pairs of ints >= 1, got {self.shapes!r}")
        for name in ("seeds", "block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.decay, (int, float)) and self.decay > 0):
            raise ValueError(f"decay must be > 0, got {self.decay!r}")
        if not (isinstance(self.noise, (int, float)) and self.noise > 0):
            raise ValueError(f"noise must be > 0 (with no noise there is no gap), got {self.noise!r}")
        if len(self.ns) < 2 or any(isinstance(n, bool) or not isinstance(n, int) for n in self.ns):
            raise ValueError(f"ns must hold at least two ints, got {self.ns!r}")
        d_max = max(d_in for _, d_in in self.shapes)
        if self.ns[0] <= d_max + 1:
            raise ValueError(f"every n must exceed d_in + 1 = {d_max + 1} (least squares needs X^T X invertible), "
                             f"got ns[0]={self.ns[0]}")
        if self.ranks is not None:
            self.ranks = tuple(sorted(set(self.ranks)))
            if not self.ranks or self.ranks[0] < 1:
                raise ValueError(f"ranks must be ints >= 1, got {self.ranks!r}")

    def rank_grid(self, d_out: int, d_in: int) -> list[int]:
        full = min(d_out, d_in)
        base = self.ranks if self.ranks is not None else tuple(2 ** k for k in range(8))
        return sorted({r for r in base if r <= full} | ({full} if self.ranks is None else set()))


TINY = dict(shapes=((16, 16), (8, 32)), ns=(64, 128, 256, 512), seeds=2)


# ------------------------------------------------------------------------------------ sweep

def population_risk(fit: ReducedRankFit, W: Tensor, noise: float, ranks) -> Tensor:
    """Expected squared error per sample (summed over outputs) of the rank-r students on fresh
    x ~ N(0, I) with label noise: ``||U_r V_r - W^T||_F^2 + d_out noise^2``, for every rank at once.

    With ``U_r V_r = sum_{k<=r} (B q_k) q_k^T`` (orthonormal q_k): ``||U_r V_r||^2 = sum ||B q_k||^2`` and
    ``<U_r V_r, W^T> = sum q_k^T W B q_k``.
    """
    r = fit._check(ranks)
    W = W.to(torch.float64)
    BQ = fit.B @ fit.Q  # (d_in, d_out)
    a = BQ.square().sum(0)
    c = (fit.Q * (W @ BQ)).sum(0)
    err = W.square().sum() - 2 * torch.cumsum(c, 0) + torch.cumsum(a, 0)
    return err[r - 1] + W.shape[0] * noise ** 2


def run_sweep(cfg: GeneralizationConfig, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    with tqdm(total=len(cfg.shapes) * cfg.seeds * len(cfg.ns), desc="generalization", disable=not progress) as bar:
        for d_out, d_in in cfg.shapes:
            W = make_teacher(d_in, d_out, cfg.decay, cfg.teacher_seed)
            ranks = cfg.rank_grid(d_out, d_in)
            for seed in range(cfg.seeds):
                g = torch.Generator().manual_seed(1_000 + seed)
                xx = torch.zeros(d_in, d_in, dtype=torch.float64)
                xy = torch.zeros(d_in, d_out, dtype=torch.float64)
                yy, done = 0.0, 0
                for n in cfg.ns:
                    while done < n:  # nested training sets within a seed
                        b = min(cfg.block, n - done)
                        x = torch.randn(b, d_in, generator=g, dtype=torch.float64)
                        y = x @ W.t() + cfg.noise * torch.randn(b, d_out, generator=g, dtype=torch.float64)
                        xx += x.t() @ x
                        xy += x.t() @ y
                        yy += y.square().sum().item()
                        done += b
                    fit = ReducedRankFit(xx, xy, yy, n)
                    train = (fit.train_losses(ranks) * d_out).tolist()  # per sample, summed over outputs
                    held = population_risk(fit, W, cfg.noise, ranks).tolist()
                    rows.extend(dict(d_out=d_out, d_in=d_in, n=n, rank=r, seed=seed, train_error=t,
                                     heldout_error=h, gap=h - t) for r, t, h in zip(ranks, train, held))
                    bar.update()
    return rows


# ------------------------------------------------------------------------------------ analysis

def cells(rows: list[dict]) -> list[dict]:
    """Seed-averaged (shape, n, rank) cells: mean gap, its standard error, mean train / held-out error."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["d_out"], r["d_in"], r["n"], r["rank"]), []).append(r)
    out = []
    for (m, d, n, rank), g in groups.items():
        gaps = torch.tensor([x["gap"] for x in g], dtype=torch.float64)
        out.append(dict(d_out=m, d_in=d, n=n, rank=rank, gap=gaps.mean().item(),
                        gap_se=(gaps.std() / math.sqrt(len(g))).item() if len(g) > 1 else float("nan"),
                        train=sum(x["train_error"] for x in g) / len(g),
                        heldout=sum(x["heldout_error"] for x in g) / len(g), seeds=len(g)))
    return out


def _lstsq(features: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients and their standard errors of y ~ features (with an intercept column first)."""
    A = torch.cat([torch.ones(len(y), 1, dtype=torch.float64), features], 1)
    coef = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
    resid = y - A @ coef
    dof = max(1, len(y) - A.shape[1])
    cov = torch.linalg.inv(A.t() @ A) * (resid.square().sum() / dof)
    return coef, cov.diagonal().sqrt()


def _quality(y: Tensor, pred: Tensor) -> dict:
    resid = y - pred
    ss = (y - y.mean()).square().sum()
    return dict(r2_log=(1 - resid.square().sum() / ss).item(), rms_log=resid.square().mean().sqrt().item(),
                max_abs_log=resid.abs().max().item())


def analyze(rows: list[dict], noise: float) -> dict:
    """The three fits of the module docstring on the seed-averaged cells with a positive gap, their
    quality overall and by region, and per-cell residuals (log of measured / fitted gap)."""
    cs = cells(rows)
    keep = [c for c in cs if c["gap"] > 0]
    if len(keep) < 4:
        raise ValueError(f"only {len(keep)} cells with a positive gap: too few to fit")
    m = torch.tensor([c["d_out"] for c in keep], dtype=torch.float64)
    d = torch.tensor([c["d_in"] for c in keep], dtype=torch.float64)
    n = torch.tensor([c["n"] for c in keep], dtype=torch.float64)
    r = torch.tensor([c["rank"] for c in keep], dtype=torch.float64)
    y = torch.log(torch.tensor([c["gap"] for c in keep], dtype=torch.float64))
    x_paper = torch.log(r * (m + d)) - 0.5 * torch.log(n)
    x_param = torch.log(r * (m + d - r)) - torch.log(n)
    fits = {}
    for name, x in (("paper", x_paper), ("parametric", x_param)):
        logc = (y - x).mean()  # slope fixed at 1: only the constant is fitted
        pred = logc + x
        fits[name] = dict(constant=math.exp(logc.item()), **_quality(y, pred), _pred=pred)
    fits["parametric"]["constant_over_2noise2"] = fits["parametric"]["constant"] / (2 * noise ** 2)
    coef, se = _lstsq(torch.stack([torch.log(r * (m + d)), torch.log(n)], 1), y)
    pred = coef[0] + coef[1] * torch.log(r * (m + d)) + coef[2] * torch.log(n)
    fits["free"] = dict(constant=math.exp(coef[0].item()), alpha=coef[1].item(), alpha_se=se[1].item(),
                        beta=coef[2].item(), beta_se=se[2].item(), **_quality(y, pred), _pred=pred)
    # regions: where does each fit break?
    full = torch.minimum(m, d)
    regions = {"all": torch.ones_like(n, dtype=torch.bool), "N <= 4 d_in": n <= 4 * d,
               "N >= 32 d_in": n >= 32 * d, "rank <= full/4": r <= full / 4, "rank = full": r == full}
    for f in fits.values():
        res = y - f.pop("_pred")
        f["regions"] = {k: dict(cells=int(mask.sum()), mean_log_resid=res[mask].mean().item() if mask.any() else float("nan"),
                                rms_log_resid=res[mask].square().mean().sqrt().item() if mask.any() else float("nan"))
                        for k, mask in regions.items()}
        f["_resid"] = res.tolist()
    for i, c in enumerate(keep):
        for name, f in fits.items():
            c[f"log_resid_{name}"] = f["_resid"][i]
    for f in fits.values():
        f.pop("_resid")
    # the exponent of N at fixed (shape, rank): local slopes, to show whether it is -1/2 or -1
    slopes = []
    for (mm, dd, rr) in sorted({(c["d_out"], c["d_in"], c["rank"]) for c in keep}):
        sel = sorted((c for c in keep if (c["d_out"], c["d_in"], c["rank"]) == (mm, dd, rr)), key=lambda c: c["n"])
        if len(sel) >= 3:
            xs = torch.log(torch.tensor([c["n"] for c in sel], dtype=torch.float64))
            ys = torch.log(torch.tensor([c["gap"] for c in sel], dtype=torch.float64))
            b = ((xs - xs.mean()) * (ys - ys.mean())).sum() / (xs - xs.mean()).square().sum()
            big = [c for c in sel if c["n"] >= 32 * dd]
            b_big = float("nan")
            if len(big) >= 2:
                xb = torch.log(torch.tensor([c["n"] for c in big], dtype=torch.float64))
                yb = torch.log(torch.tensor([c["gap"] for c in big], dtype=torch.float64))
                b_big = (((xb - xb.mean()) * (yb - yb.mean())).sum() / (xb - xb.mean()).square().sum()).item()
            slopes.append(dict(d_out=mm, d_in=dd, rank=rr, n_exponent=b.item(), n_exponent_large_n=b_big))
    return dict(fits=fits, cells=keep, dropped_nonpositive=len(cs) - len(keep), n_slopes=slopes)


# ------------------------------------------------------------------------------------ output

def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [dict(d_out=int(r["d_out"]), d_in=int(r["d_in"]), n=int(r["n"]), rank=int(r["rank"]),
                     seed=int(r["seed"]), **{k: float(r[k]) for k in CSV_FIELDS[5:]}) for r in csv.DictReader(f)]


def plot(summary: dict, cfg: GeneralizationConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = summary["cells"]
    fits = summary["fits"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    markers = "osd^v<>"
    cmap = plt.get_cmap("viridis")
    ns = sorted({c["n"] for c in keep})
    for ax, name, xfun, xlabel in (
            (axes[0], "paper", lambda c: c["rank"] * (c["d_out"] + c["d_in"]) / math.sqrt(c["n"]), "r (m+n) / sqrt(N)"),
            (axes[1], "parametric", lambda c: c["rank"] * (c["d_out"] + c["d_in"] - c["rank"]) / c["n"],
             "r (m+n-r) / N")):
        for k, (mm, dd) in enumerate(cfg.shapes):
            for c in (c for c in keep if (c["d_out"], c["d_in"]) == (mm, dd)):
                ax.plot([xfun(c)], [c["gap"]], markers[k % len(markers)], ms=4, alpha=0.8,
                        color=cmap(ns.index(c["n"]) / max(1, len(ns) - 1)))
            ax.plot([], [], markers[k % len(markers)], color="gray", label=f"{mm} x {dd}")
        xs = sorted(xfun(c) for c in keep)
        f = fits[name]
        ax.plot([xs[0], xs[-1]], [f["constant"] * xs[0], f["constant"] * xs[-1]], "k-", lw=1,
                label=f"gap = {f['constant']:.3g} x  (R^2 log {f['r2_log']:.3f}, rms {math.exp(f['rms_log']):.2f}x)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel + "   (colour: N, dark = small)")
        ax.set_ylabel("held-out minus train error (seed mean)")
        ax.set_title(f"{name} form", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    for k, (mm, dd) in enumerate(cfg.shapes):
        for rank in sorted({c["rank"] for c in keep if (c["d_out"], c["d_in"]) == (mm, dd)}):
            sel = sorted((c for c in keep if (c["d_out"], c["d_in"], c["rank"]) == (mm, dd, rank)), key=lambda c: c["n"])
            ax.plot([c["n"] for c in sel], [math.exp(c["log_resid_paper"]) for c in sel], "-" + markers[k % len(markers)],
                    ms=3, lw=0.8, color=cmap(math.log2(rank) / 7), label=f"{mm}x{dd} r={rank}" if k == 0 else None)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training samples N")
    ax.set_ylabel("measured gap / paper-form fit")
    ax.set_title("where the paper's form breaks: residual vs N (marker = shape)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"generalization gap of reduced-rank students: teacher s_k = k^-{cfg.decay}, label noise {cfg.noise}, "
                 f"{cfg.seeds} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_summary(summary: dict, noise: float) -> str:
    f = summary["fits"]
    lines = [f"paper      gap = c r(m+n)/sqrt(N):  c = {f['paper']['constant']:.4g}, R^2(log) = {f['paper']['r2_log']:.3f}, "
             f"rms log resid = {f['paper']['rms_log']:.3f} (x{math.exp(f['paper']['rms_log']):.2f})",
             f"free       gap = c (r(m+n))^a N^b:   a = {f['free']['alpha']:.3f} ± {f['free']['alpha_se']:.3f}, "
             f"b = {f['free']['beta']:.3f} ± {f['free']['beta_se']:.3f}, R^2(log) = {f['free']['r2_log']:.3f}, "
             f"rms = {f['free']['rms_log']:.3f}",
             f"parametric gap = c r(m+n-r)/N:      c = {f['parametric']['constant']:.4g} "
             f"(= {f['parametric']['constant_over_2noise2']:.3f} x 2 noise^2), R^2(log) = {f['parametric']['r2_log']:.3f}, "
             f"rms = {f['parametric']['rms_log']:.3f}"]
    for name in ("paper", "parametric"):
        reg = ", ".join(f"{k}: {v['mean_log_resid']:+.2f}" for k, v in f[name]["regions"].items() if v["cells"])
        lines.append(f"  {name} mean log residual by region: {reg}")
    return "\n".join(lines)


def _readme(cfg: GeneralizationConfig, summary: dict, meta: dict, command: str) -> str:
    f = summary["fits"]
    reg_rows = []
    for k in f["paper"]["regions"]:
        p, q, fr = f["paper"]["regions"][k], f["parametric"]["regions"][k], f["free"]["regions"][k]
        reg_rows.append(f"| {k} | {p['cells']} | {p['mean_log_resid']:+.2f} / {p['rms_log_resid']:.2f} | "
                        f"{fr['mean_log_resid']:+.2f} / {fr['rms_log_resid']:.2f} | "
                        f"{q['mean_log_resid']:+.2f} / {q['rms_log_resid']:.2f} |")
    slope_rows = [f"| {s['d_out']} x {s['d_in']} | {s['rank']} | {s['n_exponent']:.3f} | {s['n_exponent_large_n']:.3f} |"
                  for s in summary["n_slopes"]]
    return f"""# Generalization: does the gap grow like r(m+n)/sqrt(N)?

Written by `benchmarks/generalization.py` on {meta['date']}, on a {meta['machine_short']} ({meta['machine']},
{meta['threads']} torch thread(s)); the run took {meta['seconds']:.0f} s.

    {command}

Files: `generalization.csv` (one row per shape, N, rank and seed: {', '.join(f'`{c}`' for c in CSV_FIELDS)}),
`generalization.png`, `summary.json` (configuration, every seed-averaged cell with its residuals, every number below).

## Setup

- Teachers: the rank sweep's linear maps, shapes m x n = {', '.join(f'{a} x {b}' for a, b in cfg.shapes)},
  singular values k^-{cfg.decay}; inputs N(0, I), label noise std {cfg.noise}.
- Students: the exact rank-r minimizers of the training loss (reduced-rank regression), ranks 1, 2, 4, ...
  and full rank; N = {', '.join(str(n) for n in cfg.ns)} nested training samples; {cfg.seeds} seeds.
- Error of a sample: squared error summed over the m outputs. Held-out error: the exact population risk.
  Gap = held-out minus training error, averaged over seeds ({summary['dropped_nonpositive']} cells with a
  non-positive mean gap left out of the log fits).

## Fits (least squares on log gap over {len(summary['cells'])} cells)

| form | fitted | R^2 (log) | rms log residual (factor) | worst cell (factor) |
|---|---|---:|---:|---:|
| paper: c r(m+n)/sqrt(N) | c = {f['paper']['constant']:.4g} | {f['paper']['r2_log']:.3f} | {f['paper']['rms_log']:.3f} (x{math.exp(f['paper']['rms_log']):.2f}) | x{math.exp(f['paper']['max_abs_log']):.1f} |
| free: c (r(m+n))^a N^b | a = {f['free']['alpha']:.3f} ± {f['free']['alpha_se']:.3f}, b = {f['free']['beta']:.3f} ± {f['free']['beta_se']:.3f} | {f['free']['r2_log']:.3f} | {f['free']['rms_log']:.3f} (x{math.exp(f['free']['rms_log']):.2f}) | x{math.exp(f['free']['max_abs_log']):.1f} |
| parametric: c r(m+n-r)/N | c = {f['parametric']['constant']:.4g} = {f['parametric']['constant_over_2noise2']:.3f} x 2 noise^2 | {f['parametric']['r2_log']:.3f} | {f['parametric']['rms_log']:.3f} (x{math.exp(f['parametric']['rms_log']):.2f}) | x{math.exp(f['parametric']['max_abs_log']):.1f} |

Mean / rms log residual (log of measured over fitted gap) by region:

| region | cells | paper | free | parametric |
|---|---:|---:|---:|---:|
{chr(10).join(reg_rows)}

Exponent of N at fixed shape and rank (local slope of log gap against log N; all N, and N >= 32 d_in):

| shape | rank | slope, all N | slope, N >= 32 d_in |
|---|---:|---:|---:|
{chr(10).join(slope_rows)}
"""


def run(cfg: GeneralizationConfig, out_dir: str, progress: bool = True, quiet: bool = False, command: str = "") -> dict:
    t0 = time.perf_counter()
    rows = run_sweep(cfg, progress=progress)
    summary = analyze(rows, cfg.noise)
    seconds = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "generalization.csv"))
    plot(summary, cfg, os.path.join(out_dir, "generalization.png"))
    meta = dict(date=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), machine=machine(),
                machine_short=f"{os.cpu_count()}-core CPU", threads=torch.get_num_threads(),
                seconds=round(seconds, 1), config=asdict(cfg), results=summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_readme(cfg, summary, meta, command or "python -m benchmarks.generalization"))
    if not quiet:
        print(format_summary(summary, cfg.noise))
        print(f"{machine()}, {torch.get_num_threads()} thread(s): {seconds:.1f} s")
        print(f"wrote {out_dir}/generalization.csv, generalization.png, summary.json, README.md")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generalization", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small smoke-test settings (seconds)")
    p.add_argument("--out", default="runs/generalization", help="output folder (default: runs/generalization)")
    p.add_argument("--seeds", type=int, help="seeds per (shape, N, rank)")
    p.add_argument("--noise", type=float, help="label-noise std")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = dict(TINY) if args.tiny else {}
    for k in ("seeds", "noise"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    try:
        cfg = GeneralizationConfig(**kw)
    except ValueError as exc:
        p.error(str(exc))
    command = "python -m benchmarks.generalization " + " ".join(argv if argv is not None else sys.argv[1:])
    run(cfg, args.out, progress=not args.no_progress, command=command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
