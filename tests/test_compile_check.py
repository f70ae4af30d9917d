"""The GPU compile-fitness check (benchmarks/compile_check.py) runs here, on CPU, without a GPU.

The check compiles real GPU code, so it runs in a subprocess without TRITON_INTERPRET (this test
process has the interpreter on, set by conftest.py when there is no GPU).
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import compile_check as cc  # noqa: E402

FIELDS = ("kernel", "config", "dtype", "arch", "ok", "regs", "spill_bytes", "shared_bytes", "uses_wgmma")


def _aot_supported():
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        return hasattr(JITFunction, "_pack_args")
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _aot_supported(), reason="this Triton lacks the JIT binder the check uses")


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_cli(out, *args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--out", str(out), *args],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _read(out):
    with open(os.path.join(out, cc.JSONL)) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, cc.SUMMARY)) as f:
        summary = json.load(f)
    return records, summary


@pytest.fixture(scope="module")
def default_check(tmp_path_factory):
    """The CI check: the CLI's default (full) matrix, run once for the tests below."""
    out = tmp_path_factory.mktemp("compile_check")
    r = _run_cli(out)
    records, summary = _read(out)
    return r, records, summary


@pytest.mark.slow
def test_default_check_covers_every_kernel(default_check):
    _, records, summary = default_check
    kernels = set(cc.discover_kernels())
    assert kernels, "no *_kernel found in lrkd_fast.kernels"
    assert summary["uncovered"] == []
    assert kernels <= {r["kernel"] for r in records}
    # the default is the full matrix the issue asks for
    assert set(summary["archs"]) == {"sm_90", "sm_80"}
    assert set(summary["dtypes"]) == {"bf16", "fp16", "fp32"}
    for k in kernels:
        mine = [r for r in records if r["kernel"] == k]
        assert {r["arch"] for r in mine} == {"sm_90", "sm_80"}, k
        assert {r["dtype"] for r in mine if r["arch"] == "sm_90"} == {"bf16", "fp16", "fp32"}, k


@pytest.mark.slow
def test_default_check_passes(default_check):
    r, _, summary = default_check
    report = cc.format_summary(summary)
    assert summary["ok"], report
    assert r.returncode == 0, report + "\n" + r.stderr[-3000:]
    assert not summary["failures"] and not summary["problems"], report


@pytest.mark.slow
def test_default_check_jsonl_fields(default_check):
    _, records, _ = default_check
    assert records
    for rec in records:
        for f in FIELDS:
            assert f in rec, (f, rec)
        assert rec["arch"] in ("sm_90", "sm_80") and rec["dtype"] in ("bf16", "fp16", "fp32")
        assert isinstance(rec["config"], dict) and "num_warps" in rec["config"] and "num_stages" in rec["config"]
        assert rec["shape"]
        if rec["ok"]:
            assert isinstance(rec["regs"], int) and 0 < rec["regs"] <= 255
            assert isinstance(rec["shared_bytes"], int) and isinstance(rec["spill_bytes"], int)
            assert isinstance(rec["uses_wgmma"], bool)
        else:
            assert rec["reasons"]
    # one line per compile: no (kernel, case, config, dtype, arch) twice
    keys = [(r["kernel"], r["case"], json.dumps(r["config"], sort_keys=True),
             json.dumps(r["constexprs"], sort_keys=True), r["dtype"], r["arch"]) for r in records]
    assert len(keys) == len(set(keys))


def test_oversized_config_is_reported_as_failing(tmp_path):
    """A chain-matmul config far past the resources of one SM must make the check fail."""
    big = {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4}
    records = cc.run_check(cases=["lowrank_fwd"], archs=("sm_90",), dtypes=("bf16",), out_dir=str(tmp_path),
                           inject={"_chain_kernel": [big]}, only_injected=True, verbose=False)
    summary = cc.run_check.last_summary
    assert not summary["ok"]
    injected = [r for r in records if r["chosen_by"] == "injected"]
    assert len(injected) == 1, records
    rec = injected[0]
    assert rec["kernel"] == "_chain_kernel" and rec["config"] == big
    assert rec["ok"] is False
    why = " ".join(rec["reasons"])
    assert "shared memory" in why or "spills" in why or "compile error" in why, rec["reasons"]
    assert any(f["config"] == big for f in summary["failures"])


def test_cli_exit_status_on_oversized_config(tmp_path):
    big = '{"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4}'
    r = _run_cli(tmp_path, "--cases", "lowrank_fwd", "--archs", "sm_90", "--dtypes", "bf16",
                 "--inject", f"_chain_kernel={big}", "--only-injected", timeout=600)
    assert r.returncode != 0
    assert "[injected]" in r.stdout and "FAIL" in r.stdout


def test_a_removed_case_leaves_kernels_uncovered(tmp_path):
    """Running only the KD case leaves every other kernel uncovered: the check must fail on that."""
    r = _run_cli(tmp_path, "--cases", "kd_rows", "--archs", "sm_90", "--dtypes", "fp32", timeout=600)
    records, summary = _read(tmp_path)
    assert {rec["kernel"] for rec in records} == {"_kd_loss_rows_kernel"}
    expected = set(cc.discover_kernels()) - {"_kd_loss_rows_kernel"}
    assert expected and set(summary["uncovered"]) == expected
    assert not summary["ok"] and r.returncode != 0
    assert "kernels no case compiled" in r.stdout


def test_discovery_finds_every_kernel_and_skips_helpers(tmp_path):
    """A new *_kernel (plain or autotuned) counts; @triton.jit helpers and other modules' kernels do not."""
    src = tmp_path / "fake_kernels.py"
    src.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl
        from lrkd_fast.kernels.kd_loss import _kd_loss_rows_kernel  # imported: not this module's

        @triton.jit
        def _helper(x):
            return x + 1

        @triton.jit
        def _fake_kernel(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), _helper(tl.arange(0, BLOCK)))

        @triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=[])
        @triton.jit
        def _tuned_kernel(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK))
    '''))
    spec = importlib.util.spec_from_file_location("fake_kernels", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert set(cc.discover_kernels([mod])) == {"_fake_kernel", "_tuned_kernel"}
    assert cc.uncovered_kernels({"_tuned_kernel"}, [mod]) == ["_fake_kernel"]
    assert cc.uncovered_kernels({"_tuned_kernel", "_fake_kernel"}, [mod]) == []
    # the package itself: every launched kernel module is scanned
    found = cc.discover_kernels()
    assert "_kd_loss_rows_kernel" in found and "_chain_kernel" in found
    assert all(name.endswith("_kernel") for name in found)


def test_ptxas_log_parsing():
    log = ("ptxas info    : Function properties for _chain_kernel\n"
           "    8 bytes stack frame, 168 bytes spill stores, 172 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    stats = cc._parse_ptxas(log)
    assert stats["regs"] == 255 and stats["spill_bytes"] == 340
    assert stats["spill_stores"] == 168 and stats["spill_loads"] == 172
    rec = dict(ok_compile=True, dtype="bf16", arch="sm_90", shared_bytes=1000, shared_limit=232448, **stats)
    assert any("spills" in x for x in cc._judge(rec))
    assert cc._judge({**rec, "dtype": "fp32"}) == []  # fp32 is reported, not failed
    assert any("shared memory" in x for x in cc._judge({**rec, "spill_bytes": 0, "shared_bytes": 300_000}))
    assert cc._judge({"ok_compile": False, "error": "boom", "dtype": "fp32"})[0].startswith("compile error")
