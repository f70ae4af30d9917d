"""One benchmark runner for every op: times each provider side by side, checks each provider's
output against eager first, prints a table, writes a CSV with a fixed schema and a PNG plot.

A *case* is one op at one shape and mode. Case files (``benchmarks/cases_*.py``) expose
``cases(device, small) -> list[Case]``. Each provider is a zero-argument ``setup`` callable that
builds its inputs and returns ``(run, result)``: ``run()`` executes the timed work once and
``result()`` returns a tensor (or tuple of tensors) compared with eager's to make sure every timed
provider computes the same thing.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import importlib
import importlib.util
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lrkd_fast.ops.cost_model import H200, roofline_seconds

CSV_FIELDS = ["date", "device", "op", "shape", "dtype", "mode", "provider", "median_ms", "p20_ms", "p80_ms",
              "peak_mib", "ratio_to_eager", "sol_ms", "pct_sol", "max_rel_err", "note"]
CASE_MODULES = [".cases_lowrank", ".cases_clone", ".cases_kd"]  # relative to this package
# Provider families a user can select with --providers (a provider belongs to the family its name
# starts with, e.g. "liger chunked JSD(beta=0)+CE" to "liger", "lrkd_fast[decode]" to "lrkd_fast").
PROVIDER_FAMILIES = ("eager", "torch.compile", "lrkd_fast", "liger", "dense")
NOT_TIMED_CPU = "not timed: Triton interpreter (value checked against eager)"


@dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    mode: str  # "fwd" or "fwd+bwd"
    providers: dict[str, Callable[[], tuple[Callable[[], object], Callable[[], object]]]]
    flops: float = 0.0
    bytes: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def sol_ms(self) -> float | None:
        """Speed of light on the H200 (max of FLOPs / 782 TFLOP/s and bytes / 4.25 TB/s), in ms."""
        if not (self.flops or self.bytes):
            return None
        return roofline_seconds(self.flops, self.bytes, H200) * 1e3


@dataclass
class Row:
    date: str
    device: str
    op: str
    shape: str
    dtype: str
    mode: str
    provider: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mib: float | None = None
    ratio_to_eager: float | None = None
    sol_ms: float | None = None
    pct_sol: float | None = None
    max_rel_err: float | None = None
    note: str = ""


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)] if isinstance(out, (tuple, list)) else []


def max_rel_err(out, ref) -> float:
    """Largest relative error (max |a-b| / max |ref|) over corresponding tensors."""
    errs = []
    for a, b in zip(_flatten(out), _flatten(ref)):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        errs.append(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() if a.numel() else 0.0)
    return max(errs) if errs else float("nan")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(run, device: str, warmup: int, iters: int) -> tuple[list[float], float | None]:
    """Per-iteration times in ms (CUDA events on GPU, perf_counter on CPU) and extra peak MiB."""
    for _ in range(warmup):
        run()
    _sync(device)
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return times, peak


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def provider_family(name: str) -> str:
    return next((f for f in PROVIDER_FAMILIES if name == f or name.startswith(f + " ") or name.startswith(f + "[")),
                name)


def _selected(name: str, providers) -> bool:
    return not providers or name == "eager" or provider_family(name) in providers


def run_case(case: Case, device: str, warmup: int, iters: int, providers=None, progress=None) -> list[Row]:
    date = _dt.date.today().isoformat()
    dev_name = device_name(device)
    rows, ref = [], None
    for name, setup in case.providers.items():
        if not _selected(name, providers):
            continue
        row = Row(date, dev_name, case.op, case.shape, str(case.dtype).replace("torch.", ""), case.mode, name,
                  sol_ms=case.sol_ms)
        if name in case.notes:
            row.note = case.notes[name]
            rows.append(row)
            if progress is not None:
                progress.update(1)
            continue
        try:
            run, result = setup()
            run()
            out = result()
            if name == "eager":
                ref = [t.detach().clone() for t in _flatten(out)]
                row.max_rel_err = 0.0
            elif ref is not None and "(context)" not in name:
                row.max_rel_err = max_rel_err(out, ref)
            if device == "cpu" and provider_family(name) == "lrkd_fast":
                row.note = NOT_TIMED_CPU  # the interpreter runs kernels through numpy: no timing
            else:
                times, peak = time_fn(run, device, warmup, iters)
                row.median_ms = statistics.median(times)
                row.p20_ms, row.p80_ms = _quantile(times, 0.2), _quantile(times, 0.8)
                row.peak_mib = peak
                if device == "cuda" and row.sol_ms:
                    row.pct_sol = 100.0 * row.sol_ms / row.median_ms
        except Exception as exc:  # one failing provider must not cost the others
            row.note = f"error: {type(exc).__name__}: {str(exc)[:160]}"
        finally:
            run = result = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if progress is not None:
            progress.update(1)
    eager = next((r for r in rows if r.provider == "eager" and r.median_ms), None)
    for r in rows:
        if eager and r.median_ms:
            r.ratio_to_eager = eager.median_ms / r.median_ms
    return rows


def collect_cases(device: str, small: bool, ops=None, build_only: bool = False) -> list[Case]:
    """Every case of every case file (``build_only``: for the roofline, no device is touched, as
    providers make their inputs only when run)."""
    cases = []
    for mod_name in CASE_MODULES:
        try:
            mod = importlib.import_module(mod_name, package=__package__)
        except ModuleNotFoundError as exc:
            if exc.name == __package__ + mod_name:
                continue
            raise
        for c in mod.cases(device, small):
            if not ops or any(o in c.op for o in ops):
                cases.append(c)
    return cases


def _fmt(v, spec):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _table(head, body) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + body]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(rows: list[Row]) -> str:
    head = ["op", "shape", "dtype", "mode", "provider", "median ms", "peak MiB", "x eager", "% SoL", "rel err", "note"]
    body = [[r.op, r.shape, r.dtype, r.mode, r.provider, _fmt(r.median_ms, ".4g"), _fmt(r.peak_mib, ".1f"),
             _fmt(r.ratio_to_eager, ".2f"), _fmt(r.pct_sol, ".0f"), _fmt(r.max_rel_err, ".1e"), r.note] for r in rows]
    return _table(head, body)


def roofline_table(cases: list[Case] | None = None, ops=None) -> str:
    """The model's speed of light of every case (default: the canonical GPU shapes) on the H200:
    what each kernel must reach, printed without running anything."""
    cases = cases if cases is not None else collect_cases("cuda", small=False, ops=ops, build_only=True)
    head = ["op", "shape", "mode", "GFLOP", "MB moved", "SoL us", "bound by"]
    body = []
    for c in cases:
        if c.sol_ms is None:
            continue
        compute = c.flops / H200.peak_flops >= c.bytes / H200.bandwidth
        body.append([c.op, c.shape, c.mode, f"{c.flops / 1e9:.1f}", f"{c.bytes / 1e6:.1f}", f"{c.sol_ms * 1e3:.1f}",
                     "FLOPs" if compute else "bytes"])
    title = (f"speed of light on {H200.name} ({H200.peak_flops / 1e12:.0f} TFLOP/s bf16, "
             f"{H200.bandwidth / 1e12:.2f} TB/s): max(FLOPs / peak, bytes / bandwidth)")
    return title + "\n" + _table(head, body)


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: getattr(r, k) for k in CSV_FIELDS})


def plot(rows: list[Row], path: str) -> None:
    """Bar chart of median time per case, one bar per provider (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.median_ms]
    cases = list(dict.fromkeys((r.op, r.shape, r.mode) for r in timed))
    providers = list(dict.fromkeys(r.provider for r in timed))
    if not cases:
        return
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(cases) + 3), 6))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs, ys = [], []
        for j, c in enumerate(cases):
            r = next((r for r in timed if (r.op, r.shape, r.mode) == c and r.provider == p), None)
            if r:
                xs.append(j + i * width)
                ys.append(r.median_ms)
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{op} {mode}\n{shape}" for op, shape, mode in cases], fontsize=8, rotation=35, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("median time per call, ms (log scale)")
    untimed = sorted({r.provider for r in rows if r.note == NOT_TIMED_CPU})
    subtitle = f"\nnot drawn: {', '.join(untimed)} (Triton interpreter, not timed)" if untimed else ""
    ax.set_title(f"lrkd_fast benchmarks on {timed[0].device} ({timed[0].date}){subtitle}", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(device: str | None = None, small: bool | None = None, ops=None, providers=None, out_dir: str = "runs/bench",
        warmup: int | None = None, iters: int | None = None, quiet: bool = False) -> list[Row]:
    """Run every case, print the table, write ``results.csv`` and ``results.png`` under ``out_dir``."""
    from tqdm.auto import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    small = (device == "cpu") if small is None else small
    warmup = warmup if warmup is not None else (3 if device == "cuda" else 2)
    iters = iters if iters is not None else (20 if device == "cuda" else 10)
    if providers:
        unknown = [p for p in providers if p not in PROVIDER_FAMILIES]
        if unknown:
            raise ValueError(f"unknown provider(s) {unknown}; valid: {', '.join(PROVIDER_FAMILIES)}")
        if "liger" in providers and importlib.util.find_spec("liger_kernel") is None:
            print("note: --providers liger: liger-kernel is not installed here (pip install liger-kernel), "
                  "so there are no Liger rows")
    cases = collect_cases(device, small, ops)
    if not cases:
        valid = sorted({c.op for c in collect_cases(device, small, build_only=True)})
        raise ValueError(f"no benchmark case matches ops={ops!r}; valid ops: {', '.join(valid)}")
    n = sum(len(c.providers) for c in cases)
    rows = []
    with tqdm(total=n, desc="benchmarks", disable=quiet) as bar:
        for c in cases:
            rows.extend(run_case(c, device, warmup, iters, providers, progress=bar))
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    plot(rows, os.path.join(out_dir, "results.png"))
    if not quiet:
        print(f"device: {device_name(device)}   torch {torch.__version__}")
        if device == "cpu":
            print("note: lrkd_fast's Triton kernels need a GPU for meaningful timings; on CPU the Triton "
                  "interpreter is for correctness only, so the lrkd_fast rows are checked, not timed.")
        print(format_table(rows))
        if device == "cpu":
            print()
            print(roofline_table(ops=ops))
        print(f"wrote {os.path.join(out_dir, 'results.csv')} and results.png")
    return rows
