"""Representation diagnostics (lrkd_fast.diagnostics): CKA and Gaussian MI against closed forms on
Gaussian data, their invariances, the MI estimator's bias on independent data, and the per-site
diagnostics of a teacher / student pair on tiny Hugging Face models."""
import copy
import json
import math

import pytest
import torch
import transformers as T

from lrkd_fast import LowRankClone, LowRankConfig, swap_linear_layers
from lrkd_fast.diagnostics import (canonical_correlations, format_diagnostics, gaussian_mutual_information,
                                   history_entry, linear_cka, mutual_information_null_bias, plot_diagnostics,
                                   representation_diagnostics)

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _orth(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=F64))
    return q


def _correlated_pairs(rhos, n, seed):
    """X, Y (n, k): coordinate i of X and Y correlated rho_i, all other pairs independent."""
    g = _gen(seed)
    rhos = torch.tensor(rhos, dtype=F64)
    x = torch.randn(n, len(rhos), generator=g, dtype=F64)
    y = rhos * x + (1 - rhos ** 2).sqrt() * torch.randn(n, len(rhos), generator=g, dtype=F64)
    return x, y


# ------------------------------------------------------------------------------------ mutual information

@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9, -0.75])
def test_bivariate_mi_closed_form(rho):
    x, y = _correlated_pairs([rho], 200_000, seed=1)
    exact = -0.5 * math.log(1 - rho ** 2)
    got = gaussian_mutual_information(x, y, ridge=0.0)
    # sampling sd of the estimate ~ |rho| / sqrt(n) ~ 0.002; bias 1 / (2n)
    assert abs(got - exact) < 0.01, (got, exact)


def test_multivariate_mi_is_the_sum_over_canonical_pairs_under_rotations():
    rhos = [0.95, 0.8, 0.5, 0.2, 0.0]
    x, y = _correlated_pairs(rhos, 200_000, seed=2)
    # rotating each side mixes the coordinates; MI and the canonical correlations do not change
    xr, yr = x @ _orth(5, 3), 2.5 * (y @ _orth(5, 4))
    exact = sum(-0.5 * math.log(1 - r ** 2) for r in rhos)
    assert abs(gaussian_mutual_information(xr, yr, ridge=0.0) - exact) < 0.02
    rho = canonical_correlations(xr, yr, components=5, ridge=0.0)
    assert torch.allclose(rho, torch.tensor(rhos, dtype=F64), atol=0.01)


def test_mi_of_a_noisy_linear_map_matches_the_log_det_formula():
    """Y = X A + E, X ~ N(0, S), E ~ N(0, s^2 I): I = 1/2 log det(A^T S A + s^2 I) / det(s^2 I).
    (Same widths: with k = d components on both sides nothing is truncated.)"""
    n, dx, dy, s = 200_000, 5, 5, 0.7
    g = _gen(5)
    L = torch.randn(dx, dx, generator=g, dtype=F64) / math.sqrt(dx) + torch.eye(dx, dtype=F64)
    S = L @ L.t()
    A = torch.randn(dx, dy, generator=g, dtype=F64) / math.sqrt(dx)
    x = torch.randn(n, dx, generator=g, dtype=F64) @ L.t()
    y = x @ A + s * torch.randn(n, dy, generator=g, dtype=F64)
    cov_y = A.t() @ S @ A + s ** 2 * torch.eye(dy, dtype=F64)
    exact = 0.5 * (torch.logdet(cov_y) - dy * math.log(s ** 2)).item()
    assert abs(gaussian_mutual_information(x, y, components=5, ridge=0.0) - exact) < 0.02
    # any invertible linear map of one side leaves the MI (all components kept, no ridge) unchanged
    B = torch.randn(dx, dx, generator=g, dtype=F64) + 3 * torch.eye(dx, dtype=F64)
    assert abs(gaussian_mutual_information(x @ B, y, components=5, ridge=0.0) - exact) < 0.02


def test_components_keep_the_top_principal_directions():
    """X has 3 high-variance coordinates correlated with Y and 5 low-variance ones that are not:
    3 components see the whole dependence."""
    n = 100_000
    x3, y3 = _correlated_pairs([0.9, 0.7, 0.4], n, seed=6)
    g = _gen(7)
    x = torch.cat([10 * x3, 0.1 * torch.randn(n, 5, generator=g, dtype=F64)], 1) @ _orth(8, 8)
    y = torch.cat([y3, 0.1 * torch.randn(n, 5, generator=g, dtype=F64)], 1)
    exact = sum(-0.5 * math.log(1 - r ** 2) for r in (0.9, 0.7, 0.4))
    assert abs(gaussian_mutual_information(x, y, components=3, ridge=0.0) - exact) < 0.02


def test_mi_bias_on_independent_data_matches_bartlett_and_shrinks_with_n():
    """Independent X, Y: the true MI is 0, the estimate's mean is p q / (2 (n - 1 - (p + q + 1) / 2))."""
    k, trials = 5, 200
    for n, seed in ((200, 10), (2000, 11)):
        g = _gen(seed)
        est = torch.tensor([gaussian_mutual_information(torch.randn(n, 8, generator=g, dtype=F64),
                                                        torch.randn(n, 6, generator=g, dtype=F64),
                                                        components=k, ridge=0.0) for _ in range(trials)])
        ref = mutual_information_null_bias(n, k)
        # per trial the estimate is ~ chi2(25) / (2 dof): relative sd 0.28, over 200 trials 0.02
        assert abs(est.mean().item() / ref - 1) < 0.08, (n, est.mean().item(), ref)
        assert (est > 0).all()
    assert mutual_information_null_bias(200, k) > 9 * mutual_information_null_bias(2000, k)
    # the ridge shrinks every correlation: never a larger estimate than without it
    g = _gen(12)
    x, y = torch.randn(300, 8, generator=g, dtype=F64), torch.randn(300, 8, generator=g, dtype=F64)
    assert gaussian_mutual_information(x, y, 8, ridge=0.1) < gaussian_mutual_information(x, y, 8, ridge=0.0)


def test_mi_of_identical_inputs_is_set_by_the_ridge():
    g = _gen(13)
    x = torch.randn(5000, 4, generator=g, dtype=F64) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    lam = torch.linalg.eigvalsh(torch.cov(x.t())).flip(0)
    r = lam / (lam + 0.01 * lam.mean())
    exact = (-0.5 * torch.log1p(-r ** 2)).sum().item()
    assert gaussian_mutual_information(x, x.clone(), ridge=0.01) == pytest.approx(exact, rel=1e-9)
    assert math.isfinite(gaussian_mutual_information(x, x.clone(), ridge=0.0))  # capped, not infinite


# ------------------------------------------------------------------------------------ CKA

def test_cka_of_one_dimensional_data_is_the_squared_correlation():
    x, y = _correlated_pairs([0.6], 5000, seed=20)
    r = torch.corrcoef(torch.cat([x, y], 1).t())[0, 1].item()
    assert linear_cka(x, y) == pytest.approx(r ** 2, rel=1e-10)


def test_cka_matches_its_population_value_on_gaussian_data():
    """Y = X A + E: population CKA = ||S A||_F^2 / (||S||_F ||A^T S A + s^2 I||_F)."""
    n, dx, dy, s = 200_000, 6, 3, 0.5
    g = _gen(21)
    L = torch.randn(dx, dx, generator=g, dtype=F64) / math.sqrt(dx) + torch.eye(dx, dtype=F64)
    S = L @ L.t()
    A = torch.randn(dx, dy, generator=g, dtype=F64)
    x = torch.randn(n, dx, generator=g, dtype=F64) @ L.t()
    y = x @ A + s * torch.randn(n, dy, generator=g, dtype=F64)
    syy = A.t() @ S @ A + s ** 2 * torch.eye(dy, dtype=F64)
    exact = ((S @ A).square().sum() / (torch.linalg.matrix_norm(S) * torch.linalg.matrix_norm(syy))).item()
    assert linear_cka(x, y) == pytest.approx(exact, abs=5e-3)


def test_cka_invariances():
    g = _gen(22)
    x = torch.randn(400, 10, generator=g, dtype=F64)
    y = x[:, :6] @ torch.randn(6, 7, generator=g, dtype=F64) + torch.randn(400, 7, generator=g, dtype=F64)
    base = linear_cka(x, y)
    assert 0.05 < base < 0.95
    assert linear_cka(x @ _orth(10, 23), y) == pytest.approx(base, rel=1e-10)  # orthogonal transform
    assert linear_cka(x, 7.0 * y @ _orth(7, 24)) == pytest.approx(base, rel=1e-10)  # scaled and rotated
    assert linear_cka(x + 5.0, y - 3.0) == pytest.approx(base, rel=1e-9)  # translation (centered)
    assert linear_cka(y, x) == pytest.approx(base, rel=1e-12)  # symmetric
    assert linear_cka(x, 3.0 * x @ _orth(10, 25)) == pytest.approx(1.0, rel=1e-10)
    # not invariant to a general invertible map: an anisotropic scaling changes it
    stretch = torch.diag(torch.logspace(0, 2, 10, dtype=F64))
    assert linear_cka(x, x @ stretch) < 0.9
    assert linear_cka(x.float(), y.float()) == pytest.approx(base, rel=1e-5)  # float32 inputs accepted


# ------------------------------------------------------------------------------------ input checks

def test_inputs_are_validated_with_the_argument_named():
    x = torch.randn(50, 4)
    with pytest.raises(ValueError, match="X must be 2-D"):
        linear_cka(torch.randn(50), x)
    with pytest.raises(ValueError, match="Y must be 2-D"):
        gaussian_mutual_information(x, torch.randn(50, 4, 1))
    with pytest.raises(TypeError, match="X must have a floating dtype"):
        linear_cka(torch.ones(50, 4, dtype=torch.long), x)
    with pytest.raises(TypeError, match="Y must be a torch.Tensor"):
        linear_cka(x, x.numpy())
    with pytest.raises(ValueError, match="X is empty"):
        linear_cka(torch.randn(0, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(x, torch.randn(49, 4))
    with pytest.raises(ValueError, match="Y holds NaN"):
        linear_cka(x, torch.full((50, 4), float("nan")))
    with pytest.raises(ValueError, match="components must lie in 1..min"):
        gaussian_mutual_information(x, torch.randn(50, 3), components=4)
    with pytest.raises(ValueError, match="components must lie in 1..min"):
        gaussian_mutual_information(x, x, components=0)
    with pytest.raises(TypeError, match="components must be an int"):
        gaussian_mutual_information(x, x, components=2.0)
    with pytest.raises(ValueError, match="needs more than 8 samples"):
        gaussian_mutual_information(torch.randn(8, 4), torch.randn(8, 4), components=4)
    with pytest.raises(ValueError, match="ridge must be"):
        gaussian_mutual_information(x, x, ridge=-1.0)
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka(torch.ones(50, 4), x)
    with pytest.raises(ValueError, match="fewer than 4 directions"):
        gaussian_mutual_information(x[:, :1].repeat(1, 4), x, components=4, ridge=0.0)
    with pytest.raises(ValueError, match="n must be an int"):
        mutual_information_null_bias(0, 3)


# ------------------------------------------------------------------------------------ models

VOCAB = 80


def _tiny_bert():
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64)
    return T.BertModel(cfg).eval()


def _batches(n_batches=2, rows=6, seq=20, seed=0):
    g = _gen(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[: rows // 2, seq - 5:] = 0  # padded rows: those tokens are left out
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _block_outputs(model, batches, layer):
    """Unmasked token rows of block ``layer``'s output, from the model's own hidden_states."""
    rows = []
    with torch.no_grad():
        for b in batches:
            h = model(**b, output_hidden_states=True).hidden_states[layer + 1]
            rows.append(h[b["attention_mask"].bool()])
    return torch.cat(rows)


def test_block_diagnostics_of_a_swapped_student_match_the_measures_on_its_hidden_states(eager_backend):
    teacher = _tiny_bert()
    student = copy.deepcopy(teacher)
    swap_linear_layers(student, LowRankConfig(rank=2))
    batches = _batches()
    diags = representation_diagnostics(teacher, student, batches, components=8)
    assert list(diags) == ["encoder.layer.0", "encoder.layer.1"]
    for i, (site, d) in enumerate(diags.items()):
        xt, xs = _block_outputs(teacher, batches, i), _block_outputs(student, batches, i)
        assert d.rows == xt.shape[0] == 2 * (6 * 20 - 3 * 5)
        # streamed moments over two batches == the measures on all rows at once
        assert d.cka == pytest.approx(linear_cka(xt, xs), rel=1e-9)
        assert d.mi == pytest.approx(gaussian_mutual_information(xt, xs, components=8), rel=1e-7)
        assert d.mi_null == pytest.approx(mutual_information_null_bias(d.rows, 8))
        assert 0 < d.cka < 1 and d.mi > d.mi_null
    table = format_diagnostics(diags)
    assert "encoder.layer.1" in table and "lowest CKA" in table
    assert not teacher.training and not student.training


def test_identical_student_has_cka_one_and_the_ridge_capped_mi():
    teacher = _tiny_bert()
    student = copy.deepcopy(teacher).train()
    diags = representation_diagnostics(teacher, student, _batches(), sites=["encoder.layer.1"], components=4)
    xt = _block_outputs(teacher, _batches(), 1)
    assert diags["encoder.layer.1"].cka == pytest.approx(1.0, abs=1e-9)
    assert diags["encoder.layer.1"].mi == pytest.approx(gaussian_mutual_information(xt, xt, 4), rel=1e-6)
    assert student.training  # mode restored


def test_clone_sites_of_an_identity_clone(eager_backend):
    """An identity Low-Rank Clone is its teacher: CKA 1 at every clone site; a narrower clone is not."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    teacher = T.LlamaForCausalLM(cfg).eval()
    batches = _batches(1, rows=4, seq=16)
    same = LowRankClone.from_teacher(teacher, 32, init="identity")
    diags = representation_diagnostics(None, same, batches, components=4)
    assert list(diags)[:7] == [f"layer0.{s}" for s in ("q", "k", "v", "gate", "up", "o", "down")]
    assert len(diags) == 14
    assert all(d.cka == pytest.approx(1.0, abs=1e-6) for d in diags.values())
    narrow = LowRankClone.from_teacher(teacher, 16)
    low = representation_diagnostics(teacher, narrow, batches, components=4)
    assert all(d.cka < 0.99 for d in low.values())
    with pytest.raises(ValueError, match="own teacher"):
        representation_diagnostics(_tiny_bert(), narrow, batches)


def test_model_diagnostics_validate_their_inputs():
    teacher = _tiny_bert()
    student = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match="batches is empty"):
        representation_diagnostics(teacher, student, [])
    with pytest.raises(ValueError, match="input_ids"):
        representation_diagnostics(teacher, student, [{"ids": 1}])
    with pytest.raises(ValueError, match="same object"):
        representation_diagnostics(teacher, teacher, _batches())
    with pytest.raises(ValueError, match="not a module of both"):
        representation_diagnostics(teacher, student, _batches(), sites=["encoder.nope"])
    with pytest.raises(ValueError, match="components must lie"):
        representation_diagnostics(teacher, student, _batches(), components=33)
    with pytest.raises(ValueError, match="needs more than"):
        representation_diagnostics(teacher, student, _batches(1, rows=1, seq=4), components=4)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        representation_diagnostics(None, student, _batches())


def test_history_entries_and_their_plot(tmp_path, eager_backend):
    teacher = _tiny_bert()
    student = copy.deepcopy(teacher)
    swap_linear_layers(student, LowRankConfig(rank=2))
    diags = representation_diagnostics(teacher, student, _batches(1), components=4)
    entries = [history_entry(0, diags), history_entry(10, diags)]
    assert entries[1]["step"] == 10 and entries[0]["sites"]["encoder.layer.0"]["cka"] == diags["encoder.layer.0"].cka
    json.dumps(entries)  # plain numbers only
    path = plot_diagnostics(entries, str(tmp_path / "sub" / "diagnostics.png"))
    assert (tmp_path / "sub" / "diagnostics.png").stat().st_size > 10_000 and path.endswith("diagnostics.png")
    with pytest.raises(ValueError, match="non-empty list"):
        plot_diagnostics([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="'step' and 'sites'"):
        plot_diagnostics([{"step": 0}], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="diags is empty"):
        history_entry(0, {})


# ------------------------------------------------------------------------------------ in training and eval

def test_distiller_logs_diagnostics_into_the_history_and_plots_them(tmp_path, eager_backend):
    from lrkd_fast import DistillConfig, Distiller

    teacher = _tiny_bert()
    student = copy.deepcopy(teacher)
    swap_linear_layers(student, LowRankConfig(rank=2))
    data, held = _batches(3, seed=1), _batches(1, seed=2)
    cfg = DistillConfig(steps=5, lr=1e-2, progress=False, diagnostics_every=2, diagnostics_components=4,
                        checkpoint_dir=str(tmp_path / "ck"))
    d = Distiller(student, teacher, cfg)
    try:
        start = representation_diagnostics(teacher, student, held, components=4)
        history = d.train(data, diagnostics_data=held)
    finally:
        d.close()
    entries = history["diagnostics"]
    assert [e["step"] for e in entries] == [0, 2, 4, 5]  # before training, every 2 steps, at the end
    assert list(entries[0]["sites"]) == ["encoder.layer.0", "encoder.layer.1"]
    assert entries[0]["sites"]["encoder.layer.1"]["cka"] == pytest.approx(start["encoder.layer.1"].cka, rel=1e-9)
    end = representation_diagnostics(teacher, student, held, components=4)  # measured again, after the run
    for site, v in entries[-1]["sites"].items():
        assert v["cka"] == pytest.approx(end[site].cka, rel=1e-6) and v["mi"] == pytest.approx(end[site].mi, rel=1e-5)
    assert entries[-1]["sites"]["encoder.layer.1"]["cka"] != entries[0]["sites"]["encoder.layer.1"]["cka"]
    assert history["diagnostics_plot"] == str(tmp_path / "ck" / "diagnostics.png")
    assert (tmp_path / "ck" / "diagnostics.png").stat().st_size > 10_000
    # without diagnostics_data: the first diagnostics_batches batches of the training data
    d2 = Distiller(copy.deepcopy(student), teacher, DistillConfig(steps=2, progress=False, diagnostics_every=5,
                                                                  diagnostics_batches=1, diagnostics_components=4))
    try:
        h2 = d2.train(data)
    finally:
        d2.close()
    assert [e["step"] for e in h2["diagnostics"]] == [0, 2] and "diagnostics_plot" not in h2
    assert "diagnostics" not in Distiller(copy.deepcopy(student), teacher,
                                          DistillConfig(steps=1, progress=False)).train(data)


def test_lrc_trainer_logs_clone_site_diagnostics(tmp_path, eager_backend):
    from lrkd_fast.clone import LRCTrainer
    from lrkd_fast.training import TrainConfig

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    clone = LowRankClone.from_teacher(T.LlamaForCausalLM(cfg).eval(), 16)
    plot = str(tmp_path / "lrc.png")
    tr = LRCTrainer(clone, TrainConfig(steps=2, lr=1e-2, progress=False, diagnostics_every=1,
                                       diagnostics_components=4, diagnostics_plot=plot))
    history = tr.train(_batches(2, rows=4, seq=16))
    assert [e["step"] for e in history["diagnostics"]] == [0, 1, 2]
    sites = history["diagnostics"][-1]["sites"]
    assert len(sites) == 14 and "layer1.down" in sites and all(0 <= v["cka"] <= 1 for v in sites.values())
    assert (tmp_path / "lrc.png").stat().st_size > 10_000


def test_diagnostics_settings_are_checked():
    from lrkd_fast.training import TrainConfig

    with pytest.raises(ValueError, match="diagnostics_every must be an int >= 0"):
        TrainConfig(diagnostics_every=-1)
    with pytest.raises(ValueError, match="diagnostics_batches must be an int >= 1"):
        TrainConfig(diagnostics_batches=0)
    with pytest.raises(ValueError, match="diagnostics_components must be None or an int >= 1"):
        TrainConfig(diagnostics_components=0)


def test_eval_prints_per_block_diagnostics(tmp_path, tiny_teacher_dir, small_text_file, capsys, eager_backend):
    from lrkd_fast.cli import main
    from lrkd_fast.recipes import evaluate_student
    from lrkd_fast.swap import save_lowrank

    teacher = T.AutoModel.from_pretrained(tiny_teacher_dir).eval()
    student = copy.deepcopy(teacher)
    swap_linear_layers(student, LowRankConfig(rank=4))
    out = str(tmp_path / "student")
    save_lowrank(student, out)
    rep = evaluate_student(out, teacher=tiny_teacher_dir, data=small_text_file, max_texts=64, batch_size=32,
                           speed_batches=1, repeats=1, diagnostics_texts=64)
    assert list(rep.diagnostics) == ["encoder.layer.0", "encoder.layer.1"]
    assert all(0 < d.cka <= 1 and d.mi > d.mi_null for d in rep.diagnostics.values())
    assert "lowest CKA" in rep.diagnostics_table()
    off = evaluate_student(out, teacher=tiny_teacher_dir, data=small_text_file, max_texts=8, speed_batches=1,
                           repeats=1, diagnostics_texts=0)
    assert off.diagnostics == {} and off.diagnostics_table() == ""
    assert main(["eval", out, "--teacher", tiny_teacher_dir, "--data", small_text_file, "--max-texts", "64",
                 "--speed-batches", "1", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "per block, teacher vs student" in printed and "encoder.layer.1" in printed
    with pytest.raises(ValueError, match="diagnostics_texts must be"):
        evaluate_student(out, teacher=tiny_teacher_dir, diagnostics_texts=-1)
