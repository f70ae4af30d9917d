"""Compile-fitness check: every Triton kernel, compiled ahead of time for the GPU, on a CPU machine.

``python -m benchmarks.compile_check --out DIR`` drives the public launchers of
``lrkd_fast.kernels`` at the canonical shapes of the performance docs (LRC-1.5B: M 8192 tokens,
d 3072 -> 1536, FFN 8192, vocabulary 128256; the low-rank linear 4096 -> 4096 at r 256, and its
decode path at M 1 and 64), with no GPU and no Triton interpreter:

1. Each launcher runs on ``device="meta"`` tensors (shapes and strides, no memory) while
   ``JITFunction.run`` and ``Autotuner.run`` are patched to *record* the launch instead of
   running it, and ``torch.cuda`` reports the target GPU (H200: 132 SMs, 232,448 bytes of
   shared memory per block; A100: 108 SMs, 166,912), so launchers size their grids and blocks as
   they would there. Launchers then return uninitialized outputs, which nobody reads.
2. Every recorded launch of an autotuned kernel is expanded into every config its autotune list
   can pick on that GPU: the ``gpu_configs`` that pass ``kernels.utils.fits`` for that arch's
   shared-memory limit with the launch's arguments (the config with the smallest estimate when
   none passes, as the pruning rule does). A plain ``triton.autotune`` kernel contributes all of
   its configs. Kernels that are not autotuned are compiled with the constexprs and ``num_warps``
   their launcher passes.
3. Each (kernel, signature, constexprs, options, arch) is compiled once with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90 | 80, 32))``, the signature and
   alignment attributes coming from the JIT's own binder, i.e. exactly those a real launch with
   these tensors would use. Shared memory comes from the compiled metadata; registers and spill
   bytes from ``ptxas-blackwell -v`` (``--gpu-name=sm_90a`` / ``sm_80``) on the PTX; the PTX is
   searched for ``wgmma.mma_async`` (Hopper tensor cores), ``mma.sync`` and
   ``cp.async.bulk.tensor`` (TMA).

One JSON line per compile goes to ``DIR/compile_check.jsonl`` (kernel, config, dtype, arch, ok,
regs, spill_bytes, shared_bytes, uses_wgmma, plus case, shape, constexprs, reasons / error) and a
summary to ``DIR/compile_check_summary.json``; a table is printed. The exit status is non-zero on
any compile error, any bf16/fp16 compile that spills or needs more shared memory than the arch
allows, any autotune pruning rule that raises on the arguments the autotuner gives it, and any
``@triton.jit`` function named ``*_kernel`` in a ``lrkd_fast.kernels`` module that no case
compiled. fp32 results are reported, and fail only on a compile error.

The default matrix (what CI runs) covers every kernel on sm_90 in bf16, fp16 and fp32 and on
sm_80 in bf16 and fp32; see ``CORE`` / ``SECOND`` below for which flag sets get which (arch, dtype)
pairs and why. With the kernels of 2026-12-01 that is 164 compiles, ~340 CPU-seconds: about 3
minutes on an idle 2-core machine with 2 worker processes (the count follows the autotune lists,
so it moves with them; ``compile_check_summary.json`` records seconds and CPU seconds).
``--full`` compiles every case on every arch x dtype (about twice as long); ``--quick`` restricts
the run to sm_90 + bf16 for iteration. ``--inject KERNEL=JSON`` adds a config to a kernel's candidates
(bypassing the pruning rule) to show what the check does with an oversized one.

The Triton interpreter decides at import time what ``@triton.jit`` returns, so the check must
run in a process where ``TRITON_INTERPRET`` is unset; :func:`run_check` re-runs itself in such a
subprocess when called from an interpreted process (as under the CPU test suite).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace
from typing import Any, Callable

ARCHS = ("sm_90", "sm_80")
DTYPES = ("bf16", "fp16", "fp32")
HALF_DTYPES = ("bf16", "fp16")
# The GPUs the arches stand for: (compute capability, SMs, opt-in shared memory per block, name).
GPUS = {
    "sm_90": dict(capability=90, sms=132, shared=232_448, name="NVIDIA H200 (simulated)"),
    "sm_80": dict(capability=80, sms=108, shared=166_912, name="NVIDIA A100 (simulated)"),
}
KERNEL_PACKAGE = "lrkd_fast.kernels"
JSONL = "compile_check.jsonl"
SUMMARY = "compile_check_summary.json"


# ---------------------------------------------------------------------------- cases

@dataclasses.dataclass
class Case:
    """One launcher call at a canonical shape: ``run(dtype)`` calls the launcher on meta tensors."""
    name: str
    shape: str
    run: Callable[[Any], None]
    # (arch, dtype) pairs the default run compiles; None: every pair. ``--full`` ignores it.
    matrix: tuple | None = None


def _meta(*shape, dtype):
    import torch
    return torch.empty(*shape, device="meta", dtype=dtype)


def _launcher(name, module=None):
    """A public launcher: ``lrkd_fast.kernels.<name>``, else ``lrkd_fast.kernels.<module>.<name>``."""
    import lrkd_fast.kernels as K
    fn = getattr(K, name, None)
    if fn is None and module is not None:
        try:
            fn = getattr(importlib.import_module(f"{KERNEL_PACKAGE}.{module}"), name, None)
        except ImportError:
            fn = None
    if fn is None:
        raise LookupError(f"lrkd_fast.kernels has no launcher {name!r}")
    return fn


# Canonical shapes (docs/PERFORMANCE.md): low-rank linear 4096 -> 4096 at r 256, M 8192 tokens;
# decode at M 1 and 64 (BLOCK_M 16 and 64); LRC-1.5B clone loss and KD loss.
M_TOK, D_LR, R_LR = 8192, 4096, 256
D_T, D_S, D_Q, D_KV, D_FFN, VOCAB = 3072, 1536, 3072, 1024, 8192, 128256
KD_CHUNK = 1024  # rows per KD chunk: the row kernel's code does not depend on it


def _lowrank_fwd(dtype, store_t):
    x, U, V = _meta(M_TOK, D_LR, dtype=dtype), _meta(D_LR, R_LR, dtype=dtype), _meta(R_LR, D_LR, dtype=dtype)
    _launcher("chain_matmul")(x, U, V, _meta(D_LR, dtype=dtype), store_t=store_t)


def _lowrank_bwd_dx(dtype):
    # dx = (dy V^T) U^T with g = dy V^T stored for dU: transposed views, as the backward passes them
    dy, U, V = _meta(M_TOK, D_LR, dtype=dtype), _meta(D_LR, R_LR, dtype=dtype), _meta(R_LR, D_LR, dtype=dtype)
    _launcher("chain_matmul")(dy, V.t(), U.t(), None, store_t=True)


def _decode(dtype, m):
    x, U, V = _meta(m, D_LR, dtype=dtype), _meta(D_LR, R_LR, dtype=dtype), _meta(R_LR, D_LR, dtype=dtype)
    _launcher("lowrank_decode")(x, U, V, _meta(D_LR, dtype=dtype), store_t=False)


def _grouped(dtype, masked):
    import torch
    widths = (D_Q, D_KV, D_KV, D_FFN, D_FFN)  # q, k, v, gate, up of one LRC layer
    s = [_meta(M_TOK, w, dtype=dtype) for w in widths]
    t = [_meta(M_TOK, w, dtype=dtype) for w in widths]
    mask = _meta(M_TOK, dtype=torch.uint8) if masked else None
    _launcher("grouped_mse")(s, t, _meta(len(widths), dtype=torch.float32), mask)


def _projected(dtype, masked):
    import torch
    mask = _meta(M_TOK, dtype=torch.uint8) if masked else None
    _launcher("projected_mse")(_meta(M_TOK, D_S, dtype=dtype), _meta(M_TOK, D_T, dtype=dtype),
                               _meta(D_T, D_S, dtype=dtype), _meta(1, dtype=torch.float32), mask,
                               store_grad=True)


def _scale(dtype):
    import torch
    # a backward's in-place gradient scaling by the incoming loss gradient (an FFN activation's)
    _launcher("scale_", "scale")(_meta(M_TOK, D_FFN, dtype=dtype), _meta(1, dtype=torch.float32))


def _kd_rows(dtype, reverse):
    import torch
    s, t = _meta(KD_CHUNK, VOCAB, dtype=dtype), _meta(KD_CHUNK, VOCAB, dtype=dtype)
    labels = _meta(KD_CHUNK, dtype=torch.int64)
    _launcher("kd_loss_rows")(s, t, labels, _meta(2, dtype=torch.float32),
                              _meta(KD_CHUNK, dtype=torch.float32), temperature=40.0, kl_weight=1.0,
                              ce_weight=1.0, reverse=reverse, write_grad=True)


# Per-case (arch, dtype) matrices of the default run, sized to the ~5-minute CI budget (one compile
# is 2-4 s on 2 cores and the chain kernel alone has ~20 configs per arch and 16-bit dtype):
# * each kernel's main launch: sm_90 in bf16, fp16 and fp32; sm_80 in bf16 and fp32. fp16 on sm_80
#   is left out: it has bf16's element size, so the same tiles, shared memory and MMA shapes (on
#   sm_90, 34 of 41 bf16/fp16 pairs gave identical counts, the rest within a few registers);
# * second flag sets of the autotuned kernels (the backward's transposed dx launch, the masked
#   projected loss): sm_90 bf16 and fp32;
# * the chain kernel's inference launch (x U not stored): only with ``--full``.
# ``--full`` (or naming cases with ``--cases``) compiles every case on every requested arch x dtype.
CORE = tuple((a, d) for a in ARCHS for d in DTYPES if not (a == "sm_80" and d == "fp16"))
SECOND = (("sm_90", "bf16"), ("sm_90", "fp32"))
FULL_ONLY = ()


def default_cases() -> list[Case]:
    lr = f"M{M_TOK} {D_LR}->r{R_LR}->{D_LR}"
    return [
        Case("lowrank_fwd", f"{lr} +bias, x U stored (training)", lambda d: _lowrank_fwd(d, True), CORE),
        Case("lowrank_fwd_infer", f"{lr} +bias (inference)", lambda d: _lowrank_fwd(d, False),
             FULL_ONLY),
        Case("lowrank_bwd_dx", f"{lr}: dx = (dy V^T) U^T, dy V^T stored", _lowrank_bwd_dx, SECOND),
        Case("lowrank_decode_m1", f"M1 {D_LR}->r{R_LR}->{D_LR} +bias", lambda d: _decode(d, 1), CORE),
        Case("lowrank_decode_m64", f"M64 {D_LR}->r{R_LR}->{D_LR} +bias", lambda d: _decode(d, 64), CORE),
        Case("clone_direct", f"M{M_TOK} q{D_Q} k/v{D_KV} gate/up{D_FFN}", lambda d: _grouped(d, False), CORE),
        Case("clone_direct_masked", f"M{M_TOK} q{D_Q} k/v{D_KV} gate/up{D_FFN}, row mask",
             lambda d: _grouped(d, True), CORE),
        Case("clone_projected", f"M{M_TOK} ({D_T} @ {D_T}x{D_S}) vs {D_S}", lambda d: _projected(d, False), CORE),
        Case("clone_projected_masked", f"M{M_TOK} ({D_T} @ {D_T}x{D_S}) vs {D_S}, row mask",
             lambda d: _projected(d, True), SECOND),
        Case("grad_scale", f"M{M_TOK} x {D_FFN} *= device scalar", _scale, CORE),
        Case("kd_rows", f"{KD_CHUNK} rows x V{VOCAB}, KL(T=40) + CE, forward KL, grad",
             lambda d: _kd_rows(d, False), CORE),
        Case("kd_rows_reverse", f"{KD_CHUNK} rows x V{VOCAB}, KL(T=40) + CE, reverse KL, grad",
             lambda d: _kd_rows(d, True), CORE),
    ]


# ---------------------------------------------------------------------------- kernel discovery

def _jit_base(obj):
    """The ``@triton.jit`` function under autotune/heuristics wrappers, or None."""
    from triton.runtime.jit import JITFunction
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        InterpretedFunction = JITFunction
    for _ in range(8):
        if isinstance(obj, (JITFunction, InterpretedFunction)):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def discover_kernels(modules=None) -> dict[str, str]:
    """``{kernel name: module}`` of every ``@triton.jit`` function named ``*_kernel`` defined in
    ``modules`` (default: every module of ``lrkd_fast.kernels``)."""
    if modules is None:
        pkg = importlib.import_module(KERNEL_PACKAGE)
        modules = [pkg] + [importlib.import_module(f"{KERNEL_PACKAGE}.{m.name}")
                           for m in pkgutil.iter_modules(pkg.__path__)]
    found = {}
    for mod in modules:
        for value in list(vars(mod).values()):
            base = _jit_base(value)
            if base is None:
                continue
            fn = base.fn
            if fn.__name__.endswith("_kernel") and fn.__module__ == mod.__name__:
                found[fn.__name__] = mod.__name__
    return found


def uncovered_kernels(covered, modules=None) -> list[str]:
    """Kernels of ``modules`` (default: ``lrkd_fast.kernels``) whose name is not in ``covered``."""
    return sorted(set(discover_kernels(modules)) - set(covered))


# ---------------------------------------------------------------------------- recording launches

@contextlib.contextmanager
def _recording():
    """Patch the JIT and autotuner entry points to append (kind, kernel, args, kwargs) to a list."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    calls = []
    old_jit, old_auto = JITFunction.run, Autotuner.run

    def jit_run(self, *args, grid, warmup, **kwargs):
        calls.append(("jit", self, args, kwargs))

    def auto_run(self, *args, **kwargs):
        calls.append(("autotune", self, args, kwargs))

    JITFunction.run, Autotuner.run = jit_run, auto_run
    try:
        yield calls
    finally:
        JITFunction.run, Autotuner.run = old_jit, old_auto


def _clear_kernel_caches():
    """Forget cached device facts (SM count, shared limit) in the kernel modules."""
    for name, mod in list(sys.modules.items()):
        if name == KERNEL_PACKAGE or name.startswith(KERNEL_PACKAGE + "."):
            for value in list(vars(mod).values()):
                clear = getattr(value, "cache_clear", None)
                if callable(clear) and getattr(value, "__module__", None) == mod.__name__:
                    clear()


@contextlib.contextmanager
def _simulated_gpu(arch):
    """torch.cuda reports one GPU of ``arch`` (SM count, shared memory) while launchers run."""
    import torch
    gpu = GPUS[arch]
    cap = divmod(gpu["capability"], 10)
    props = SimpleNamespace(name=gpu["name"], major=cap[0], minor=cap[1],
                            multi_processor_count=gpu["sms"], shared_memory_per_block_optin=gpu["shared"],
                            shared_memory_per_block=49152, shared_memory_per_multiprocessor=gpu["shared"] + 1024,
                            total_memory=80 << 30, L2_cache_size=50 << 20, warp_size=32,
                            max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536)
    patches = dict(is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
                   get_device_properties=lambda *a, **k: props, get_device_capability=lambda *a, **k: cap,
                   get_device_name=lambda *a, **k: gpu["name"])
    old = {k: getattr(torch.cuda, k) for k in patches}
    _clear_kernel_caches()
    for k, v in patches.items():
        setattr(torch.cuda, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(torch.cuda, k, v)
        _clear_kernel_caches()


def _torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _config_dict(cfg) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _make_config(d: dict):
    import triton
    d = dict(d)
    meta = {k: d.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in d}
    return triton.Config(d, **meta)


def _candidates(tuner, args, kwargs, arch, injected):
    """(config, how it was chosen, resource estimate) of each config ``tuner`` can pick on ``arch``."""
    nargs = dict(zip(tuner.arg_names, args))
    named = {**nargs, **{k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}}
    problems = []
    gpu_configs = getattr(tuner, "gpu_configs", None)
    resources = getattr(tuner, "resources", None)
    out = []
    if gpu_configs is not None and resources is not None:
        from lrkd_fast.kernels.utils import SHARED_LIMIT, fits
        # The GPU autotuner calls its pruning rule with the positional arguments as named_args and
        # the keyword arguments as **kwargs: it must not raise on them.
        prune = getattr(tuner, "early_config_prune", None)
        launch_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        if prune is not None:
            try:
                prune(list(gpu_configs), dict(nargs), **launch_kwargs)
            except Exception as e:  # noqa: BLE001
                problems.append("the autotuner's pruning rule raises on a real launch's arguments: "
                                f"{type(e).__name__}: {e}")
        limit = SHARED_LIMIT[arch]
        try:
            kept = [c for c in gpu_configs if fits(tuner, c, named, limit)]
            how = "fits"
            if not kept:
                kept, how = [min(gpu_configs, key=lambda c: resources(c, named))], "smallest (none fits)"
            out = [(c, how, list(resources(c, named))) for c in kept]
        except Exception as e:  # noqa: BLE001
            problems.append(f"fits() raises: {type(e).__name__}: {e}; compiling every gpu_config")
            out = [(c, "gpu_configs (fits raised)", None) for c in gpu_configs]
    else:
        out = [(c, "autotune list", None) for c in tuner.configs]
    for d in injected:
        c = _make_config(d)
        try:
            est = list(resources(c, named)) if resources is not None else None
        except Exception:  # noqa: BLE001
            est = None
        out.append((c, "injected", est))
    return out, problems


def _expand(call, arch, injected):
    """Final JIT launches (jit fn, args, kwargs, config dict, how, estimate) of one recorded call."""
    kind, obj, args, kwargs = call
    if kind == "jit":
        base = _jit_base(obj)
        name = base.fn.__name__
        launches = [(obj, args, kwargs, None, "launcher", None)]
        for d in injected.get(name, []):
            d = dict(d)
            kw = {**kwargs, **d}
            launches.append((obj, args, kw, None, "injected", None))
        return launches, []
    tuner = obj
    name = _jit_base(tuner).fn.__name__
    cands, problems = _candidates(tuner, args, kwargs, arch, injected.get(name, []))
    out = []
    for cfg, how, est in cands:
        with _recording() as inner:
            tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
        for k, o, a, kw in inner:
            out.append((o, a, kw, _config_dict(cfg), how, est))
    return out, problems


def _compile_job(jit, args, kwargs, arch):
    """Signature, constexprs, attrs and options a real launch of ``jit`` with these arguments uses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", GPUS[arch]["capability"], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    kw.setdefault("debug", bool(getattr(jit, "debug", False)))
    bound, specialization, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, specialization, opts)
    return signature, constexprs, attrs, options.__dict__


def _named_constexprs(jit, constexprs) -> dict:
    names = [p.name for p in jit.params]
    out = {}
    for path, v in constexprs.items():
        if len(path) == 1 and jit.params[path[0]].is_constexpr:
            out[names[path[0]]] = v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
    return out


# ---------------------------------------------------------------------------- compiling (workers)

def _ptxas():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    return path if os.path.exists(path) else "ptxas"


def _parse_ptxas(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    st, ld = (int(spill[-1][0]), int(spill[-1][1])) if spill else (None, None)
    return dict(regs=int(regs[-1]) if regs else None, spill_stores=st, spill_loads=ld,
                spill_bytes=(st + ld) if spill else None, stack_bytes=int(stack[-1]) if stack else None)


def _run_ptxas(ptx: str, cap: int) -> dict:
    gpu_name = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu_name}", p, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed ({r.returncode}): {r.stderr[-2000:]}")
    return _parse_ptxas(r.stderr + r.stdout)


def compile_one(job: dict) -> dict:
    """Compile one job for its arch; returns metadata (runs in a worker process)."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    t0 = time.time()
    res = dict(ok_compile=False)
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        mod = importlib.import_module(job["module"])
        jit = _jit_base(getattr(mod, job["attr"]))
        cap = GPUS[job["arch"]]["capability"]
        src = ASTSource(jit, job["signature"], job["constexprs"], job["attrs"])
        # Triton runs ptxas -v itself to build the cubin: keep its log (the same ptxas, flags and
        # --gpu-name a launch on that GPU uses) instead of running ptxas a second time.
        log = io.StringIO()
        nv = getattr(knobs, "nvidia", None)
        has_dump = nv is not None and hasattr(nv, "dump_ptxas_log")
        old_dump = nv.dump_ptxas_log if has_dump else None
        if has_dump:
            nv.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=job["options"])
        finally:
            if has_dump:
                nv.dump_ptxas_log = old_dump
        ptx = compiled.asm["ptx"]
        res.update(shared_bytes=int(compiled.metadata.shared),
                   uses_wgmma="wgmma.mma_async" in ptx, uses_mma_sync="mma.sync" in ptx,
                   uses_tma="cp.async.bulk.tensor" in ptx, div64=bool(re.search(r"\b(div|rem)\.[su]64\b", ptx)))
        stats = _parse_ptxas(log.getvalue())
        res["ptxas"] = ("ptxas-blackwell" if cap >= 90 else "ptxas") + " (triton.compile's own run)"
        if stats["regs"] is None:  # cache hit (or no log knob): no ptxas log; run ptxas on the PTX
            stats, res["ptxas"] = _run_ptxas(ptx, cap), "ptxas-blackwell"
        res.update(stats)
        res["ok_compile"] = True
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        res["error"] = msg[:4000]
    res["compile_s"] = round(time.time() - t0, 2)
    return res


# ---------------------------------------------------------------------------- the check

def _freeze(x):
    if isinstance(x, dict):
        return tuple(sorted((repr(k), _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return repr(x)


def _interpreter_active() -> bool:
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # noqa: BLE001
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _judge(rec: dict) -> list[str]:
    reasons = []
    if not rec.get("ok_compile"):
        return [f"compile error: {rec.get('error', '?')}"]
    if rec["dtype"] in HALF_DTYPES:
        if rec.get("spill_bytes"):
            reasons.append(f"spills {rec['spill_stores']} B stores / {rec['spill_loads']} B loads per thread")
        if rec["shared_bytes"] > rec["shared_limit"]:
            reasons.append(f"shared memory {rec['shared_bytes']} B > {rec['shared_limit']} B limit of {rec['arch']}")
        if rec.get("regs") is None:
            reasons.append("ptxas reported no register count")
    return reasons


def run_check(cases=None, archs=ARCHS, dtypes=DTYPES, out_dir=None, inject=None, only_injected=False,
              workers=2, verbose=True, modules=None, full=False) -> list[dict]:
    """Run the check; returns one record per compile (see the module docstring).

    cases: list of :class:`Case` or of case names (default: :func:`default_cases`).
    inject: ``{kernel name: [config dict, ...]}``; a config dict holds the constexpr tunables plus
        optional num_warps / num_stages. Injected configs bypass the pruning rule.
    only_injected: compile only the injected configs (for tests of the check itself).
    full: compile every case for every (arch, dtype) of ``archs`` x ``dtypes``, ignoring the
        per-case matrix that keeps the default run within the CI budget.
    The result's ``check_summary`` attribute is not available on a list: the summary (failures,
    uncovered kernels, runtime) is written to ``out_dir`` and returned by :func:`summarize`.
    """
    inject = {k: [dict(c) for c in v] for k, v in (inject or {}).items()}
    if _interpreter_active():
        return _run_in_subprocess(cases, archs, dtypes, out_dir, inject, only_injected, workers, verbose, full)
    t_start, cpu_start = time.time(), _cpu_seconds()
    all_cases = {c.name: c for c in default_cases()}
    if cases is None:
        cases = list(all_cases.values())
    else:
        full = True  # named cases run on every requested arch x dtype
    cases = [all_cases[c] if isinstance(c, str) else c for c in cases]
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

    jobs: dict = {}      # dedupe key -> job
    records: list = []   # one per job, filled after compiling
    problems: list = []  # failures that are not a compile (prune rule raising, launcher errors)
    skipped: list = []
    for arch in archs:
        with _simulated_gpu(arch):
            for case in cases:
                for dt in dtypes:
                    if not full and case.matrix is not None and (arch, dt) not in case.matrix:
                        continue
                    with _recording() as calls:
                        try:
                            case.run(_torch_dtype(dt))
                        except LookupError as e:
                            skipped.append(dict(case=case.name, dtype=dt, arch=arch, why=str(e)))
                            continue
                        except Exception as e:  # noqa: BLE001
                            problems.append(f"{case.name} {dt} {arch}: launcher raised {type(e).__name__}: {e}")
                            continue
                    for call in calls:
                        launches, probs = _expand(call, arch, inject)
                        problems += [f"{case.name} {dt} {arch}: {p}" for p in probs]
                        for jit, args, kwargs, cfg, how, est in launches:
                            if only_injected and how != "injected":
                                continue
                            name = jit.fn.__name__
                            try:
                                sig, cx, attrs, opts = _compile_job(jit, args, kwargs, arch)
                            except Exception as e:  # noqa: BLE001
                                problems.append(f"{case.name} {dt} {arch}: binding {name} failed: "
                                                f"{type(e).__name__}: {e}")
                                continue
                            key = (jit.fn.__module__, name, arch,
                                   _freeze(sig), _freeze(cx), _freeze(attrs), _freeze(opts))
                            if key in jobs:
                                jobs[key]["rec"]["cases"].append(case.name)
                                continue
                            named_cx = _named_constexprs(jit, cx)
                            if cfg is None:  # launcher-chosen: its non-flag constexprs are the config
                                cfg = {k: v for k, v in named_cx.items()
                                       if k in kwargs and not isinstance(v, bool)}
                                cfg.update(num_warps=opts["num_warps"], num_stages=opts["num_stages"])
                            rec = dict(kernel=name, config=cfg, dtype=dt, arch=arch, ok=None, regs=None,
                                       spill_bytes=None, shared_bytes=None, uses_wgmma=None,
                                       shape=case.shape, case=case.name, cases=[case.name], chosen_by=how,
                                       constexprs={k: v for k, v in named_cx.items() if k not in cfg},
                                       estimate=est, shared_limit=GPUS[arch]["shared"])
                            job = dict(module=jit.fn.__module__, attr=name, arch=arch, signature=sig,
                                       constexprs=cx, attrs=attrs, options=opts)
                            jobs[key] = dict(job=job, rec=rec)
                            records.append(rec)
    t_record = time.time() - t_start

    todo = sorted(jobs.values(), key=lambda j: -_cost_guess(j["rec"]))
    if verbose:
        print(f"compile_check: {len(todo)} compiles ({', '.join(archs)}; {', '.join(dtypes)}) "
              f"from {len(cases)} cases, {workers} worker(s)", flush=True)
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(compile_one, [j["job"] for j in todo]))
    else:
        results = [compile_one(j["job"]) for j in todo]
    for j, res in zip(todo, results):
        j["rec"].update(res)

    for rec in records:
        rec["reasons"] = _judge(rec)
        rec["ok"] = not rec["reasons"]
    covered = {r["kernel"] for r in records}
    uncovered = uncovered_kernels(covered, modules)
    summary = summarize(records, problems, uncovered, skipped, time.time() - t_start, t_record, archs, dtypes)
    summary["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 1)
    summary["workers"] = workers
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, JSONL), "w") as f:
            for rec in records:
                f.write(json.dumps(_jsonable(rec)) + "\n")
        with open(os.path.join(out_dir, SUMMARY), "w") as f:
            json.dump(summary, f, indent=1)
    if verbose:
        print(format_table(records))
        print(format_summary(summary))
    run_check.last_summary = summary
    return records


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the compile workers)."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _cost_guess(rec):
    c = rec["config"]
    return c.get("BLOCK_M", 1) * c.get("BLOCK_N", 1) * c.get("num_stages", 1) + (1 if rec["arch"] == "sm_90" else 0)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, int, float, str, type(None))):
        return x
    return str(x)


def summarize(records, problems, uncovered, skipped, seconds, record_seconds, archs, dtypes) -> dict:
    failures = [dict(kernel=r["kernel"], case=r["case"], config=r["config"], dtype=r["dtype"], arch=r["arch"],
                     reasons=r["reasons"]) for r in records if not r["ok"]]
    fp32_notes = [dict(kernel=r["kernel"], config=r["config"], arch=r["arch"], spill_bytes=r.get("spill_bytes"),
                       shared_bytes=r.get("shared_bytes"))
                  for r in records if r["ok"] and r["dtype"] == "fp32"
                  and ((r.get("spill_bytes") or 0) > 0 or (r.get("shared_bytes") or 0) > r["shared_limit"])]
    grouped: dict = {}  # the same problem in several cases / dtypes / arches: one line
    for p in problems:
        where, _, msg = p.partition(": ")
        grouped.setdefault(msg, []).append(where)
    problems = [f"{msg} (in {', '.join(where)})" for msg, where in grouped.items()]
    return dict(ok=not failures and not problems and not uncovered, compiles=len(records),
                failures=failures, problems=problems, uncovered=uncovered, skipped=skipped,
                fp32_spilling_or_over=fp32_notes, covered=sorted({r["kernel"] for r in records}),
                archs=list(archs), dtypes=list(dtypes), seconds=round(seconds, 1),
                record_seconds=round(record_seconds, 1))


def _short_config(cfg: dict) -> str:
    parts = []
    for k, v in cfg.items():
        if k == "num_warps":
            parts.append(f"w{v}")
        elif k == "num_stages":
            parts.append(f"s{v}")
        else:
            parts.append(f"{k.replace('BLOCK_', '')}={v}")
    return " ".join(parts)


def format_table(records) -> str:
    head = ("kernel", "case", "config", "dtype", "arch", "regs", "spill", "shared", "wgmma", "ok")
    rows = []
    for r in sorted(records, key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["case"], _short_config(r["config"]))):
        rows.append((r["kernel"], r["case"] + ("" if len(r["cases"]) == 1 else f" +{len(r['cases']) - 1}"),
                     _short_config(r["config"]) + (" [injected]" if r["chosen_by"] == "injected" else ""),
                     r["dtype"], r["arch"], str(r.get("regs")), str(r.get("spill_bytes")), str(r.get("shared_bytes")),
                     "yes" if r.get("uses_wgmma") else "no",
                     "ok" if r["ok"] else "FAIL: " + "; ".join(_brief(x)[:100] for x in r["reasons"])))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _brief(reason: str) -> str:
    """One line of a reason: a compile error's first and last lines (Triton's message is long)."""
    lines = [x.strip() for x in reason.splitlines() if x.strip()]
    return lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"


def format_summary(s: dict) -> str:
    lines = [f"compile_check: {s['compiles']} compiles in {s['seconds']} s ({s.get('cpu_seconds')} CPU s) "
             f"({', '.join(s['archs'])}; {', '.join(s['dtypes'])}); kernels covered: {', '.join(s['covered']) or '-'}"]
    for f in s["failures"]:
        lines.append(f"  FAIL {f['kernel']} {_short_config(f['config'])} {f['dtype']} {f['arch']} ({f['case']}): "
                     + "; ".join(_brief(x) for x in f["reasons"]))
    for p in s["problems"]:
        lines.append(f"  FAIL {p}")
    if s["uncovered"]:
        lines.append(f"  FAIL kernels no case compiled: {', '.join(s['uncovered'])}")
    for sk in s["skipped"]:
        lines.append(f"  skipped {sk['case']} {sk['dtype']} {sk['arch']}: {sk['why']}")
    if s["fp32_spilling_or_over"]:
        lines.append(f"  note: {len(s['fp32_spilling_or_over'])} fp32 compiles spill or exceed shared memory "
                     "(reported, not failures)")
    lines.append("compile_check: " + ("PASS" if s["ok"] else "FAIL"))
    return "\n".join(lines)


def _cli_args(cases, archs, dtypes, out_dir, inject, only_injected, workers, full):
    args = ["--out", out_dir, "--archs", ",".join(archs), "--dtypes", ",".join(dtypes), "--workers", str(workers)]
    if cases is not None:
        names = [c if isinstance(c, str) else c.name for c in cases]
        args += ["--cases", ",".join(names)]
    for k, cfgs in inject.items():
        for c in cfgs:
            args += ["--inject", f"{k}={json.dumps(c)}"]
    if only_injected:
        args.append("--only-injected")
    if full:
        args.append("--full")
    return args


def _run_in_subprocess(cases, archs, dtypes, out_dir, inject, only_injected, workers, verbose, full):
    if cases is not None and any(not isinstance(c, str) for c in cases):
        custom = [c for c in cases if not isinstance(c, str) and c.name not in {d.name for d in default_cases()}]
        if custom:
            raise RuntimeError("custom Case objects cannot cross to the subprocess the interpreter forces; "
                               "run the check in a process without TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = out_dir or tmp
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for name in (JSONL, SUMMARY):  # never read a previous run's results
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, name))
        r = subprocess.run([sys.executable, "-m", "benchmarks.compile_check",
                            *_cli_args(cases, archs, dtypes, out, inject, only_injected, workers, full)],
                           env=env, cwd=root, capture_output=not verbose, text=True)
        if not os.path.exists(os.path.join(out, SUMMARY)):
            raise RuntimeError(f"the compile check subprocess wrote no results (exit {r.returncode}):\n"
                               + ((r.stdout or "") + (r.stderr or ""))[-4000:])
        with open(os.path.join(out, JSONL)) as f:
            records = [json.loads(line) for line in f]
        with open(os.path.join(out, SUMMARY)) as f:
            run_check.last_summary = json.load(f)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for compile_check.jsonl and the summary")
    p.add_argument("--quick", action="store_true", help="sm_90 + bf16 only (iteration, not CI)")
    p.add_argument("--archs", default=None, help=f"comma list of {', '.join(ARCHS)} (default all)")
    p.add_argument("--dtypes", default=None, help=f"comma list of {', '.join(DTYPES)} (default all)")
    p.add_argument("--cases", default=None, help="comma list of case names (default all): "
                   + ", ".join(c.name for c in default_cases()))
    p.add_argument("--inject", action="append", default=[], metavar="KERNEL=JSON",
                   help='add a config, e.g. _chain_kernel=\'{"BLOCK_M": 256, "num_warps": 8}\'')
    p.add_argument("--only-injected", action="store_true", help="compile only the injected configs")
    p.add_argument("--full", action="store_true",
                   help="every case on every arch x dtype (about twice the default's time)")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    archs = tuple(a.archs.split(",")) if a.archs else (("sm_90",) if a.quick else ARCHS)
    dtypes = tuple(a.dtypes.split(",")) if a.dtypes else (("bf16",) if a.quick else DTYPES)
    for x in archs:
        if x not in ARCHS:
            p.error(f"unknown arch {x}")
    for x in dtypes:
        if x not in DTYPES:
            p.error(f"unknown dtype {x}")
    inject = {}
    for item in a.inject:
        k, _, js = item.partition("=")
        inject.setdefault(k, []).append(json.loads(js))
    if _interpreter_active():
        p.error("TRITON_INTERPRET is set: the check compiles real GPU code; unset it")
    run_check(cases=a.cases.split(",") if a.cases else None, archs=archs, dtypes=dtypes, out_dir=a.out,
              inject=inject, only_injected=a.only_injected, workers=a.workers, full=a.full)
    return 0 if run_check.last_summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
