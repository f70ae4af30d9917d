"""The LRC init comparison benchmark (benchmarks/lrc_init_compare.py) in a tiny setting."""
import csv
import math
import os
import tempfile

import pytest

from benchmarks import lrc_init_compare as lic


def test_config_eval_points():
    assert lic.CompareConfig(steps=100).eval_at == (0, 50, 100)
    assert lic.CompareConfig(steps=10, eval_at=(3,)).eval_at == (0, 3, 10)
    with pytest.raises(ValueError, match="eval_at"):
        lic.CompareConfig(steps=10, eval_at=(11,))
    with pytest.raises(ValueError, match="steps"):
        lic.CompareConfig(steps=0)


def test_quick_compare_writes_csv_and_both_inits_learn():
    import torch

    import lrkd_fast

    cfg = lic.quick_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark does; several threads on a shared machine are far slower
    try:
        # the benchmark runs the eager ops on CPU; conftest turns the (slow) Triton interpreter on
        with lrkd_fast.set_backend("eager"):
            result = lic.run_compare(cfg)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.csv")
        lic.write_csv(result, path)
        with open(path) as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == lic.CSV_FIELDS
            rows = list(reader)
        lic.plot(result, os.path.join(d, "out.png"))
        assert os.path.getsize(os.path.join(d, "out.png")) > 0
    assert {r["init"] for r in rows} == {"random", "pca"}
    for init in ("random", "pca"):
        mine = [r for r in rows if r["init"] == init]
        train = [float(r["loss"]) for r in mine if r["loss"]]
        assert len(train) == cfg.steps
        assert all(math.isfinite(x) and x > 0 for x in train), train
        for r in mine:
            if r["loss"]:
                parts = [float(r[k]) for k in lic.PART_FIELDS]
                assert all(math.isfinite(x) for x in parts), r
        # the 8 training texts form 2 batches that alternate: compare the first and last 3 steps
        assert sum(train[-3:]) / 3 < sum(train[:3]) / 3, (init, train)
        evals = [r for r in mine if r["heldout_mean_cos"]]
        assert [int(r["step"]) for r in evals] == [0, cfg.steps]
        for r in evals:
            assert all(math.isfinite(float(r[k])) for k in lic.EVAL_FIELDS), r
            assert -1.0 <= float(r["heldout_mean_cos"]) <= 1.0
    assert "random" in result.table() and "pca" in result.table()
