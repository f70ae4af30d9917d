"""The theory experiments (benchmarks/convergence.py, benchmarks/generalization.py): their closed forms
against independent references, and each script's --tiny run writing finite results."""
import csv
import json
import math
import os

import pytest
import torch

from lrkd_fast.benchmarks import convergence as cv
from lrkd_fast.benchmarks import generalization as gz
from lrkd_fast.benchmarks.rank_sweep import ReducedRankFit, make_teacher

F64 = torch.float64


# ------------------------------------------------------------------------------------ convergence

def test_population_loss_and_gradient_closed_forms():
    """f(U, V) = ||UV - W^T||^2 + m noise^2 against a Monte-Carlo mean, its gradient against autograd,
    and f* against the best rank-r student (truncated SVD)."""
    d, r, noise = 12, 3, 0.4
    W = make_teacher(d, d, 1.0)
    g = torch.Generator().manual_seed(0)
    U = torch.randn(d, r, generator=g, dtype=F64, requires_grad=True)
    V = torch.randn(r, d, generator=g, dtype=F64, requires_grad=True)
    x = torch.randn(400_000, d, generator=g, dtype=F64)
    y = x @ W.t() + noise * torch.randn(400_000, d, generator=g, dtype=F64)
    mc = ((x @ U @ V - y) ** 2).sum(1).mean().item()
    f = (U @ V - W.t()).square().sum() + d * noise ** 2
    assert mc == pytest.approx(f.item(), rel=1e-2)
    f.backward()
    G = (U @ V - W.t()).detach()
    assert torch.allclose(U.grad, 2 * G @ V.detach().t()) and torch.allclose(V.grad, 2 * U.detach().t() @ G)
    Us, S, Vh = torch.linalg.svd(W.t())
    best = (Us[:, :r] * S[:r]) @ Vh[:r]
    assert cv._optimum(W, r, noise) == pytest.approx(((best - W.t()).square().sum() + d * noise ** 2).item(), rel=1e-9)


def test_sgd_run_reaches_the_optimum_and_respects_it():
    cfg = cv.ConvergenceConfig(d_in=10, d_out=10, ranks=(2,), horizons=(100, 200, 400), seeds=3, batch=32, lr0=1.0)
    W = make_teacher(10, 10, 1.0)
    short = cv.sgd_run(W, 2, 100, cfg, 3)
    long = cv.sgd_run(W, 2, 1500, cfg, 3)
    assert (short["final_subopt"] >= -1e-9).all() and (long["final_subopt"] >= -1e-9).all()  # f* is a minimum
    assert (long["final_subopt"] < 0.01 * long["init_subopt"]).all()
    assert (long["avg_grad_norm_sq"] < 0.5 * short["avg_grad_norm_sq"]).all()
    dense = cv.sgd_run(W, 10, 1500, cfg, 3, dense=True)
    assert (dense["final_subopt"] < 0.05 * dense["init_subopt"]).all()


def test_convergence_tiny_run_writes_finite_results(tmp_path, capsys):
    assert cv.main(["--tiny", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "avg_grad_norm_sq" in capsys.readouterr().out
    with open(tmp_path / "convergence.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == cv.CSV_FIELDS
        rows = list(reader)
    cfg = cv.ConvergenceConfig(**cv.TINY)
    assert len(rows) == (len(cfg.ranks) + 1) * len(cfg.horizons) * cfg.seeds
    assert all(math.isfinite(float(r[k])) for r in rows for k in cv.CSV_FIELDS[4:])
    summary = json.loads((tmp_path / "summary.json").read_text())["results"]
    for s in summary.values():
        for m in cv.METRICS:
            assert math.isfinite(s["fits"][m]["exponent"]) and math.isfinite(s["fits"][m]["exponent_se"])
    again = cv.analyze(cv.read_csv(str(tmp_path / "convergence.csv")))  # the CSV alone reproduces the fit
    assert again["rank 2"]["fits"]["avg_grad_norm_sq"]["exponent"] == pytest.approx(
        summary["rank 2"]["fits"]["avg_grad_norm_sq"]["exponent"], rel=1e-5)
    assert (tmp_path / "convergence.png").stat().st_size > 10_000
    readme = (tmp_path / "README.md").read_text()
    assert "python -m benchmarks.convergence --tiny" in readme and f"{os.cpu_count()}-core CPU" in readme


def test_convergence_config_is_validated():
    with pytest.raises(ValueError, match="ranks must lie"):
        cv.ConvergenceConfig(d_in=8, d_out=8, ranks=(9,))
    with pytest.raises(ValueError, match="horizons must hold at least three"):
        cv.ConvergenceConfig(horizons=(10, 20))
    with pytest.raises(ValueError, match="lr0 must be > 0"):
        cv.ConvergenceConfig(lr0=0.0)
    with pytest.raises(SystemExit):
        cv.main(["--tiny", "--horizons", "8", "16"])


# ------------------------------------------------------------------------------------ generalization

def test_population_risk_matches_a_fresh_sample():
    d_out, d_in, noise = 8, 12, 0.5
    W = make_teacher(d_in, d_out, 1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, d_in, generator=g, dtype=F64)
    fit = ReducedRankFit.from_data(x, x @ W.t() + noise * torch.randn(200, d_out, generator=g, dtype=F64))
    ranks = [1, 3, 8]
    risk = gz.population_risk(fit, W, noise, ranks)
    xt = torch.randn(400_000, d_in, generator=g, dtype=F64)
    yt = xt @ W.t() + noise * torch.randn(400_000, d_out, generator=g, dtype=F64)
    for r, want in zip(ranks, risk.tolist()):
        U, V = fit.factors(r)
        assert ((xt @ U @ V - yt) ** 2).sum(1).mean().item() == pytest.approx(want, rel=1e-2)


def test_full_rank_gap_matches_the_least_squares_closed_form():
    """Full-rank least squares, Gaussian design: E[train] = m s^2 (N - d) / N and
    E[held-out] = m s^2 (1 + d / (N - d - 1)), so E[gap] = m s^2 (d / N + d / (N - d - 1))."""
    cfg = gz.GeneralizationConfig(shapes=((6, 10),), ns=(40, 160), seeds=400, noise=0.5)
    rows = gz.run_sweep(cfg, progress=False)
    for n in cfg.ns:
        gaps = torch.tensor([r["gap"] for r in rows if r["n"] == n and r["rank"] == 6], dtype=F64)
        want = 6 * 0.25 * (10 / n + 10 / (n - 11))
        # sampling: 400 seeds, the gap's relative sd per seed is ~0.3-0.5
        assert gaps.mean().item() == pytest.approx(want, rel=0.08), n


def test_generalization_tiny_run_writes_finite_results(tmp_path, capsys):
    assert gz.main(["--tiny", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "r(m+n)/sqrt(N)" in capsys.readouterr().out
    with open(tmp_path / "generalization.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == gz.CSV_FIELDS
        rows = list(reader)
    cfg = gz.GeneralizationConfig(**gz.TINY)
    assert len(rows) == sum(len(cfg.rank_grid(m, d)) for m, d in cfg.shapes) * len(cfg.ns) * cfg.seeds
    assert all(math.isfinite(float(r[k])) for r in rows for k in gz.CSV_FIELDS[5:])
    fits = json.loads((tmp_path / "summary.json").read_text())["results"]["fits"]
    for name in ("paper", "free", "parametric"):
        assert math.isfinite(fits[name]["constant"]) and math.isfinite(fits[name]["r2_log"])
    assert math.isfinite(fits["free"]["alpha"]) and math.isfinite(fits["free"]["beta"])
    again = gz.analyze(gz.read_csv(str(tmp_path / "generalization.csv")), cfg.noise)
    assert again["fits"]["free"]["beta"] == pytest.approx(fits["free"]["beta"], rel=1e-5)
    assert (tmp_path / "generalization.png").stat().st_size > 10_000
    assert "python -m benchmarks.generalization --tiny" in (tmp_path / "README.md").read_text()


def test_generalization_config_is_validated():
    with pytest.raises(ValueError, match="every n must exceed"):
        gz.GeneralizationConfig(shapes=((8, 32),), ns=(32, 64))
    with pytest.raises(ValueError, match="noise must be > 0"):
        gz.GeneralizationConfig(noise=0.0)
    with pytest.raises(ValueError, match="shapes must be"):
        gz.GeneralizationConfig(shapes=((8,),))


# ------------------------------------------------------------------------------------ cloning and information

def test_cloning_information_tiny_run_writes_finite_results(tmp_path, capsys, eager_backend):
    from lrkd_fast.benchmarks import cloning_information as ci

    assert ci.main(["--tiny", "--steps", "4", "--diag-every", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "raises MI at every block" in capsys.readouterr().out
    rows = ci.read_csv(str(tmp_path / "cloning_information.csv"))
    blocks = sorted({r["site"] for r in rows})
    assert blocks == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert len(rows) == len(ci.ARMS) * 3 * len(blocks)  # steps 0, 2, 4 per arm
    assert all(math.isfinite(r[k]) for r in rows for k in ("cka", "mi", "mi_null", "heldout_mean_cos"))
    assert all(0 <= r["cka"] <= 1 and r["mi"] > 0 for r in rows)
    # both arms start from the same swapped model: identical step-0 measurements
    start = {(r["site"], r["arm"]): r for r in rows if r["step"] == 0}
    for b in blocks:
        assert start[(b, "clone")]["mi"] == start[(b, "output only")]["mi"]
        assert start[(b, "clone")]["cka"] == start[(b, "output only")]["cka"]
    summary = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert set(summary["clone_minus_output"]) == set(blocks)
    for v in summary["predicts_fidelity"].values():
        assert -1 <= v["spearman"] <= 1
    assert (tmp_path / "cloning_information.png").stat().st_size > 10_000
    assert "python -m benchmarks.cloning_information --tiny" in (tmp_path / "README.md").read_text()
