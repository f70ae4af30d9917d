"""Low-Rank Clone: the paper's attention-output clone term against the authors' code's (issue 15).

::

    python -m benchmarks.lrc_attn_clone --causal --out benchmarks/results/lrc_attn_clone    # tiny Llama
    python -m benchmarks.lrc_attn_clone --minilm --out benchmarks/results/lrc_attn_clone    # MiniLM

Both forms (``LowRankClone(attn_clone=...)``): "student" = E(o_S, o_T P_o) in the student width;
"teacher" = the student's attention result through the teacher's o_proj against o_T, in the
teacher width (no gradient to P_o from that term). Everything else is equal between the two arms.

* ``--minilm``: the default ``lrkd-fast distill --method lrc`` run (all-MiniLM-L6-v2 384 -> 256 on
  the built-in corpus, the recipe's defaults: pca init, 100 steps, lr 1e-3, batch 32, 128
  tokens), once per form through :func:`lrkd_fast.recipes.run_lrc_recipe` (what the command runs,
  with ``--attn-clone FORM``). Held-out fidelity is the recipe's (ridge read-out), on the 512
  held-out pydoc sentences and (``other_*``) the 512 standard-library sentences never trained on.
* ``--causal``: a tiny Llama (hidden 128, 2 layers, 4 heads / 2 KV heads, FFN 344) over a
  2048-token vocabulary (the MiniLM tokenizer's 2046 most frequent ids on the training texts, plus
  padding and unknown), first trained as a language model on the training texts (``teacher_steps``,
  seed 0) so that it is a teacher worth cloning, then cloned to hidden 64 with the recipe's training
  settings (pca init, 100 steps, lr 1e-3, 5% warm-up then cosine, batch 32, 64 tokens) for every
  form and seed (0, 1: the seed sets the batch order; ``CausalConfig.inits`` adds the random init,
  whose draw the seed sets too). Held out:
  next-token cross-entropy of the student, KL(p_T || p_S) at T = 1 per token, and read-out
  fidelity of mean-pooled last hidden states.

Training losses of the two forms are not comparable as totals (the attention term differs); the
CSV has the form-independent parts (``kd+lm`` / ``embed``) as well.

Writes ``OUT/minilm.csv`` and ``OUT/causal.csv`` (one row per run) and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORMS = ("student", "teacher")
MINILM_FIELDS = ["form", "seed", "steps", "start_mean_cos", "mean_cos", "min_cos", "nn_agree", "other_mean_cos",
                 "other_nn_agree", "train_embed_last10",
                 "train_clone_last10", "train_clone_o_last10", "train_s", "total_s"]
CAUSAL_FIELDS = ["form", "init", "seed", "steps", "heldout_ce", "teacher_heldout_ce", "heldout_kl", "mean_cos",
                 "min_cos", "nn_agree", "start_heldout_ce", "train_kdlm_last10", "train_loss_last10", "train_s"]


def _last(history: dict, key: str, k: int = 10) -> float:
    vals = [p[key] for p in history["parts"][-k:] if key in p]
    return sum(vals) / len(vals) if vals else float("nan")


# ----------------------------------------------------------------------------- MiniLM (the default run)

def run_minilm(forms=FORMS, seeds=(0,), out_dir: str = "runs/lrc_attn_clone", progress: bool = False,
               **recipe) -> list[dict]:
    """One default run per form and seed (the recipe's ``seed``: its held-out split, batch order and init draw)."""
    from lrkd_fast.recipes import LRCRecipe, run_lrc_recipe

    rows = []
    for seed, form in [(s, f) for s in seeds for f in forms]:
        t0 = time.time()
        r = run_lrc_recipe(LRCRecipe(attn_clone=form, seed=seed, output=os.path.join(out_dir, f"minilm-{form}-{seed}"),
                                     overwrite=True, progress=progress, **recipe))
        start, end, other = r.rows[1].fidelity, r.rows[2].fidelity, getattr(r.rows[2], "other", None)
        rows.append(dict(form=form, seed=seed, steps=len(r.history["step"]), start_mean_cos=start.mean_cosine,
                         mean_cos=end.mean_cosine, min_cos=end.min_cosine, nn_agree=end.nn_agreement,
                         other_mean_cos=other.mean_cosine if other else float("nan"),
                         other_nn_agree=other.nn_agreement if other else float("nan"),
                         train_embed_last10=_last(r.history, "embed"), train_clone_last10=_last(r.history, "clone"),
                         train_clone_o_last10=_last(r.history, "clone_o"), train_s=r.rows[2].seconds,
                         total_s=time.time() - t0))
        print(r.table(), flush=True)
    return rows


# ----------------------------------------------------------------------------- tiny causal model

@dataclass
class CausalConfig:
    vocab: int = 2048
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 344
    student_hidden: int = 64
    seq_len: int = 64
    batch_size: int = 32
    heldout: int = 256
    fit_texts: int = 256
    teacher_steps: int = 300
    teacher_lr: float = 3e-3
    steps: int = 100
    lr: float = 1e-3
    seeds: tuple = (0, 1)
    inits: tuple = ("pca",)  # the recipe's default; ("pca", "random") for the paper's init too
    forms: tuple = FORMS
    train_texts: int | None = None  # cap (None: all but the held-out ones)


def _encode(texts, tok, keep: dict, seq_len: int) -> list[list[int]]:
    ids = tok(texts, add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
    return [[keep.get(i, 1) for i in row] or [1] for row in ids]


def _batches(rows: list[list[int]], batch_size: int, seed=None) -> list[dict]:
    order = list(range(len(rows)))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(rows), generator=g).tolist()
    out = []
    for i in range(0, len(order) - batch_size + 1 if seed is not None else len(order), batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        L = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        am = torch.zeros(len(chunk), L, dtype=torch.long)
        for k, r in enumerate(chunk):
            ids[k, :len(r)] = torch.tensor(r)
            am[k, :len(r)] = 1
        out.append({"input_ids": ids, "attention_mask": am})
    return out


def _lm_ce(logits, batch) -> tuple[float, int]:
    ids, am = batch["input_ids"], batch["attention_mask"]
    lab = torch.where(am[:, 1:].bool(), ids[:, 1:], -100)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), lab.reshape(-1), reduction="sum")
    return ce.item(), int((lab != -100).sum())


@torch.no_grad()
def _heldout(student, teacher, held_b) -> dict:
    ce_s = ce_t = kl = 0.0
    n_ce = n_kl = 0
    for b in held_b:
        s, t = student(**b).logits.float(), teacher(**b).logits.float()
        a, n = _lm_ce(s, b)
        ce_s, n_ce = ce_s + a, n_ce + n
        ce_t += _lm_ce(t, b)[0]
        keep = b["attention_mask"].reshape(-1).bool()
        ls, lt = F.log_softmax(s.reshape(-1, s.shape[-1])[keep], -1), F.log_softmax(t.reshape(-1, t.shape[-1])[keep], -1)
        kl += (lt.exp() * (lt - ls)).sum().item()
        n_kl += int(keep.sum())
    return dict(heldout_ce=ce_s / n_ce, teacher_heldout_ce=ce_t / n_ce, heldout_kl=kl / n_kl)


def causal_teacher(cfg: CausalConfig, train_b: list) -> torch.nn.Module:
    """The tiny Llama, trained as a language model on ``train_b`` (seed 0)."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.seq_len,
        pad_token_id=0, bos_token_id=None, eos_token_id=None))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / cfg.teacher_steps))
    model.train()
    for step in range(cfg.teacher_steps):
        b = train_b[step % len(train_b)]
        lab = torch.where(b["attention_mask"].bool(), b["input_ids"], -100)
        loss = model(**b, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


def run_causal(cfg: CausalConfig, progress: bool = False, log=print) -> list[dict]:
    from lrkd_fast.clone import LowRankClone, LRCTrainer
    from lrkd_fast.data import packaged_minilm_path, pydoc_sentences, split_texts
    from lrkd_fast.evaluate import readout_fidelity, sentence_embeddings
    from lrkd_fast.training import TrainConfig
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(packaged_minilm_path())
    train, held = split_texts(pydoc_sentences(), cfg.heldout, seed=0)
    if cfg.train_texts is not None:
        train = train[:cfg.train_texts]
    counts = Counter(i for row in tok(train, add_special_tokens=False)["input_ids"] for i in row)
    keep = {i: k + 2 for k, (i, _) in enumerate(counts.most_common(cfg.vocab - 2))}  # 0 pad, 1 unknown
    train_rows, held_rows = _encode(train, tok, keep, cfg.seq_len), _encode(held, tok, keep, cfg.seq_len)
    held_b = _batches(held_rows, 64)
    fit_b = _batches(train_rows[:cfg.fit_texts], 64)
    t0 = time.time()
    teacher = causal_teacher(cfg, _batches(train_rows, cfg.batch_size, seed=0))
    log(f"teacher: {cfg.teacher_steps} LM steps in {time.time() - t0:.0f} s")
    t_fit, t_held = sentence_embeddings(teacher, fit_b), sentence_embeddings(teacher, held_b)
    rows = []
    for init in cfg.inits:
        for seed in cfg.seeds:
            for form in cfg.forms:
                torch.manual_seed(seed)
                calib = _batches(train_rows[:256], 32) if init == "pca" else None
                clone = LowRankClone.from_teacher(teacher, cfg.student_hidden, init=init, calibration=calib,
                                                  attn_clone=form)
                start = _heldout(clone.export_student(), teacher, held_b)
                data = _batches(train_rows, cfg.batch_size, seed=seed)
                trainer = LRCTrainer(clone, TrainConfig(steps=cfg.steps, lr=cfg.lr, seed=seed, progress=progress))
                t1 = time.time()
                hist = trainer.train(data)
                train_s = time.time() - t1
                student = clone.export_student()
                fid = readout_fidelity(sentence_embeddings(student, fit_b), t_fit, sentence_embeddings(student, held_b),
                                       t_held)
                clone.close()
                row = dict(form=form, init=init, seed=seed, steps=len(hist["step"]), **_heldout(student, teacher, held_b),
                           mean_cos=fid.mean_cosine, min_cos=fid.min_cosine, nn_agree=fid.nn_agreement,
                           start_heldout_ce=start["heldout_ce"], train_kdlm_last10=_last(hist, "kd+lm"),
                           train_loss_last10=_last(hist, "loss"), train_s=train_s)
                rows.append(row)
                log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


def merge_rows(rows: list[dict], path: str, keys=("form", "seed")) -> list[dict]:
    """``rows`` after the rows of the CSV at ``path`` (if any) that they do not replace (same ``keys``);
    a row written before the CSV had a ``seed`` column was seed 0."""
    if not os.path.exists(path):
        return rows
    with open(path, newline="") as f:
        old = [dict(r, seed=r.get("seed") or "0") for r in csv.DictReader(f)]
    new = {tuple(str(r[k]) for k in keys) for r in rows}
    return [r for r in old if tuple(str(r[k]) for k in keys) not in new] + rows


def write_csv(rows: list[dict], fields: list, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", action="store_true", help="the default MiniLM run, once per form")
    ap.add_argument("--causal", action="store_true", help="the tiny Llama, per form, init and seed")
    ap.add_argument("--out", default="runs/lrc_attn_clone")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="--minilm: the recipe seeds to run (default 0); "
                    "rows of other seeds already in OUT/minilm.csv are kept")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if not (a.minilm or a.causal):
        ap.error("give --minilm and/or --causal")
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if a.causal:
        t0 = time.time()
        write_csv(run_causal(CausalConfig()), CAUSAL_FIELDS, os.path.join(a.out, "causal.csv"))
        print(f"causal: {time.time() - t0:.0f} s")
    if a.minilm:
        t0 = time.time()
        path = os.path.join(a.out, "minilm.csv")
        rows = run_minilm(seeds=tuple(a.seeds), out_dir=os.path.join("runs", "lrc_attn_clone"))
        write_csv(merge_rows(rows, path), MINILM_FIELDS, path)
        print(f"minilm: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
