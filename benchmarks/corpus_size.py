"""How the default run's held-out quality grows with the size of the built-in corpus.

The default ``lrkd-fast distill`` (all-MiniLM-L6-v2 at half its encoder's linear parameters, the
same steps) trained on the pydoc training split alone and on growing fixed subsets of the built-in
corpus (``corpus_size``), every text once per epoch (``pydoc_repeats=1``), measured on the two
held-out sets of the default table: 512 pydoc sentences and 512 standard-library docstring sentences
(a source never trained on)::

    python -m benchmarks.corpus_size --out benchmarks/results/corpus_size          # about 9 minutes per size
    python -m benchmarks.corpus_size --sizes 1400 12000 --steps 200 --out DIR      # fewer, shorter runs

Writes ``corpus_size.csv`` and a README with the table, the command and the machine.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import tempfile
import time

from .rank_sweep import machine

FIELDS = ["corpus_size", "train_texts", "steps", "wall_s", "pydoc_mean_cos", "pydoc_spearman", "pydoc_nn_agree",
          "stdlib_mean_cos", "stdlib_spearman"]


def fidelity_columns(f, o) -> dict:
    """The CSV columns of a run's fidelity on the pydoc (``f``) and the standard-library (``o``) held-out sets."""
    return {"pydoc_mean_cos": round(f.mean_cosine, 4), "pydoc_spearman": round(f.spearman, 4),
            "pydoc_nn_agree": round(f.nn_agreement, 3), "stdlib_mean_cos": round(o.mean_cosine, 4),
            "stdlib_spearman": round(o.spearman, 4)}


def fidelity_cells(r: dict) -> str:
    """Those columns of row ``r`` as the last cells of a markdown table row."""
    return (f"{r['pydoc_mean_cos']:.4f} | {r['pydoc_spearman']:.4f} | {r['pydoc_nn_agree']:.3f} | "
            f"{r['stdlib_mean_cos']:.4f} | {r['stdlib_spearman']:.4f} |")


FIDELITY_HEAD = ["pydoc mean cos", "pydoc Spearman", "pydoc NN agree", "stdlib mean cos", "stdlib Spearman"]


def write_readme(out: str, title: str, command: str, intro: str, head: list, rows: list, figure: str = "") -> None:
    """``out/README.md``: the title, the command, the machine and date with ``intro``, an optional figure
    (markdown), and the table of ``head`` (its first cells; the fidelity columns follow) and ``rows``
    (markdown table rows)."""
    head = head + FIDELITY_HEAD
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"Machine: {machine()}, {_dt.date.today().isoformat()}. {intro}", ""]
    lines += [figure, ""] if figure else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def run_size(size, steps, teacher=None, progress=True, **recipe) -> dict:
    """One default run on ``size`` training texts (None: the whole corpus; 0: the pydoc split alone)."""
    from lrkd_fast.recipes import SwapRecipe, run_swap_recipe

    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        # every text once, so the sizes compare amounts of text, not the default's weighting of pydoc
        r = SwapRecipe(teacher=teacher, steps=steps, corpus_size=size or None, output=os.path.join(out, "s"),
                       progress=progress, pydoc_repeats=1, **recipe)
        if size == 0:  # the pydoc training split alone: its size is only known after the split
            from lrkd_fast.data import builtin_split

            r.corpus_size = builtin_split(progress=progress).counts["pydoc"]
        res = run_swap_recipe(r)
        wall = time.time() - t0
    end = res.rows[-1]
    return {"corpus_size": "all" if size is None else size, "train_texts": sum(res.train_counts.values()),
            "steps": len(res.history["step"]), "wall_s": round(wall, 1), **fidelity_columns(end.fidelity, end.other)}


def write(rows: list, out: str, command: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "corpus_size.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)
    write_readme(out, "Corpus size and the default run's held-out quality", command,
                 "Each row is one default run (same start, same steps) on that many training texts; held-out sets: "
                 "512 pydoc sentences and 512 standard-library docstring sentences never trained on. Spearman: rank "
                 "correlation of teacher and student cosine similarities over all pairs.",
                 ["training texts", "steps", "wall s"],
                 [f"| {r['train_texts']:,} | {r['steps']} | {r['wall_s']:.0f} | {fidelity_cells(r)}" for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="*", default=["0", "6000", "12000", "all"],
                   help="training texts per run: 0 = the pydoc training split alone, 'all' = the whole corpus")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the default run's)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--calib-texts", type=int, default=None, help="(default: the default run's)")
    p.add_argument("--seq-len", type=int, default=None, help="(default: the default run's)")
    p.add_argument("--out", default="runs/corpus_size")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from lrkd_fast.recipes import SwapRecipe

    steps = a.steps or SwapRecipe.steps
    extra = {k: v for k, v in (("calib_texts", a.calib_texts), ("seq_len", a.seq_len)) if v is not None}
    rows = []
    for s in a.sizes:
        size = None if s == "all" else int(s)
        rows.append(run_size(size, steps, teacher=a.teacher, progress=not a.quiet, **extra))
        print(rows[-1], flush=True)
        write(rows, a.out, "python -m benchmarks.corpus_size " + " ".join(argv if argv is not None else
                                                                          __import__("sys").argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
