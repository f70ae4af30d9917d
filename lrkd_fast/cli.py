"""The ``lrkd-fast`` command."""
from __future__ import annotations

import argparse
import sys


def _add_bench(sub):
    p = sub.add_parser("bench", help="run the benchmarks side by side and write a CSV table and a PNG plot",
                       description="Time every op with each provider (eager, torch.compile, Liger-Kernel where it "
                                   "has the op, lrkd_fast) after checking each provider's result against eager.")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--small", action="store_true", default=None,
                   help="small shapes (the default on CPU); --full forces the canonical shapes")
    p.add_argument("--full", dest="small", action="store_false", help="canonical (LRC-1.5B) shapes")
    p.add_argument("--ops", nargs="*", default=None, help="only cases whose op name contains one of these")
    p.add_argument("--providers", nargs="*", default=None, help="only these providers (eager always runs)")
    p.add_argument("--out", default="runs/bench", help="output folder for results.csv and results.png")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from .benchmarks import runner

    runner.run(device=args.device, small=args.small, ops=args.ops, providers=args.providers,
               out_dir=args.out, warmup=args.warmup, iters=args.iters)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrkd-fast", description="Fast low-rank knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lrkd-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
