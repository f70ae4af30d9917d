"""Swapping low-rank layers into tiny Hugging Face models built from configs."""

import copy

import pytest
import torch
import transformers as T
from transformers.pytorch_utils import Conv1D

import lrkd_fast
from lrkd_fast import LowRankConfig, LowRankLinear, load_lowrank, merge_linear_layers, save_lowrank, swap_linear_layers
from lrkd_fast.rank import rank_for_fraction
from lrkd_fast.swap import whitened_factors
from tests.conftest import VOCAB, calib_batches as _calib, output_error, tiny

def _out(model, ids):
    with torch.no_grad():
        return model(ids)[0]


FAMILIES = ["llama", "qwen2", "gpt2", "bert"]
EXPECTED_LAYERS = {"llama": 14, "qwen2": 14, "gpt2": 8, "bert": 13}  # bert: 12 in blocks + pooler


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_swap_reproduces_outputs_and_round_trips(family, tmp_path):
    model = tiny(family).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    ref = _out(model, ids)
    dense_before = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    report = swap_linear_layers(model, LowRankConfig(rank="full"))
    assert len(report.layers) == EXPECTED_LAYERS[family]
    assert all(isinstance(model.get_submodule(l.name), LowRankLinear) for l in report.layers)
    assert max(l.rel_error for l in report.layers) < 1e-5
    # the output head stays dense under "all-linear"
    head = model.get_output_embeddings()
    if head is not None:
        assert isinstance(head, torch.nn.Linear)
    out = _out(model, ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # parameter count: every swapped layer holds r (d_in + d_out)
    for l in report.layers:
        m = model.get_submodule(l.name)
        assert sum(p.numel() for n, p in m.named_parameters() if n in ("U", "V")) == l.params_after
    # save/load is bit exact
    save_lowrank(model, str(tmp_path / "lr"))
    again = load_lowrank(str(tmp_path / "lr"))
    assert type(again) is type(model)
    assert torch.equal(_out(again, ids), out)
    # merge back to dense: the same layer kinds as before, loads with plain from_pretrained
    merge_linear_layers(model)
    for n, m in dense_before.items():
        assert type(model.get_submodule(n)) is type(m)
    torch.testing.assert_close(_out(model, ids), ref, atol=2e-5, rtol=1e-4)
    model.save_pretrained(str(tmp_path / "merged"))
    auto = T.AutoModelForCausalLM if family != "bert" else T.AutoModel
    plain = auto.from_pretrained(str(tmp_path / "merged")).eval()
    assert torch.equal(_out(plain, ids), _out(model, ids))


def test_fraction_rank_parameter_counts():
    model = tiny("llama")
    report = swap_linear_layers(model, LowRankConfig(rank=0.25))
    for l in report.layers:
        assert l.rank == rank_for_fraction(0.25, l.d_in, l.d_out)
        assert l.params_after <= 0.25 * l.params_before + 1e-9
    assert rank_for_fraction(0.5, 384, 1536) == 153
    assert report.params_after < 0.26 * report.params_before
    assert "total" in report.to_table()


def test_matching_rules():
    names = lambda cfg: [l.name for l in swap_linear_layers(tiny("llama"), cfg).layers]
    # list of suffixes
    got = names(LowRankConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    assert got == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    # regex over the full name
    got = names(LowRankConfig(rank=4, target_modules=r"model\.layers\.1\.mlp\..*"))
    assert got == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    # all-linear leaves the LM head alone; exclude_modules removes matches
    got = names(LowRankConfig(rank=4, exclude_modules=["k_proj", "o_proj"]))
    assert "lm_head" not in got and not any(n.endswith(("k_proj", "o_proj")) for n in got) and len(got) == 10
    got = names(LowRankConfig(rank=4, exclude_modules=r".*layers\.0\..*"))
    assert all(".layers.1." in n for n in got)
    # rank_pattern overrides
    model = tiny("llama")
    rep = swap_linear_layers(model, LowRankConfig(rank=4, rank_pattern={r"mlp\.down_proj": 2, "q_proj": 0.5}))
    ranks = {l.name: l.rank for l in rep.layers}
    assert ranks["model.layers.0.mlp.down_proj"] == 2
    assert ranks["model.layers.1.self_attn.q_proj"] == rank_for_fraction(0.5, 32, 32)
    assert ranks["model.layers.0.mlp.up_proj"] == 4


def test_bad_inputs():
    with pytest.raises(ValueError, match="target_modules .*'nope'.* match no module"):
        swap_linear_layers(tiny("llama"), LowRankConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D"):
        swap_linear_layers(torch.nn.Sequential(torch.nn.ReLU()), LowRankConfig())
    with pytest.raises(ValueError, match="rank must be in 1..min"):
        swap_linear_layers(tiny("llama"), LowRankConfig(rank=40))  # k_proj is 16 x 32
    with pytest.raises(ValueError, match="rank as a fraction"):
        LowRankConfig(rank=1.5)
    with pytest.raises(ValueError, match="init must be one of"):
        LowRankConfig(init="pca")
    with pytest.raises(ValueError, match="needs calibration"):
        swap_linear_layers(tiny("bert"), LowRankConfig(init="whitened"))
    with pytest.raises(ValueError, match="calibration data is empty"):
        swap_linear_layers(tiny("bert"), LowRankConfig(init="whitened"), calibration=[], progress=False)
    with pytest.raises(ValueError, match="no LowRankLinear layers"):
        merge_linear_layers(tiny("bert"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_lowrank("/nonexistent/path")


def test_load_rejects_plain_checkpoint(tmp_path):
    m = tiny("bert")
    m.save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lowrank_layout.json"):
        load_lowrank(str(tmp_path))


def test_whitened_factors_minimize_output_error():
    torch.manual_seed(0)
    # inputs with a strongly anisotropic covariance: whitening must beat plain SVD on outputs
    X = torch.randn(2000, 24, dtype=torch.float64) * torch.logspace(1, -2, 24, dtype=torch.float64)
    W = torch.randn(16, 24, dtype=torch.float64)
    gram = X.t() @ X / len(X)
    U, V = whitened_factors(W, gram, 4, damping=0.0)
    lin = torch.nn.Linear(24, 16, bias=False).double()
    lin.weight.data.copy_(W)
    svd = LowRankLinear.from_linear(lin, 4)
    err_w = (X @ W.t() - X @ U @ V).norm()
    err_s = (X @ W.t() - svd(X)).norm()
    assert err_w < 0.5 * err_s
    # optimality: the whitened error equals the tail of the singular values of W L
    L = torch.linalg.cholesky(gram)
    s = torch.linalg.svdvals(W @ L)
    assert torch.isclose(err_w / len(X) ** 0.5, s[4:].square().sum().sqrt(), rtol=1e-6)
    # rank-deficient inputs (a dead feature) stay finite thanks to damping
    X[:, 3] = 0
    U2, V2 = whitened_factors(W, X.t() @ X / len(X), 4)
    assert torch.isfinite(U2).all() and torch.isfinite(V2).all()


def test_whitened_swap_on_tiny_model_uses_masked_inputs():
    model = tiny("bert").eval()
    ids = torch.randint(0, VOCAB, (4, 12))
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0
    rep = swap_linear_layers(model, LowRankConfig(rank=8, init="whitened"),
                             calibration=[{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert rep.init == "whitened" and len(rep.layers) == EXPECTED_LAYERS["bert"]
    assert torch.isfinite(_out(model, ids)).all()


def test_swapped_model_runs_triton_backend():
    model = tiny("llama").eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    swap_linear_layers(model, LowRankConfig(rank=8))
    with lrkd_fast.set_backend("eager"):
        ref = _out(model, ids)
    with lrkd_fast.set_backend("triton"):
        out = _out(model, ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_sensitivity_allocation_keeps_the_budget_and_lowers_the_error(family):
    torch.manual_seed(0)
    ref = tiny(family).eval()
    calib = _calib()
    uni, sens = copy.deepcopy(ref), copy.deepcopy(ref)
    cfg = dict(rank=0.4, init="whitened", target_modules="all-linear")
    r_uni = swap_linear_layers(uni, LowRankConfig(**cfg), calibration=calib, progress=False)
    r_sens = swap_linear_layers(sens, LowRankConfig(allocation="sensitivity", **cfg), calibration=calib,
                                progress=False)
    assert r_sens.allocation == "sensitivity" and [l.name for l in r_sens.layers] == [l.name for l in r_uni.layers]
    assert r_sens.params_after <= r_uni.params_after
    assert len({l.rank for l in r_sens.layers}) > len({l.rank for l in r_uni.layers})  # ranks really moved
    for l in r_sens.layers:  # between 1 and the break-even rank
        assert 1 <= l.rank <= l.d_in * l.d_out // (l.d_in + l.d_out)
        assert isinstance(sens.get_submodule(l.name), LowRankLinear) and sens.get_submodule(l.name).rank == l.rank
    assert output_error(sens, ref, calib) < output_error(uni, ref, calib)


def test_sensitivity_allocation_leaves_exact_layers_and_checks_its_config():
    model = tiny("bert").eval()
    rep = swap_linear_layers(model, LowRankConfig(rank="full", init="whitened", allocation="sensitivity"),
                             calibration=_calib(), progress=False)
    assert all(l.rank == min(l.d_in, l.d_out) for l in rep.layers)  # nothing to trade at full rank
    with pytest.raises(ValueError, match="allocation must be one of"):
        LowRankConfig(allocation="greedy")
    with pytest.raises(ValueError, match="init='whitened'"):
        LowRankConfig(allocation="sensitivity", init="svd")
    with pytest.raises(ValueError, match="sensitivity_batches"):
        LowRankConfig(init="whitened", allocation="sensitivity", sensitivity_batches=0)
    with pytest.raises(ValueError, match="calibration"):
        swap_linear_layers(tiny("bert"), LowRankConfig(init="whitened", allocation="sensitivity"))


def test_sensitivity_ranks_and_initial_factors_agree_across_processes(tmp_path):
    # real torch.distributed (2 gloo processes): ranks measured on different data are replaced by rank 0's
    import json
    import os
    import socket
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "swap_ddp_worker.py")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), worker, str(tmp_path)],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    p0, p1 = json.loads((tmp_path / "ranks.json").read_text())
    assert p0["alone"] != p1["alone"]  # the processes really measured different ranks on their own
    assert p0["together"] == p1["together"] == p0["alone"]  # in the group, everyone uses rank 0's
    # the whitened factors differ too, until distillation starts from rank 0's values on every process
    assert p0["before"] != p1["before"]
    assert p0["after"] == p1["after"]


def test_cross_whitened_factors_are_the_best_low_rank_map_between_input_sets():
    # fit W x (dense inputs) from other inputs x' at rank r; reference: projection on span(X') + truncated SVD
    from lrkd_fast.swap.init import factors_at as _factors_at, whitened_svd as _whitened_svd

    torch.manual_seed(0)
    Xd = torch.randn(3000, 20, dtype=torch.float64) * torch.logspace(0.5, -1, 20, dtype=torch.float64)
    Xs = Xd + 0.6 * torch.randn_like(Xd) @ torch.randn(20, 20, dtype=torch.float64) / 20 ** 0.5
    W = torch.randn(12, 20, dtype=torch.float64)
    n = len(Xd)
    U, V = _factors_at(_whitened_svd(W, Xs.t() @ Xs / n, 0.0, cross=Xs.t() @ Xd / n), 5)
    Y = Xd @ W.t()
    Q, R = torch.linalg.qr(Xs)
    A, S, Bh = torch.linalg.svd(Q.t() @ Y, full_matrices=False)
    M_ref = torch.linalg.solve_triangular(R, (A[:, :5] * S[:5]) @ Bh[:5], upper=True)
    torch.testing.assert_close(U @ V, M_ref, rtol=1e-7, atol=1e-9)
    # better than the plain whitened factors, which assume the inputs did not change
    U0, V0 = whitened_factors(W, Xs.t() @ Xs / n, 5, damping=0.0)
    assert (Y - Xs @ U @ V).norm() < 0.9 * (Y - Xs @ U0 @ V0).norm()


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_whitened_init_lowers_the_output_error(family, eager_backend):
    torch.manual_seed(0)
    ref = tiny(family).eval()
    calib = _calib(n=64, seq=16, seed=1)
    held = _calib(n=32, seq=16, seed=2)
    plain, seq = copy.deepcopy(ref), copy.deepcopy(ref)
    cfg = dict(rank=0.4, init="whitened", target_modules="all-linear")
    r_plain = swap_linear_layers(plain, LowRankConfig(**cfg), calibration=calib, progress=False)
    r_seq = swap_linear_layers(seq, LowRankConfig(sequential=True, **cfg), calibration=calib, progress=False)
    assert [(l.name, l.rank) for l in r_seq.layers] == [(l.name, l.rank) for l in r_plain.layers]
    assert all(isinstance(seq.get_submodule(l.name), LowRankLinear) for l in r_seq.layers)
    # random tiny models: 7-17% lower on the calibration text, 7-16% on other text (measured)
    assert output_error(seq, ref, calib) < 0.95 * output_error(plain, ref, calib)
    assert output_error(seq, ref, held) < 0.95 * output_error(plain, ref, held)
    # the first layers of the first block read the dense model's own inputs: nothing to correct there
    first = r_seq.layers[0].name if family != "bert" else "encoder.layer.0.attention.self.query"
    a, b = plain.get_submodule(first), seq.get_submodule(first)
    torch.testing.assert_close(a.U @ a.V, b.U @ b.V, rtol=1e-4, atol=1e-6)
    # a later layer was really refitted
    a, b = plain.get_submodule(r_seq.layers[-2].name), seq.get_submodule(r_seq.layers[-2].name)
    assert not torch.allclose(a.U @ a.V, b.U @ b.V, atol=1e-4)
    if hasattr(ref.config, "use_cache"):
        assert seq.config.use_cache == ref.config.use_cache  # restored after the replay


def test_sequential_full_rank_reproduces_outputs_and_checks_its_config(eager_backend):
    torch.manual_seed(0)
    ref = tiny("llama").eval()
    model = copy.deepcopy(ref)
    calib = _calib(n=16, seq=16, seed=1)
    swap_linear_layers(model, LowRankConfig(rank="full", init="whitened", sequential=True, damping=0.0),
                       calibration=calib, progress=False)
    ids = calib[0]["input_ids"][:, :10]
    torch.testing.assert_close(_out(model, ids), _out(ref, ids), atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="init='whitened'"):
        LowRankConfig(sequential=True)
    with pytest.raises(TypeError, match="sequential"):
        LowRankConfig(init="whitened", sequential="yes")
    with pytest.raises(ValueError, match="inside the transformer blocks"):
        swap_linear_layers(tiny("bert"), LowRankConfig(init="whitened", sequential=True, target_modules=["pooler.dense"]),
                           calibration=calib, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        swap_linear_layers(tiny("bert"), LowRankConfig(init="whitened", sequential=True))


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_modules=r"encoder\.(query"), r"target_modules: 'encoder\\\\.\(query' is not a valid regular expression"),
    (dict(exclude_modules="[pooler"), r"exclude_modules: '\[pooler' is not a valid regular expression"),
    (dict(rank_pattern={"q_proj)": 2}), r"rank_pattern: 'q_proj\)' is not a valid regular expression"),
])
def test_invalid_regex_names_the_argument_and_the_pattern(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankConfig(**kwargs)
    with pytest.raises(TypeError, match="rank_pattern keys must be regex strings"):
        LowRankConfig(rank_pattern={3: 2})


def _dead_feature_mlp():
    """Linear(4, 6) -> ReLU -> Linear(6, 5) whose hidden feature 0 is always 0: the second layer's input
    Gram matrix is singular."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0
    return model


def test_rank_deficient_calibration_with_no_damping_names_the_layer():
    data = [torch.randn(64, 4)]
    feed = lambda m, b: m(b)
    with pytest.raises(ValueError, match=r"layer '2': .*not positive definite.*damping > 0"):
        swap_linear_layers(_dead_feature_mlp(), LowRankConfig(rank=2, init="whitened", damping=0.0),
                           calibration=data, forward=feed, progress=False)
    with pytest.raises(ValueError, match=r"layer '2': .*not positive definite"):
        swap_linear_layers(_dead_feature_mlp(), LowRankConfig(rank=2, init="whitened", damping=0.0,
                                                              allocation="sensitivity"),
                           calibration=data, forward=feed, progress=False)
    # with damping the same data is fine, and the dead input gets no weight
    model = _dead_feature_mlp()
    swap_linear_layers(model, LowRankConfig(rank=2, init="whitened"), calibration=data, forward=feed, progress=False)
    assert torch.isfinite(model[2].U).all() and torch.isfinite(model[2].V).all()
    # the function itself
    gram = torch.eye(6, dtype=torch.float64)
    gram[3, 3] = 0.0
    with pytest.raises(ValueError, match=r"layer 'fc': .*Cholesky failed at column 4 of 6"):
        whitened_factors(torch.randn(5, 6), gram, 2, damping=0.0, name="fc")


def test_nan_calibration_data_names_the_layer(eager_backend):
    model = tiny("bert").eval()
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[5] = float("nan")
    batch = _calib()
    batch[0]["input_ids"][0, 0] = 5
    with pytest.raises(ValueError, match=r"layer 'encoder\.layer\.0\.attention\.self\.query': .*NaN.*calibration data"):
        swap_linear_layers(model, LowRankConfig(init="whitened"), calibration=batch, progress=False)
    with pytest.raises(ValueError, match=r"whitened init: .*NaN"):
        whitened_factors(torch.randn(5, 6), torch.full((6, 6), float("nan")), 2)
