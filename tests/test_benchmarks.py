"""The benchmark runner: every provider is checked against eager; CSV schema and plot are written."""
import csv

from lrkd_fast.benchmarks import runner


def test_runner_small_all_ops(tmp_path):
    rows = runner.run(device="cpu", small=True, out_dir=str(tmp_path), warmup=0, iters=1, quiet=True)
    assert {r.op for r in rows} == {"lowrank_linear", "clone_loss", "kd_loss"}
    for op in ("lowrank_linear", "clone_loss", "kd_loss"):
        assert {"eager", "torch.compile", "lrkd_fast"} <= {r.provider for r in rows if r.op == op}
    for r in rows:
        assert not r.note.startswith("error"), r
        assert r.max_rel_err is not None and r.max_rel_err < 1e-4, r  # lrkd_fast runs interpreted here
        assert r.median_ms is not None and r.median_ms > 0
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == runner.CSV_FIELDS
        assert len(list(reader)) == len(rows)
    assert (tmp_path / "results.png").stat().st_size > 1000
    table = runner.format_table(rows)
    assert "lowrank_linear" in table and "x eager" in table


def test_cli_rejects_unknown_op(capsys):
    from lrkd_fast.cli import main

    assert main(["bench", "--ops", "no_such_op", "--out", "/tmp/lrkd_fast_bench_none"]) == 2
    assert "no benchmark case matches" in capsys.readouterr().err
