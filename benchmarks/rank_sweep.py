"""Rank sweep: how the best rank of a distilled low-rank layer grows with the number of samples.

A test of the claim r* = O(sqrt(n)) (arXiv 2603.22355, abstract only) on a controlled task::

    python -m benchmarks.rank_sweep            # default settings, a few minutes on 2 CPU cores
    python -m benchmarks.rank_sweep --quick    # smoke test, seconds
    python -m benchmarks.rank_sweep --out DIR  # where rank_sweep.csv / .png / summary.json go

Task. The teacher is a fixed linear map ``y = W x`` (d_out x d_in) with random orthonormal singular
vectors and singular values ``s_k = k^(-decay)``. The student sees n inputs ``x ~ N(0, I)`` labelled
by the teacher plus Gaussian label noise of std ``noise`` (the part of a teacher a student cannot
or should not copy: sampling noise of its outputs, what a linear student cannot represent).

Student. A :class:`lrkd_fast.LowRankLinear` (no bias) of rank r fitted by distillation: minimum
mean squared error to the noisy teacher outputs on the n samples. That minimum has a closed form,
reduced-rank regression: least squares ``B = (X^T X)^-1 X^T Y``, then the fitted values ``X B`` are
truncated to their top-r right singular directions ``Q_r`` (the truncation in the whitened
space), giving ``U = B Q_r``, ``V = Q_r^T``. It is the exact global minimizer of the training loss
over rank-r layers, i.e. the student that training to convergence reaches (a low-rank linear
model has no spurious local minima); tests/test_rank.py checks that an Adam-trained
``LowRankLinear`` converges to the same training loss and never beats it.

Measurement. For each n and seed: training loss (MSE to the noisy labels) and held-out loss (MSE
to the teacher's noiseless outputs on ``n_test`` fresh inputs, i.e. the excess risk) at every rank
of a grid. The training sets of one seed are nested (the first n samples of the largest set) and
share one held-out set, so differences between ranks and sample counts are not drowned in sampling
noise. r*(n) is the arg-min of the seed-averaged held-out loss. Then ``log r* = a + b log n`` is
fitted by least squares on the interior optima (1 < r* < full rank: a censored optimum says
nothing about the exponent), with the regression's standard error and a bootstrap over seeds.

What to expect (not built into the task): bias ~ sum_{k>r} s_k^2 falls with r, variance ~
noise^2 r (d_in + d_out) / n rises, so the optimum sits where s_r^2 ~ noise^2 (d_in + d_out) / n,
r* ~ n^(1 / (2 decay)). The exponent is a property of the teacher's spectrum; decay = 1 is the
sqrt(n) case, and the default run also measures decay 0.75 and 1.5 to show the dependence.
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
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor

from lrkd_fast.layers import LowRankLinear

CSV_FIELDS = ["decay", "n", "rank", "seed", "train_loss", "heldout_loss"]


@dataclass
class SweepConfig:
    """Settings of one sweep. ``decays[0]`` is the headline task; the others show how the
    exponent depends on the teacher's spectrum."""

    d_in: int = 256
    d_out: int = 256
    decays: tuple = (1.0, 0.75, 1.5)
    noise: float = 0.5
    ns: tuple = tuple(2048 * 2 ** k for k in range(7))  # 2048 .. 131072
    seeds: int = 10
    n_test: int = 8192
    ranks: Optional[tuple] = None  # default: every rank up to 48, then every 8th, then full rank
    bootstrap: int = 1000
    teacher_seed: int = 0
    block: int = 16384  # rows of training data generated at once (memory bound)

    def __post_init__(self):
        self.decays, self.ns = tuple(self.decays), tuple(sorted(self.ns))
        for name in ("d_in", "d_out", "seeds", "n_test", "block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.decays or any(not (isinstance(a, (int, float)) and a > 0) for a in self.decays):
            raise ValueError(f"decays must be positive numbers, got {self.decays!r}")
        if not (isinstance(self.noise, (int, float)) and self.noise >= 0):
            raise ValueError(f"noise must be >= 0, got {self.noise!r}")
        if len(self.ns) < 2 or any(isinstance(n, bool) or not isinstance(n, int) for n in self.ns):
            raise ValueError(f"ns must hold at least two ints, got {self.ns!r}")
        if self.ns[0] < self.d_in:
            raise ValueError(f"every n must be >= d_in={self.d_in} (least squares needs X^T X invertible), "
                             f"got ns[0]={self.ns[0]}")
        if self.ranks is not None:
            self.ranks = tuple(sorted(set(self.ranks)))
            if not self.ranks or self.ranks[0] < 1 or self.ranks[-1] > min(self.d_in, self.d_out):
                raise ValueError(f"ranks must lie in 1..{min(self.d_in, self.d_out)}, got {self.ranks!r}")

    def rank_grid(self) -> list[int]:
        if self.ranks is not None:
            return list(self.ranks)
        full = min(self.d_in, self.d_out)
        return sorted(set(range(1, min(48, full) + 1)) | set(range(56, full + 1, 8)) | {full})


QUICK = dict(d_in=64, d_out=64, decays=(1.0,), ns=(512, 1024, 2048, 4096, 8192), seeds=4, n_test=2048,
             bootstrap=200)


# ------------------------------------------------------------------------------------ task

def make_teacher(d_in: int, d_out: int, decay: float, seed: int = 0) -> Tensor:
    """(d_out, d_in) float64 weight with singular values k^-decay, k = 1..min(d_in, d_out)."""
    g = torch.Generator().manual_seed(seed)
    m = min(d_in, d_out)
    left, _ = torch.linalg.qr(torch.randn(d_out, m, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d_in, m, generator=g, dtype=torch.float64))
    s = torch.arange(1, m + 1, dtype=torch.float64) ** (-float(decay))
    return (left * s) @ right.t()


class ReducedRankFit:
    """Rank-constrained least squares (reduced-rank regression) of Y on X, for every rank at once.

    Built from sufficient statistics: ``xx = X^T X`` (d_in, d_in), ``xy = X^T Y`` (d_in, d_out),
    ``yy = ||Y||_F^2`` and the row count n. The rank-r solution is ``U_r V_r`` with
    ``U_r = B Q_r``, ``V_r = Q_r^T``: B the least-squares map, Q the eigenvectors of
    ``(XB)^T (XB) = B^T X^T Y`` (descending eigenvalues ``lam``).
    """

    def __init__(self, xx: Tensor, xy: Tensor, yy: float, n: int):
        xx, xy = xx.to(torch.float64), xy.to(torch.float64)
        self.d_in, self.d_out = xy.shape
        self.n, self.yy = n, float(yy)
        self.B = torch.linalg.solve(xx, xy)
        fitted_gram = self.B.t() @ xy
        lam, Q = torch.linalg.eigh((fitted_gram + fitted_gram.t()) / 2)
        self.lam, self.Q = lam.flip(0).clamp_min(0), Q.flip(1)
        self.max_rank = min(self.d_in, self.d_out)

    @classmethod
    def from_data(cls, X: Tensor, Y: Tensor) -> "ReducedRankFit":
        X, Y = X.to(torch.float64), Y.to(torch.float64)
        return cls(X.t() @ X, X.t() @ Y, Y.square().sum().item(), X.shape[0])

    def _check(self, ranks) -> Tensor:
        r = torch.as_tensor(list(ranks), dtype=torch.long)
        if len(r) == 0 or r.min() < 1 or r.max() > self.max_rank:
            raise ValueError(f"ranks must lie in 1..{self.max_rank}, got {list(ranks)}")
        return r

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """U (d_in, rank), V (rank, d_out), float64."""
        self._check([rank])
        Qr = self.Q[:, :rank]
        return self.B @ Qr, Qr.t().contiguous()

    def student(self, rank: int, dtype: torch.dtype = torch.float64) -> LowRankLinear:
        """The fitted rank-``rank`` student as a ``LowRankLinear`` (bias-free)."""
        U, V = self.factors(rank)
        layer = LowRankLinear(self.d_in, self.d_out, rank, bias=False, dtype=dtype)
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
        return layer

    def train_losses(self, ranks) -> Tensor:
        """Training MSE (mean over samples and outputs) at each rank: (||Y||^2 - sum_{k<=r} lam_k) / (n d_out),
        since the rank-r fit is an orthogonal projection of Y."""
        r = self._check(ranks)
        kept = torch.cumsum(self.lam, 0)[r - 1]
        return (self.yy - kept).clamp_min(0) / (self.n * self.d_out)

    def heldout_losses(self, x: Tensor, y: Tensor, ranks) -> Tensor:
        """MSE of the rank-r students on (x, y) at each rank, from one full-rank pass.

        In the orthonormal basis Q of the output space, the rank-r student predicts the first r
        coordinates ``H = x B Q`` and zero for the rest, so with ``T = y Q`` the squared error is
        ``sum_{k<=r} ||T_k - H_k||^2 + sum_{k>r} ||T_k||^2`` (an identity: tests compare it with
        ``student(r)(x)`` at every rank).
        """
        r = self._check(ranks)
        x, y = x.to(torch.float64), y.to(torch.float64)
        H = x @ (self.B @ self.Q)
        T = y @ self.Q
        miss = torch.cumsum((T - H).square().sum(0), 0)
        tail = T.square().sum(0)
        rest = tail.sum() - torch.cumsum(tail, 0)
        return (miss + rest)[r - 1] / (x.shape[0] * self.d_out)


# ------------------------------------------------------------------------------------ sweep

def run_sweep(cfg: SweepConfig, progress: bool = True) -> list[dict]:
    """Rows of CSV_FIELDS for every (decay, n, rank, seed)."""
    from tqdm.auto import tqdm

    ranks = cfg.rank_grid()
    teachers = {a: make_teacher(cfg.d_in, cfg.d_out, a, cfg.teacher_seed) for a in cfg.decays}
    rows = []
    with tqdm(total=cfg.seeds * len(cfg.ns) * len(cfg.decays), desc="rank sweep", disable=not progress) as bar:
        for seed in range(cfg.seeds):
            g = torch.Generator().manual_seed(1_000 + seed)
            x_test = torch.randn(cfg.n_test, cfg.d_in, generator=g, dtype=torch.float64)
            y_test = {a: x_test @ W.t() for a, W in teachers.items()}
            xx = torch.zeros(cfg.d_in, cfg.d_in, dtype=torch.float64)
            xy = {a: torch.zeros(cfg.d_in, cfg.d_out, dtype=torch.float64) for a in cfg.decays}
            yy = {a: 0.0 for a in cfg.decays}
            done = 0
            for n in cfg.ns:
                while done < n:  # extend the nested training set to n samples
                    b = min(cfg.block, n - done)
                    x = torch.randn(b, cfg.d_in, generator=g, dtype=torch.float64)
                    noise = torch.randn(b, cfg.d_out, generator=g, dtype=torch.float64) * cfg.noise
                    xx += x.t() @ x
                    for a, W in teachers.items():
                        y = x @ W.t() + noise
                        xy[a] += x.t() @ y
                        yy[a] += y.square().sum().item()
                    done += b
                for a in cfg.decays:
                    fit = ReducedRankFit(xx, xy[a], yy[a], n)
                    train = fit.train_losses(ranks).tolist()
                    held = fit.heldout_losses(x_test, y_test[a], ranks).tolist()
                    rows.extend(dict(decay=a, n=n, rank=r, seed=seed, train_loss=t, heldout_loss=h)
                                for r, t, h in zip(ranks, train, held))
                    bar.update()
    return rows


# ------------------------------------------------------------------------------------ analysis

def _curves(rows: list[dict], decay: float) -> tuple[list[int], list[int], list[int], Tensor]:
    """(ns, seeds, ranks, held-out losses as a tensor [n, seed, rank]) for one decay."""
    sel = [r for r in rows if r["decay"] == decay]
    ns = sorted({r["n"] for r in sel})
    seeds = sorted({r["seed"] for r in sel})
    ranks = sorted({r["rank"] for r in sel})
    idx_n, idx_s, idx_r = ({v: i for i, v in enumerate(x)} for x in (ns, seeds, ranks))
    loss = torch.full((len(ns), len(seeds), len(ranks)), float("nan"), dtype=torch.float64)
    for r in sel:
        loss[idx_n[r["n"]], idx_s[r["seed"]], idx_r[r["rank"]]] = r["heldout_loss"]
    if torch.isnan(loss).any():
        raise ValueError(f"decay {decay}: the sweep is incomplete (missing (n, seed, rank) rows)")
    return ns, seeds, ranks, loss


def fit_power_law(ns, rs) -> tuple[float, float, float]:
    """Least squares ``log r = a + b log n``: (a, b, standard error of b; nan with < 3 points)."""
    x = torch.log(torch.as_tensor(ns, dtype=torch.float64))
    y = torch.log(torch.as_tensor(rs, dtype=torch.float64))
    k = len(x)
    if k < 2:
        return float("nan"), float("nan"), float("nan")
    xm, ym = x.mean(), y.mean()
    sxx = ((x - xm) ** 2).sum()
    b = (((x - xm) * (y - ym)).sum() / sxx).item()
    a = (ym - b * xm).item()
    if k < 3:
        return a, b, float("nan")
    resid = y - (a + b * x)
    se = math.sqrt((resid.square().sum() / (k - 2) / sxx).item())
    return a, b, se


def _interior(ns, rstar, full):
    keep = [(n, r) for n, r in zip(ns, rstar) if 1 < r < full]
    return [n for n, _ in keep], [r for _, r in keep]


def _sqrt_constant(ns, rs) -> float:
    """c in r = c sqrt(n), least squares in log space with the slope fixed at 1/2."""
    if not ns:
        return float("nan")
    return math.exp(sum(math.log(r) - 0.5 * math.log(n) for n, r in zip(ns, rs)) / len(ns))


def analyze(rows: list[dict], full_rank: int, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per decay: r*(n) of the seed-averaged held-out loss, losses at rank 1 / r* / full rank, the fitted
    exponent b (regression standard error and bootstrap over seeds) and c for r = c sqrt(n)."""
    out = {}
    for decay in dict.fromkeys(r["decay"] for r in rows):  # in order of first appearance
        ns, seeds, ranks, loss = _curves(rows, decay)
        rank_t = torch.as_tensor(ranks)
        mean = loss.mean(1)  # [n, rank]
        best = mean.argmin(1)
        rstar = rank_t[best].tolist()
        i_ns, i_rs = _interior(ns, rstar, full_rank)
        a, b, se = fit_power_law(i_ns, i_rs)
        c = _sqrt_constant(i_ns, i_rs)
        # bootstrap over seeds: resample seeds with replacement, redo the arg-min and the fit
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(len(seeds), (bootstrap, len(seeds)), generator=g)
        boot_best = rank_t[loss[:, pick].mean(2).argmin(2)]  # [n, bootstrap]
        bs, cs = [], []
        for j in range(bootstrap):
            bn, br = _interior(ns, boot_best[:, j].tolist(), full_rank)
            if len(bn) >= 2:
                bs.append(fit_power_law(bn, br)[1])
                cs.append(_sqrt_constant(bn, br))
        bt = torch.tensor(bs, dtype=torch.float64) if bs else torch.tensor([float("nan")], dtype=torch.float64)
        ct = torch.tensor(cs, dtype=torch.float64) if cs else torch.tensor([float("nan")], dtype=torch.float64)
        q = lambda t, p: torch.quantile(t, p).item() if len(t) > 1 else float("nan")
        per_n = []
        for i, n in enumerate(ns):
            per_n.append(dict(n=n, r_star=rstar[i], heldout_at_r_star=mean[i, best[i]].item(),
                              heldout_at_rank1=mean[i, 0].item(), heldout_at_full=mean[i, -1].item(),
                              interior=1 < rstar[i] < full_rank))
        out[decay] = dict(
            decay=decay, predicted_exponent=1 / (2 * decay), per_n=per_n, fit_points=len(i_ns),
            exponent=b, intercept=a, exponent_se=se,
            exponent_boot_std=bt.std().item() if len(bt) > 1 else float("nan"),
            exponent_boot_ci95=(q(bt, 0.025), q(bt, 0.975)), bootstrap_valid=len(bs),
            c_sqrt=c, c_sqrt_boot_ci95=(q(ct, 0.025), q(ct, 0.975)), seeds=len(seeds))
    return out


# ------------------------------------------------------------------------------------ output

def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "train_loss": f"{r['train_loss']:.7g}", "heldout_loss": f"{r['heldout_loss']:.7g}"})


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [dict(decay=float(r["decay"]), n=int(r["n"]), rank=int(r["rank"]), seed=int(r["seed"]),
                     train_loss=float(r["train_loss"]), heldout_loss=float(r["heldout_loss"]))
                for r in csv.DictReader(f)]


def plot(rows: list[dict], summary: dict, cfg: SweepConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = cfg.decays[0]
    ns, _, ranks, loss = _curves(rows, head)
    mean = loss.mean(1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(ns):
        col = cmap(i / max(1, len(ns) - 1))
        ax1.plot(ranks, mean[i].tolist(), color=col, lw=1.3, label=f"n={n}")
        j = int(mean[i].argmin())
        ax1.plot([ranks[j]], [mean[i, j].item()], "o", color=col, ms=5)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("rank r")
    ax1.set_ylabel("held-out MSE to teacher (mean over seeds)")
    ax1.set_title(f"decay {head}: held-out loss vs rank (dot = r*)", fontsize=9)
    ax1.legend(fontsize=7)
    markers = "osd^v<>"
    xs = torch.tensor([min(ns), max(ns)], dtype=torch.float64)
    for k, decay in enumerate(cfg.decays):
        s = summary[decay]
        pn = s["per_n"]
        line = ax2.plot([p["n"] for p in pn], [p["r_star"] for p in pn], markers[k % len(markers)], ms=6,
                        label=f"decay {decay}: b = {s['exponent']:.3f} ± {s['exponent_se']:.3f} s.e. "
                              f"(pred. {s['predicted_exponent']:.2f})")[0]
        cen = [p for p in pn if not p["interior"]]
        if cen:
            ax2.plot([p["n"] for p in cen], [p["r_star"] for p in cen], "x", color="k", ms=8)
        if math.isfinite(s["exponent"]):
            ax2.plot(xs.tolist(), torch.exp(s["intercept"] + s["exponent"] * xs.log()).tolist(), "-",
                     color=line.get_color(), lw=1)
    c = summary[head]["c_sqrt"]
    if math.isfinite(c):
        ax2.plot(xs.tolist(), (c * xs.sqrt()).tolist(), "--", color="gray", lw=1, label=f"{c:.3f} sqrt(n)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("training samples n")
    ax2.set_ylabel("best held-out rank r*")
    ax2.set_title("r* vs n (lines: fit on interior r*, x: censored at full rank)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(f"rank sweep: {cfg.d_out}x{cfg.d_in} linear teacher, label noise {cfg.noise}, "
                 f"{cfg.seeds} seeds, reduced-rank-regression students", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_summary(summary: dict) -> str:
    lines = []
    for decay, s in summary.items():
        lines.append(f"decay {decay} (teacher s_k = k^-{decay}; heuristic exponent 1/(2 decay) = "
                     f"{s['predicted_exponent']:.3f}), {s['seeds']} seeds")
        lines.append(f"  {'n':>7}  {'r*':>4}  {'held-out @1':>11}  {'@r*':>10}  {'@full':>10}")
        for p in s["per_n"]:
            flag = "" if p["interior"] else "  (censored, not fitted)"
            lines.append(f"  {p['n']:>7}  {p['r_star']:>4}  {p['heldout_at_rank1']:>11.4g}  "
                         f"{p['heldout_at_r_star']:>10.4g}  {p['heldout_at_full']:>10.4g}{flag}")
        lo, hi = s["exponent_boot_ci95"]
        lines.append(f"  fitted exponent b = {s['exponent']:.3f}  (regression s.e. {s['exponent_se']:.3f}; "
                     f"bootstrap over seeds: std {s['exponent_boot_std']:.3f}, 95% CI [{lo:.3f}, {hi:.3f}]; "
                     f"{s['fit_points']} points)")
        clo, chi = s["c_sqrt_boot_ci95"]
        lines.append(f"  r = c sqrt(n) with slope fixed at 1/2: c = {s['c_sqrt']:.4f} (95% CI [{clo:.4f}, {chi:.4f}])")
    return "\n".join(lines)


def machine() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def run(cfg: SweepConfig, out_dir: str, progress: bool = True, quiet: bool = False) -> dict:
    """Sweep, analyze, write ``rank_sweep.csv``, ``rank_sweep.png``, ``summary.json`` under ``out_dir``."""
    t0 = time.perf_counter()
    rows = run_sweep(cfg, progress=progress)
    summary = analyze(rows, min(cfg.d_in, cfg.d_out), bootstrap=cfg.bootstrap)
    seconds = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "rank_sweep.csv"))
    plot(rows, summary, cfg, os.path.join(out_dir, "rank_sweep.png"))
    meta = dict(date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), machine=machine(),
                threads=torch.get_num_threads(), seconds=round(seconds, 1), config=asdict(cfg),
                rank_grid=cfg.rank_grid(),
                results={str(k): v for k, v in summary.items()})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if not quiet:
        print(format_summary(summary))
        print(f"{machine()}, {torch.get_num_threads()} thread(s): {seconds:.1f} s")
        print(f"wrote {out_dir}/rank_sweep.csv, rank_sweep.png, summary.json")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rank_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke-test settings (seconds)")
    p.add_argument("--out", default="runs/rank_sweep", help="output folder (default: runs/rank_sweep)")
    p.add_argument("--seeds", type=int, help="seeds per (n, rank)")
    p.add_argument("--noise", type=float, help="label-noise std")
    p.add_argument("--decays", type=float, nargs="+", help="teacher spectra s_k = k^-decay; the first is the headline")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = dict(QUICK) if args.quick else {}
    for k in ("seeds", "noise", "decays"):
        if getattr(args, k) is not None:
            kw[k] = tuple(getattr(args, k)) if k == "decays" else getattr(args, k)
    try:
        cfg = SweepConfig(**kw)
    except ValueError as exc:
        p.error(str(exc))
    run(cfg, args.out, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
