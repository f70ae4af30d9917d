"""pytest-benchmark suite over every runner case: ``pytest benchmarks/test_bench_ops.py`` (canonical shapes on a GPU,
small ones on CPU). Every provider's result is checked against eager before it is timed."""
import pytest
import torch

from lrkd_fast.benchmarks.runner import collect_cases, max_rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(c, p) for c in collect_cases(DEVICE, small=DEVICE == "cpu")
         for p in c.providers if p not in c.notes]


@pytest.mark.parametrize("case,provider", CASES, ids=[f"{c.op}-{c.shape}-{c.mode}-{p}" for c, p in CASES])
def test_op(benchmark, case, provider):
    benchmark.group = f"{case.op} {case.shape} {case.mode}"
    run, result = case.providers[provider]()
    if provider != "eager" and "(context)" not in provider:
        ref_run, ref_result = case.providers["eager"]()
        ref_run()
        run()
        assert max_rel_err(result(), ref_result()) < 5e-2

    def timed():
        run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(timed)
