"""Activation cloning and information: does the clone loss raise teacher-student mutual information
at every layer, and does that information predict held-out fidelity?

A test of the claim "activation cloning maximizes mutual information between teacher and student
representations" (arXiv 2603.22355, abstract only) on the MiniLM default::

    python -m benchmarks.cloning_information           # default: MiniLM, a few minutes on 2 CPU cores
    python -m benchmarks.cloning_information --tiny    # smoke test on a tiny BERT, seconds
    python -m benchmarks.cloning_information --out DIR # where cloning_information.csv / .png / summary.json / README.md go

Setup. The packaged all-MiniLM-L6-v2 teacher is swapped once as ``lrkd-fast distill`` does by
default (every encoder linear at half its parameters, whitened init calibrated on training texts),
except that the ranks are uniform (``--allocation sensitivity`` gives the CLI's allocation, ~7 more
minutes on 2 CPU cores). Two students start from that same swapped model and train for the
same steps on the same batches with the default distillation settings (AdamW, lr 3e-4, norms and
biases trained, cosine loss on the pooled embedding):

* ``clone``: the default clone loss on every block's output but the last, plus the output loss;
* ``output only``: the output loss alone (``clone_modules=None``).

Measured at the start and every ``--diag-every`` steps, on held-out texts the students never train
on: per block, linear CKA and the Gaussian mutual-information estimate between teacher and student
block outputs (:func:`lrkd_fast.diagnostics.representation_diagnostics`, a fixed number of
components for every block, with the estimator's null bias at that sample size), and the held-out
embedding fidelity (mean / min cosine to the teacher's sentence embeddings, nearest-neighbour
agreement).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .rank_sweep import machine

CSV_FIELDS = ["arm", "step", "site", "cka", "mi", "mi_null", "rows", "heldout_mean_cos", "heldout_min_cos",
              "heldout_nn_agree", "train_loss"]
ARMS = {"clone": "inner", "output only": None}  # arm -> DistillConfig.clone_modules


@dataclass
class CloningConfig:
    teacher: str = ""  # "" = the packaged all-MiniLM-L6-v2
    keep: float = 0.5
    init: str = "whitened"
    # "uniform", not the CLI's "sensitivity": measuring the sensitivities takes ~7 minutes on 2 shared
    # cores, and both arms start from the same swapped model either way
    allocation: str = "uniform"
    calib_texts: int = 256
    steps: int = 240
    diag_every: int = 30
    lr: float = 3e-4
    batch_size: int = 16
    seq_len: int = 128
    heldout: int = 256  # held-out texts for the fidelity
    diag_texts: int = 128  # of those, the texts whose token activations feed CKA / MI
    components: int = 32
    seed: int = 0
    tiny: bool = False  # a tiny random BERT with MiniLM's tokenizer instead of the teacher

    def __post_init__(self):
        for name in ("calib_texts", "steps", "diag_every", "batch_size", "seq_len", "heldout", "diag_texts",
                     "components"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not 0 < self.keep < 1:
            raise ValueError(f"keep must lie in (0, 1), got {self.keep!r}")
        if self.diag_texts > self.heldout:
            raise ValueError(f"diag_texts ({self.diag_texts}) must be at most heldout ({self.heldout})")
        if self.diag_every > self.steps:
            raise ValueError(f"diag_every ({self.diag_every}) must be at most steps ({self.steps})")


TINY = dict(tiny=True, steps=6, diag_every=3, calib_texts=32, heldout=48, diag_texts=32, components=8,
            batch_size=8, seq_len=32, allocation="uniform")


# ------------------------------------------------------------------------------------ setup

def _teacher(cfg: CloningConfig):
    import transformers as T

    from lrkd_fast.data import packaged_minilm_path

    tok = T.AutoTokenizer.from_pretrained(packaged_minilm_path())
    if cfg.tiny:
        torch.manual_seed(cfg.seed)
        bcfg = T.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=cfg.seq_len)
        return T.BertModel(bcfg).eval(), tok
    return T.AutoModel.from_pretrained(cfg.teacher or packaged_minilm_path()).eval(), tok


def _targets(model) -> str:
    from lrkd_fast.swap import find_blocks

    prefix = find_blocks(model)[0].rsplit(".", 1)[0]
    return rf"{prefix.replace('.', chr(92) + '.')}\..*"


def run_experiment(cfg: CloningConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """Rows of CSV_FIELDS (one per arm, diagnostic step and block) and run facts."""
    from lrkd_fast import DistillConfig, Distiller, LowRankConfig, swap_linear_layers
    from lrkd_fast.data import TextBatches, pydoc_sentences, split_texts
    from lrkd_fast.evaluate import embedding_fidelity, sentence_embeddings

    t0 = time.perf_counter()
    teacher, tok = _teacher(cfg)
    texts = pydoc_sentences()
    train, held = split_texts(texts, cfg.heldout, seed=cfg.seed)
    held_batches = list(TextBatches(held, tok, 64, cfg.seq_len, shuffle=False))
    diag_batches = list(TextBatches(held[:cfg.diag_texts], tok, 32, cfg.seq_len, shuffle=False))
    t_emb = sentence_embeddings(teacher, held_batches)

    start = copy.deepcopy(teacher)
    calib = list(TextBatches(train[:cfg.calib_texts], tok, 32, cfg.seq_len, shuffle=False))
    swap_linear_layers(start, LowRankConfig(rank=float(cfg.keep), init=cfg.init, allocation=cfg.allocation,
                                            target_modules=_targets(teacher)), calibration=calib)
    facts = dict(train_texts=len(train), heldout_texts=len(held), diag_texts=cfg.diag_texts,
                 params_teacher=sum(p.numel() for p in teacher.parameters()),
                 params_student=sum(p.numel() for p in start.parameters()), setup_seconds=0.0, arm_seconds={})
    facts["setup_seconds"] = round(time.perf_counter() - t0, 1)

    rows = []
    for arm, clone_modules in ARMS.items():
        t1 = time.perf_counter()
        student = copy.deepcopy(start)
        fidelity = {0: (embedding_fidelity(sentence_embeddings(student, held_batches), t_emb), float("nan"))}
        # CKA / MI come from the training loop's own diagnostics (diagnostics_every), fidelity from on_step
        dcfg = DistillConfig(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, train_norms=True, train_bias=True,
                             clone_modules=clone_modules, progress=progress, diagnostics_every=cfg.diag_every,
                             diagnostics_components=cfg.components)
        data = TextBatches(train, tok, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        d = Distiller(student, teacher, dcfg)

        def on_step(step, parts, _student=student, _fid=fidelity):
            done = step + 1
            if done % cfg.diag_every == 0 or done == cfg.steps:
                _fid[done] = (embedding_fidelity(sentence_embeddings(_student, held_batches), t_emb), parts["loss"])
                _student.train(dcfg.dropout)

        try:
            history = d.train(data, on_step=on_step, diagnostics_data=diag_batches)
        finally:
            d.close()
        for entry in history["diagnostics"]:
            fid, loss = fidelity[entry["step"]]
            for site, v in entry["sites"].items():
                rows.append(dict(arm=arm, step=entry["step"], site=site, cka=v["cka"], mi=v["mi"],
                                 mi_null=v["mi_null"], rows=v["rows"], heldout_mean_cos=fid.mean_cosine,
                                 heldout_min_cos=fid.min_cosine, heldout_nn_agree=fid.nn_agreement, train_loss=loss))
        facts["arm_seconds"][arm] = round(time.perf_counter() - t1, 1)
    return rows, facts


# ------------------------------------------------------------------------------------ analysis

def _rankdata(v: list[float]) -> torch.Tensor:
    t = torch.tensor(v, dtype=torch.float64)
    order = t.argsort()
    ranks = torch.empty_like(t)
    ranks[order] = torch.arange(len(t), dtype=torch.float64)
    return ranks


def _corr(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = (x.square().sum() * y.square().sum()).sqrt()
    return (x @ y / den).item() if den > 0 else float("nan")


def analyze(rows: list[dict]) -> dict:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    sites = list(dict.fromkeys(r["site"] for r in rows))
    out = {"arms": arms, "sites": sites, "per_arm": {}}
    for arm in arms:
        sel = [r for r in rows if r["arm"] == arm]
        steps = sorted({r["step"] for r in sel})
        get = lambda step, site, k: next(r[k] for r in sel if r["step"] == step and r["site"] == site)
        first, last = steps[0], steps[-1]
        out["per_arm"][arm] = dict(
            steps=steps,
            mi={s: [get(t, s, "mi") for t in steps] for s in sites},
            cka={s: [get(t, s, "cka") for t in steps] for s in sites},
            heldout_mean_cos=[get(t, sites[0], "heldout_mean_cos") for t in steps],
            heldout_min_cos=[get(t, sites[0], "heldout_min_cos") for t in steps],
            heldout_nn_agree=[get(t, sites[0], "heldout_nn_agree") for t in steps],
            start={s: dict(mi=get(first, s, "mi"), cka=get(first, s, "cka")) for s in sites},
            end={s: dict(mi=get(last, s, "mi"), cka=get(last, s, "cka")) for s in sites},
            mi_null=get(first, sites[0], "mi_null"), rows=get(first, sites[0], "rows"))
    if "clone" in arms and "output only" in arms:
        c, o = out["per_arm"]["clone"]["end"], out["per_arm"]["output only"]["end"]
        out["clone_minus_output"] = {s: dict(mi=c[s]["mi"] - o[s]["mi"], cka=c[s]["cka"] - o[s]["cka"]) for s in sites}
        out["clone_raises_mi_at_every_layer"] = all(v["mi"] > 0 for v in out["clone_minus_output"].values())
        out["clone_raises_cka_at_every_layer"] = all(v["cka"] > 0 for v in out["clone_minus_output"].values())
        out["final_fidelity"] = {a: dict(mean_cos=out["per_arm"][a]["heldout_mean_cos"][-1],
                                         min_cos=out["per_arm"][a]["heldout_min_cos"][-1],
                                         nn_agree=out["per_arm"][a]["heldout_nn_agree"][-1]) for a in arms}
    # does MI predict held-out fidelity? across every checkpoint of both arms
    points = []
    for arm in arms:
        pa = out["per_arm"][arm]
        for i, _ in enumerate(pa["steps"]):
            points.append(dict(mean_mi=sum(pa["mi"][s][i] for s in sites) / len(sites), last_mi=pa["mi"][sites[-1]][i],
                               mean_cka=sum(pa["cka"][s][i] for s in sites) / len(sites), last_cka=pa["cka"][sites[-1]][i],
                               cos=pa["heldout_mean_cos"][i]))
    cos = [p["cos"] for p in points]
    out["predicts_fidelity"] = {k: dict(pearson=_corr([p[k] for p in points], cos),
                                        spearman=_corr(_rankdata([p[k] for p in points]).tolist(), _rankdata(cos).tolist()))
                                for k in ("mean_mi", "last_mi", "mean_cka", "last_cka")}
    out["checkpoints"] = len(points)
    return out


# ------------------------------------------------------------------------------------ output

def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [dict(arm=r["arm"], step=int(r["step"]), site=r["site"], rows=int(r["rows"]),
                     **{k: float(r[k]) for k in CSV_FIELDS if k not in ("arm", "step", "site", "rows")})
                for r in csv.DictReader(f)]


def plot(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites, arms = summary["sites"], summary["arms"]
    styles = {"clone": "-", "output only": "--"}
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    for ax, key, label in ((axes[0], "mi", "Gaussian MI (nats)"), (axes[1], "cka", "linear CKA")):
        for arm in arms:
            pa = summary["per_arm"][arm]
            for j, s in enumerate(sites):
                ax.plot(pa["steps"], pa[key][s], styles.get(arm, ":"), marker="o", ms=3,
                        color=cmap(j / max(1, len(sites) - 1)), label=f"{s.rsplit('.', 1)[-1]} {arm}")
        if key == "mi":
            ax.axhline(summary["per_arm"][arms[0]]["mi_null"], color="gray", lw=0.8, ls=":", label="null bias")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per block over training (solid: clone, dashed: output only)", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
    ax = axes[2]
    x = torch.arange(len(sites), dtype=torch.float64)
    w = 0.8 / max(1, len(arms))
    for k, arm in enumerate(arms):
        end = summary["per_arm"][arm]["end"]
        ax.bar((x + k * w).tolist(), [end[s]["mi"] for s in sites], width=w, label=arm)
    ax.set_xticks((x + w * (len(arms) - 1) / 2).tolist())
    ax.set_xticklabels([s.rsplit(".", 1)[-1] for s in sites])
    ax.set_xlabel("block")
    ax.set_ylabel("MI at the end (nats)")
    ax.set_title("MI per block after training", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[3]
    for arm in arms:
        pa = summary["per_arm"][arm]
        ax.plot(pa["steps"], pa["heldout_mean_cos"], styles.get(arm, ":"), marker="o", ms=3, label=f"{arm}: mean cos")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out mean cosine to teacher")
    ax.set_title("held-out embedding fidelity", fontsize=8)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(summary: dict) -> str:
    lines = []
    sites = summary["sites"]
    lines.append(f"{'block':<18} " + " ".join(f"{a + ' MI':>16} {a + ' CKA':>17}" for a in summary["arms"]))
    for s in sites:
        lines.append(f"{s:<18} " + " ".join(f"{summary['per_arm'][a]['end'][s]['mi']:>16.3f} "
                                            f"{summary['per_arm'][a]['end'][s]['cka']:>17.4f}" for a in summary["arms"]))
    for a, f in summary.get("final_fidelity", {}).items():
        lines.append(f"{a}: held-out mean cos {f['mean_cos']:.4f}, min cos {f['min_cos']:.4f}, NN agree {f['nn_agree']:.3f}")
    if "clone_raises_mi_at_every_layer" in summary:
        lines.append(f"clone loss raises MI at every block: {summary['clone_raises_mi_at_every_layer']}; "
                     f"CKA: {summary['clone_raises_cka_at_every_layer']}")
    for k, v in summary["predicts_fidelity"].items():
        lines.append(f"{k} vs held-out mean cos over {summary['checkpoints']} checkpoints: "
                     f"Pearson {v['pearson']:+.3f}, Spearman {v['spearman']:+.3f}")
    return "\n".join(lines)


def _readme(cfg: CloningConfig, summary: dict, meta: dict, command: str) -> str:
    sites, arms = summary["sites"], summary["arms"]
    head = "| block | " + " | ".join(f"{a}: MI start → end | {a}: CKA start → end" for a in arms) + " | clone − output: MI | CKA |"
    sep = "|---|" + "---:|---:|" * len(arms) + "---:|---:|"
    body = []
    for s in sites:
        cells = []
        for a in arms:
            pa = summary["per_arm"][a]
            cells.append(f"{pa['start'][s]['mi']:.2f} → {pa['end'][s]['mi']:.2f}")
            cells.append(f"{pa['start'][s]['cka']:.4f} → {pa['end'][s]['cka']:.4f}")
        dm = summary.get("clone_minus_output", {}).get(s, {"mi": float("nan"), "cka": float("nan")})
        body.append(f"| {s} | " + " | ".join(cells) + f" | {dm['mi']:+.2f} | {dm['cka']:+.4f} |")
    fid = "\n".join(f"| {a} | {f['mean_cos']:.4f} | {f['min_cos']:.4f} | {f['nn_agree']:.3f} |"
                    for a, f in summary.get("final_fidelity", {}).items())
    pred = "\n".join(f"| {k} | {v['pearson']:+.3f} | {v['spearman']:+.3f} |" for k, v in summary["predicts_fidelity"].items())
    pa0 = summary["per_arm"][arms[0]]
    return f"""# Activation cloning and information

Written by `benchmarks/cloning_information.py` on {meta['date']}, on a {meta['machine_short']} ({meta['machine']},
{meta['threads']} torch thread(s)); the run took {meta['seconds']:.0f} s (setup {meta['facts']['setup_seconds']:.0f} s,
arms {', '.join(f'{a} {s:.0f} s' for a, s in meta['facts']['arm_seconds'].items())}).

    {command}

Files: `cloning_information.csv` (one row per arm, diagnostic step and block: {', '.join(f'`{c}`' for c in CSV_FIELDS)}),
`cloning_information.png`, `summary.json` (configuration and every number below).

## Setup

- Teacher: {'a tiny random BERT (smoke test)' if cfg.tiny else 'the packaged all-MiniLM-L6-v2'}; {meta['facts']['params_teacher']:,} parameters. Student:
  every encoder linear swapped at keep {cfg.keep} ({cfg.init} init, {cfg.allocation} ranks, {cfg.calib_texts}
  calibration texts), {meta['facts']['params_student']:,} parameters. Both arms start from this one swapped model.
- Training: {cfg.steps} steps, batch {cfg.batch_size}, seq {cfg.seq_len}, lr {cfg.lr}, norms and biases trained,
  the same batches in both arms. `clone`: clone loss on every block but the last (the default) + cosine
  output loss; `output only`: the cosine output loss alone.
- Diagnostics every {cfg.diag_every} steps on {cfg.diag_texts} held-out texts ({pa0['rows']} token rows): linear CKA and
  Gaussian MI with {cfg.components} components per block (ridge 1e-3); the MI estimator's expected value on
  independent data of this size is {pa0['mi_null']:.3f} nats (tokens of a text are correlated, so the true
  bias is somewhat larger). Fidelity on {meta['facts']['heldout_texts']} held-out texts.

## Per block: start and end of training

{head}
{sep}
{chr(10).join(body)}

Held-out fidelity at the end:

| arm | mean cos | min cos | NN agree |
|---|---:|---:|---:|
{fid}

Does the representation measure predict held-out mean cosine? Correlation over all {summary['checkpoints']}
checkpoints of both arms (mean over blocks, and the last block):

| measure | Pearson | Spearman |
|---|---:|---:|
{pred}
"""


def run(cfg: CloningConfig, out_dir: str, progress: bool = True, quiet: bool = False, command: str = "") -> dict:
    t0 = time.perf_counter()
    rows, facts = run_experiment(cfg, progress=progress)
    summary = analyze(rows)
    seconds = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "cloning_information.csv"))
    what = "tiny BERT" if cfg.tiny else "all-MiniLM-L6-v2"
    plot(summary, os.path.join(out_dir, "cloning_information.png"),
         f"{what} swapped at keep {cfg.keep}: clone loss vs output loss only, {cfg.steps} steps, "
         f"held-out diagnostics ({cfg.components} components)")
    meta = dict(date=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), machine=machine(),
                machine_short=f"{os.cpu_count()}-core CPU", threads=torch.get_num_threads(),
                seconds=round(seconds, 1), config=asdict(cfg), facts=facts, results=summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_readme(cfg, summary, meta, command or "python -m benchmarks.cloning_information"))
    if not quiet:
        print(format_summary(summary))
        print(f"{machine()}, {torch.get_num_threads()} thread(s): {seconds:.1f} s")
        print(f"wrote {out_dir}/cloning_information.csv, cloning_information.png, summary.json, README.md")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cloning_information", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random BERT, a few steps (seconds)")
    p.add_argument("--out", default="runs/cloning_information", help="output folder")
    p.add_argument("--steps", type=int, help="training steps per arm")
    p.add_argument("--diag-every", type=int, help="steps between diagnostics")
    p.add_argument("--components", type=int, help="MI components per block")
    p.add_argument("--allocation", choices=("uniform", "sensitivity"), help="rank allocation of the swap")
    p.add_argument("--calib-texts", type=int, help="calibration texts of the whitened init")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(TINY) if args.tiny else {}
    for k in ("steps", "diag_every", "components", "allocation", "calib_texts"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    try:
        cfg = CloningConfig(**kw)
    except ValueError as exc:
        p.error(str(exc))
    command = "python -m benchmarks.cloning_information " + " ".join(argv if argv is not None else sys.argv[1:])
    run(cfg, args.out, progress=not args.no_progress, command=command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
