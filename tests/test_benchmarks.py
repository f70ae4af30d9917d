"""The benchmark runner: every provider is checked against eager; CSV schema, plot and roofline."""
import csv

import pytest

from lrkd_fast.benchmarks import runner
from lrkd_fast.ops.cost_model import H200


def test_runner_small_all_ops(tmp_path):
    rows = runner.run(device="cpu", small=True, out_dir=str(tmp_path), warmup=0, iters=1, quiet=True)
    assert {r.op for r in rows} == {"lowrank_linear", "clone_loss", "kd_loss"}
    for op in ("lowrank_linear", "clone_loss", "kd_loss"):
        assert {"eager", "torch.compile", "lrkd_fast"} <= {r.provider for r in rows if r.op == op}
    # every path of the low-rank linear is checked, decode shapes included
    assert {"lrkd_fast[fused]", "lrkd_fast[two_gemm]", "lrkd_fast[decode]"} <= {r.provider for r in rows}
    assert any(r.shape.startswith("M1 ") for r in rows if r.op == "lowrank_linear")
    for r in rows:
        assert not r.note.startswith("error"), r
        assert r.max_rel_err is not None and r.max_rel_err < 1e-4, r  # lrkd_fast runs interpreted here
        if r.provider.startswith("lrkd_fast"):
            assert r.median_ms is None and r.note == runner.NOT_TIMED_CPU, r  # checked, never timed on CPU
        else:
            assert r.median_ms is not None and r.median_ms > 0
        assert r.sol_ms is not None and r.sol_ms > 0
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == runner.CSV_FIELDS
        assert len(list(reader)) == len(rows)
    assert (tmp_path / "results.png").stat().st_size > 1000
    table = runner.format_table(rows)
    assert "lowrank_linear" in table and "x eager" in table


def test_roofline_of_the_canonical_shapes():
    cases = runner.collect_cases("cuda", small=False, build_only=True)
    by_key = {(c.op, c.shape, c.mode): c for c in cases}
    fwd = by_key[("lowrank_linear", "M8192 d4096->4096 r256", "fwd")]
    # 2 M r (d_in + d_out) FLOPs at 782 TFLOP/s: 43.9 us, compute-bound
    assert fwd.sol_ms == pytest.approx(2 * 8192 * 256 * 8192 / H200.peak_flops * 1e3)
    decode = by_key[("lowrank_linear", "M1 d4096->4096 r256", "fwd")]
    # reading U and V (4 MB in bf16) at 4.25 TB/s: about 1 us
    assert decode.sol_ms == pytest.approx(decode.bytes / H200.bandwidth * 1e3)
    assert 0.9e-3 < decode.sol_ms < 1.1e-3
    text = runner.roofline_table(cases)
    assert "SoL us" in text and "43.9" in text and "kd_loss" in text


def test_cli_rejects_unknown_op_and_provider_listing_valid_names(capsys):
    from lrkd_fast.cli import main

    assert main(["bench", "--ops", "no_such_op", "--out", "/tmp/lrkd_fast_bench_none"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark case matches" in err and "valid ops: clone_loss, kd_loss, lowrank_linear" in err
    with pytest.raises(ValueError, match="valid: eager, torch.compile, lrkd_fast, liger, dense"):
        runner.run(device="cpu", small=True, providers=["cublas"], quiet=True)
