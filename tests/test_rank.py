"""Rank selection rules (lrkd_fast.rank) and the rank-sweep experiment (benchmarks/rank_sweep.py)."""
import csv
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lrkd_fast.benchmarks import rank_sweep as rs
from lrkd_fast.layers import LowRankLinear
from lrkd_fast.rank import (DEFAULT_SAMPLE_CONSTANT, rank_by_budget, rank_by_energy, rank_by_samples,
                            suggest_rank)
from lrkd_fast.rank import rank_for_fraction


def _orth(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _with_singular_values(s, d_out, d_in, seed=0):
    """A dense (d_out, d_in) matrix whose singular values are exactly ``s`` (rotated diag)."""
    d = torch.zeros(d_out, d_in, dtype=torch.float64)
    d[range(len(s)), range(len(s))] = torch.tensor(s, dtype=torch.float64)
    return _orth(d_out, seed) @ d @ _orth(d_in, seed + 1).t()


# ------------------------------------------------------------------------------------ energy rule

# singular values 4, 2, 1, 0.5: energies 16, 4, 1, 0.25 of 21.25
ENERGY_CASES = [(0.5, 1), (16 / 21.25, 1), (0.76, 2), (20 / 21.25, 2), (0.95, 3), (21 / 21.25, 3), (0.99, 4), (1.0, 4)]


@pytest.mark.parametrize("energy,expected", ENERGY_CASES)
def test_energy_rule_known_spectrum(energy, expected):
    w = _with_singular_values([4.0, 2.0, 1.0, 0.5], 7, 5)
    assert rank_by_energy(w, energy) == expected
    if energy not in (16 / 21.25, 20 / 21.25, 21 / 21.25, 1.0):  # float32 rounding moves exact boundaries
        assert rank_by_energy(w.float(), energy) == expected  # float32 input: computed in float64
    assert rank_by_energy(w.t(), energy) == expected  # transposed: same spectrum
    assert rank_by_energy([0.5, 4.0, 1.0, 2.0], energy) == expected  # singular values, any order
    assert suggest_rank(w, energy=energy) == expected


def test_energy_rule_edge_cases():
    assert rank_by_energy([3.0, 0.0, 0.0], 1.0) == 1  # zero tail: numerical rank
    assert rank_by_energy(torch.zeros(4, 3), 0.9) == 1  # no energy at all
    assert rank_by_energy(torch.eye(6), 0.5) == 3  # flat spectrum: ceil(0.5 * 6)
    assert rank_by_energy(torch.eye(6), 0.51) == 4
    lin = nn.Linear(5, 8)
    with torch.no_grad():
        lin.weight.copy_(_with_singular_values([3.0, 1.0], 8, 5))
    assert rank_by_energy(lin, 0.85) == 1 and rank_by_energy(lin, 0.95) == 2
    assert suggest_rank(lin, energy=0.95) == 2
    low = LowRankLinear(16, 12, 4, dtype=torch.float64)  # a rank-4 product
    assert rank_by_energy(low, 1.0) == 4 and suggest_rank(low, keep=0.5) == rank_for_fraction(0.5, 16, 12)
    # default energy 0.9 on a 1/k spectrum: matches a direct cumulative count
    s = [1.0 / k for k in range(1, 41)]
    e = [v * v for v in s]
    want = next(r for r in range(1, 41) if sum(e[:r]) >= 0.9 * sum(e))
    assert rank_by_energy(s) == want == rank_by_energy(_with_singular_values(s, 50, 40))


# ------------------------------------------------------------------------------------ budget rule

SHAPES = [(1, 1), (1, 10), (3, 7), (64, 64), (768, 768), (768, 3072), (3072, 768), (4096, 11008), (17, 5)]


@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("keep", [0.01, 0.1, 0.25, 1 / 3, 0.5, 0.75, 1.0])
def test_budget_rule_matches_swap_and_definition(d_in, d_out, keep):
    r = rank_by_budget(d_in, d_out, keep)
    assert r == rank_for_fraction(keep, d_in, d_out)
    assert suggest_rank(shape=(d_out, d_in), keep=keep) == r
    # independent reference: the largest r with r (d_in + d_out) <= keep d_in d_out in exact arithmetic
    # (keep read as the fraction it stands for: 1/3, not the binary float just below it), in 1..min
    budget = Fraction(keep).limit_denominator(10 ** 6) * d_in * d_out
    feasible = [k for k in range(1, min(d_in, d_out) + 1) if k * (d_in + d_out) <= budget]
    assert r == (max(feasible) if feasible else 1)


def test_budget_rule_values():
    assert rank_by_budget(768, 768, 0.5) == 192  # 192 * 1536 = 0.5 * 768^2 exactly
    assert rank_by_budget(768, 3072, 0.25) == 153  # floor(0.25 * 768 * 3072 / 3840) = floor(153.6)
    assert rank_by_budget(10, 10, 0.01) == 1  # below one rank-1 layer: still 1


# ------------------------------------------------------------------------------------ sample rule

def test_sample_rule_sqrt_scaling_and_caps():
    big = 10 ** 6
    for n in (16, 100, 1000, 4321, 10 ** 5):
        r1, r4 = rank_by_samples(n, big, big), rank_by_samples(4 * n, big, big)
        assert abs(r4 - 2 * r1) <= 1, (n, r1, r4)  # sqrt(n): 4x the samples, 2x the rank
        assert abs(r1 - max(1.0, DEFAULT_SAMPLE_CONSTANT * math.sqrt(n))) <= 0.5
    assert rank_by_samples(10_000, 500, 500, c=0.1) == 10
    assert rank_by_samples(2_500, 500, 500, c=0.1) == 5
    assert rank_by_samples(62_500, 500, 500, c=0.1) == 25
    assert rank_by_samples(225, 500, 500, c=0.1) == 2  # 1.5 rounds half up
    assert rank_by_samples(10 ** 8, 64, 256) == 64  # capped at min(d_in, d_out)
    assert rank_by_samples(10 ** 8, 256, 64) == 64
    assert rank_by_samples(10 ** 8, 256, 256, max_rank=40) == 40
    assert rank_by_samples(1, 256, 256) == 1  # round(0.068) = 0 -> at least 1
    assert rank_by_samples(1, 256, 256, min_rank=8) == 8
    assert rank_by_samples(1, 4, 6, min_rank=8) == 4  # the layer's limit wins over min_rank
    ranks = [rank_by_samples(n, 4096, 4096) for n in range(1, 200_000, 997)]
    assert ranks == sorted(ranks)  # non-decreasing in n


def test_suggest_rank_combines_rules():
    w = _with_singular_values([1.0 / k for k in range(1, 33)], 48, 32)
    e, b, s = rank_by_energy(w, 0.99), rank_by_budget(32, 48, 0.2), rank_by_samples(40_000, 32, 48)
    assert suggest_rank(w, energy=0.99, keep=0.2) == min(e, b)
    assert suggest_rank(w, energy=0.99, keep=0.2, n_samples=40_000) == min(e, b, s)
    assert suggest_rank(shape=(48, 32), n_samples=40_000) == s
    assert suggest_rank(shape=(48, 32), n_samples=40_000, c=0.01) == 2
    assert suggest_rank(w, energy=0.99, max_rank=3) == 3
    assert suggest_rank(w, keep=0.01, min_rank=4) == 4


# ------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("call,match", [
    (lambda: rank_by_energy(torch.eye(3), 0.0), "energy"),
    (lambda: rank_by_energy(torch.eye(3), 1.5), "energy"),
    (lambda: rank_by_energy(torch.eye(3), float("nan")), "energy"),
    (lambda: rank_by_energy(torch.eye(3), True), "energy"),
    (lambda: rank_by_energy(torch.ones(2, 2, 2), 0.9), "2-D"),
    (lambda: rank_by_energy(torch.tensor(3.0), 0.9), "2-D"),
    (lambda: rank_by_energy(torch.empty(0, 4), 0.9), "empty"),
    (lambda: rank_by_energy([], 0.9), "empty"),
    (lambda: rank_by_energy([1.0, -2.0], 0.9), ">= 0"),
    (lambda: rank_by_energy(torch.tensor([[1.0, float("inf")]]), 0.9), "non-finite"),
    (lambda: rank_by_energy("abc", 0.9), "weight_or_singular_values"),
    (lambda: rank_by_budget(64, 64, 0.0), "keep"),
    (lambda: rank_by_budget(64, 64, 1.01), "keep"),
    (lambda: rank_by_budget(0, 64, 0.5), "d_in"),
    (lambda: rank_by_budget(64, 2.5, 0.5), "d_out"),
    (lambda: rank_by_samples(0, 64, 64), "n_samples"),
    (lambda: rank_by_samples(10.0, 64, 64), "n_samples"),
    (lambda: rank_by_samples(100, 64, 64, c=0), "c must"),
    (lambda: rank_by_samples(100, 64, 64, c=float("inf")), "c must"),
    (lambda: rank_by_samples(100, 64, 64, min_rank=0), "min_rank"),
    (lambda: rank_by_samples(100, 64, 64, max_rank=0), "max_rank"),
    (lambda: suggest_rank(torch.eye(4)), "at least one rule"),
    (lambda: suggest_rank(keep=0.5), "shape"),
    (lambda: suggest_rank(shape=(4, 4), energy=0.9), "needs the weight"),
    (lambda: suggest_rank(torch.eye(4), shape=(4, 5), keep=0.5), "does not match"),
    (lambda: suggest_rank(shape=(4,), keep=0.5), "shape must"),
    (lambda: suggest_rank(shape=(4, 0), keep=0.5), "shape must"),
    (lambda: suggest_rank(torch.ones(3), keep=0.5), "weight must be 2-D"),
    (lambda: suggest_rank(torch.empty(0, 3), keep=0.5), "empty"),
])
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------ the sweep's student

def _data(n=200, d_in=12, d_out=9, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = rs.make_teacher(d_in, d_out, 1.0, seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    Y = X @ W.t() + noise * torch.randn(n, d_out, generator=g, dtype=torch.float64)
    Xt = torch.randn(300, d_in, generator=g, dtype=torch.float64)
    return W, X, Y, Xt, Xt @ W.t()


def test_teacher_spectrum():
    W = rs.make_teacher(20, 30, 1.5, seed=3)
    assert W.shape == (30, 20)
    want = torch.arange(1, 21, dtype=torch.float64) ** -1.5
    assert torch.allclose(torch.linalg.svdvals(W), want, atol=1e-12)


def test_reduced_rank_fit_matches_explicit_students():
    W, X, Y, Xt, Yt = _data()
    fit = rs.ReducedRankFit.from_data(X, Y)
    ranks = list(range(1, 10))
    train, held = fit.train_losses(ranks), fit.heldout_losses(Xt, Yt, ranks)
    for i, r in enumerate(ranks):
        student = fit.student(r)
        assert isinstance(student, LowRankLinear) and student.rank == r
        with torch.no_grad():
            assert torch.allclose(train[i], (student(X) - Y).square().mean(), rtol=1e-9)
            assert torch.allclose(held[i], (student(Xt) - Yt).square().mean(), rtol=1e-9)
    assert (train[1:] <= train[:-1] + 1e-15).all()  # more rank never fits the training set worse
    ols = torch.linalg.lstsq(X, Y).solution  # full rank = ordinary least squares
    assert torch.allclose(fit.student(9).weight.t(), ols, atol=1e-10)


def test_reduced_rank_fit_is_what_training_converges_to():
    """The closed form is the global minimum of the training loss: gradient training of a
    LowRankLinear reaches it and never goes below."""
    _, X, Y, _, _ = _data(n=120, d_in=10, d_out=8, noise=0.5, seed=1)
    fit = rs.ReducedRankFit.from_data(X, Y)
    for r in (1, 3):
        best = fit.train_losses([r]).item()
        layer = LowRankLinear(10, 8, r, bias=False, dtype=torch.float64)
        opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (layer(X) - Y).square().mean()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        with torch.no_grad():
            trained = (layer(X) - Y).square().mean().item()
        assert best <= trained * (1 + 1e-9)
        assert trained <= best * (1 + 1e-6), (r, trained, best)


def test_fit_power_law_exact():
    ns = [100, 400, 1600, 6400]
    a, b, se = rs.fit_power_law(ns, [0.3 * n ** 0.5 for n in ns])
    assert abs(b - 0.5) < 1e-12 and abs(math.exp(a) - 0.3) < 1e-12 and se < 1e-9


# ------------------------------------------------------------------------------------ the sweep end to end

def test_small_sweep_has_interior_optimum_and_writes_files(tmp_path):
    torch.set_num_threads(1)
    cfg = rs.SweepConfig(d_in=32, d_out=32, decays=(1.0,), noise=0.5, ns=(256, 512, 1024), seeds=2, n_test=512,
                         bootstrap=20)
    summary = rs.run(cfg, str(tmp_path), progress=False, quiet=True)
    grid = cfg.rank_grid()
    assert grid[0] == 1 and grid[-1] == 32
    s = summary[1.0]
    for p in s["per_n"]:
        # an interior optimum exists: strictly better than both rank 1 and full rank
        assert 1 < p["r_star"] < 32, p
        assert p["heldout_at_r_star"] < p["heldout_at_rank1"] and p["heldout_at_r_star"] < p["heldout_at_full"], p
    rstar = [p["r_star"] for p in s["per_n"]]
    assert rstar == sorted(rstar)  # more data, no smaller rank
    assert math.isfinite(s["exponent"]) and 0 < s["exponent"] < 1.5
    with open(tmp_path / "rank_sweep.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == rs.CSV_FIELDS == ["decay", "n", "rank", "seed", "train_loss", "heldout_loss"]
        rows = list(reader)
    assert len(rows) == len(cfg.ns) * cfg.seeds * len(grid)
    back = rs.read_csv(str(tmp_path / "rank_sweep.csv"))
    again = rs.analyze(back, 32, bootstrap=20)[1.0]
    assert [p["r_star"] for p in again["per_n"]] == rstar  # the CSV alone reproduces the result
    assert (tmp_path / "rank_sweep.png").stat().st_size > 10_000
    assert (tmp_path / "summary.json").exists()


def test_sweep_cli_quick(tmp_path, capsys):
    assert rs.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "fitted exponent" in capsys.readouterr().out
    assert (tmp_path / "rank_sweep.csv").exists() and (tmp_path / "rank_sweep.png").exists()


def test_sweep_config_validation():
    with pytest.raises(ValueError, match="d_in"):
        rs.SweepConfig(d_in=64, ns=(32, 128))
    with pytest.raises(ValueError, match="ranks"):
        rs.SweepConfig(d_in=8, d_out=8, ns=(64, 128), ranks=(1, 9))
    with pytest.raises(ValueError, match="noise"):
        rs.SweepConfig(noise=-1.0)
