"""Distillation settings of the swap recipe, one change per run: the start, the loss targets, the
learning rate, extra loss terms, augmentations, how much text and time.

::

    python -m benchmarks.swap_variants base                          # the recipe's settings, 3.5 minutes
    python -m benchmarks.swap_variants uniform --allocation uniform  # one change against base
    python -m benchmarks.swap_variants s_8.6_lr7e-4 --lr 7e-4 --minutes 8.6
    python -m benchmarks.swap_variants seq_start --sequential --start-only
    python -m benchmarks.swap_variants half --train-texts 704 --minutes 8.6
    python -m benchmarks.swap_variants s_ema --average ema --average-param 0.995
    python -m benchmarks.swap_variants smoke --minutes 0 --steps 5 --calib-texts 64 --eval-texts 64

Task. The teacher is the packaged all-MiniLM-L6-v2; the text is CPython's pydoc sentences, split as
``lrkd-fast distill --heldout 512`` splits them (1409 training, 512 held out, seed 0). The student starts from the
teacher with every encoder linear swapped for a low-rank one holding ``--keep`` of its parameters
(``--init``, ``--allocation``, ``--sequential``; calibrated on the first ``--calib-texts`` training
sentences, or on standard-library docstring sentences with ``--calib docstrings``), is distilled
for ``--minutes`` (the learning-rate schedule ends with the budget) or ``--steps``, and is compared
with the teacher on the held-out sentences and on the first 512 training sentences (mean-pooled
embeddings: mean and min cosine, nearest-neighbour agreement).

A start is built once per start setting and reused from ``--start-dir``, so runs that change only
the distillation share one start. Each run appends one row to ``--csv`` (fixed columns, the command
line in ``command``) and prints its step times. Timed runs depend on the machine's speed: ``steps``
says how much work the budget bought.
"""
from __future__ import annotations

import argparse
import ast
import collections
import copy
import csv
import datetime as _dt
import hashlib
import heapq
import json
import os
import random
import re
import shlex
import statistics
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

CSV_FIELDS = ["date", "name", "change", "command", "minutes", "steps", "start_mean_cos", "start_nn",
              "held_mean_cos", "held_min_cos", "held_nn", "train_mean_cos", "train_nn"]
TARGETS = r"encoder\.layer\..*"  # every linear inside MiniLM's transformer blocks (the recipe's default)
_SENTENCE_END = r"(?<=[.!?])\s+(?=[A-Z`\"'(])"


# ---------------------------------------------------------------------------------------------- text
def docstring_sentences(min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """Sentences of the standard library's docstrings (other text than the training sentences, same
    length filter as :func:`lrkd_fast.data.pydoc_sentences`), in a fixed shuffled order."""
    out, seen = [], set()
    for folder, _, files in os.walk(sysconfig.get_paths()["stdlib"]):
        if "site-packages" in folder or "test" in folder:
            continue
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    doc = re.sub(r"\s+", " ", ast.get_docstring(node) or "")
                    for s in re.split(_SENTENCE_END, doc):
                        s = s.strip()
                        if min_chars <= len(s) <= max_chars and s not in seen and sum(c.isalpha() for c in s) > len(s) / 2:
                            seen.add(s)
                            out.append(s)
    random.Random(0).shuffle(out)
    return out


def extra_pydoc_texts(exclude: set) -> list[str]:
    """Pydoc text the sentence list leaves out: passages over 400 characters cut at word boundaries
    into pieces of at most 250, and sentences of 15-39 characters; none of ``exclude``."""
    from pydoc_data.topics import topics

    more = []
    for key in sorted(topics):
        for s in re.split(_SENTENCE_END, re.sub(r"\s+", " ", topics[key])):
            s = s.strip()
            if len(s) > 400:
                cur = ""
                for word in s.split(" "):
                    if len(cur) + len(word) + 1 > 250:
                        more.append(cur)
                        cur = word
                    else:
                        cur = (cur + " " + word).strip()
                if len(cur) >= 40:
                    more.append(cur)
            elif 15 <= len(s) < 40:
                more.append(s)
    return [t for t in dict.fromkeys(more) if t not in exclude and sum(c.isalpha() for c in t) > len(t) / 2]


def coverage_texts(candidates: list[str], train: list[str], tok, n: int) -> list[str]:
    """Up to ``n`` candidates chosen greedily for the tokens they add that ``train`` lacks, each new
    token weighted by how often candidates hold it."""
    ids = lambda t: set(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    seen = set().union(*map(ids, train))
    sets = [ids(c) - seen for c in candidates]
    freq = collections.Counter(t for s in sets for t in s)
    covered, chosen = set(), []
    gain = lambda i: sum(freq[t] for t in sets[i] - covered)  # noqa: E731
    heap = [(-gain(i), i) for i in range(len(candidates))]
    heapq.heapify(heap)
    while len(chosen) < n and heap:
        g, i = heapq.heappop(heap)
        now = gain(i)
        if now != -g:  # stale: push back with its current gain
            heapq.heappush(heap, (-now, i))
            continue
        if now == 0:
            break
        chosen.append(i)
        covered |= sets[i]
    return [candidates[i] for i in chosen]


class AugmentedBatches:
    """Every ``every``-th batch of ``base`` (a :class:`lrkd_fast.TextBatches`) changed token-wise:
    ``drop`` deletes ``rate`` of the tokens, ``substitute`` replaces ``rate`` of them with random
    tokens of the training text, ``crop`` keeps a random 50-100% span, ``pair`` appends a second
    random training text. Deterministic per step, so a resumed run sees the same batches."""

    def __init__(self, base, kind: str, rate: float, every: int, tok, texts: list[str]):
        self.base, self.kind, self.rate, self.every, self.tok, self.texts = base, kind, rate, every, tok, texts
        self.vocab = sorted(set().union(*(tok(t, add_special_tokens=False)["input_ids"] for t in texts[:2000])))

    def __len__(self):
        return len(self.base)

    def batch(self, step: int) -> dict:
        b = self.base.batch(step)
        if step % self.every != self.every - 1:
            return b
        g = torch.Generator().manual_seed(1000 + step)
        rows = []
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            row = ids[mask.bool()].tolist()[1:-1]
            if self.kind == "drop":
                keep = (torch.rand(len(row), generator=g) >= self.rate).tolist()
                row = [t for t, k in zip(row, keep) if k] or row[:1]
            elif self.kind == "substitute":
                swap = (torch.rand(len(row), generator=g) < self.rate).tolist()
                new = torch.randint(len(self.vocab), (len(row),), generator=g).tolist()
                row = [self.vocab[n] if s else t for t, s, n in zip(row, swap, new)]
            elif self.kind == "crop":
                n = len(row)
                length = max(4, int(n * (0.5 + 0.5 * torch.rand(1, generator=g).item())))
                s0 = torch.randint(0, max(1, n - length + 1), (1,), generator=g).item()
                row = row[s0:s0 + length]
            else:  # pair
                j = torch.randint(len(self.texts), (1,), generator=g).item()
                row = (row + self.tok(self.texts[j], add_special_tokens=False)["input_ids"])[:self.base.seq_len - 2]
            rows.append([self.tok.cls_token_id] + row + [self.tok.sep_token_id])
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in b:
            out["token_type_ids"] = torch.zeros_like(ids)
        return out


def padded_batches(texts, tok, batch_size, seq_len, seed, multiple: int):
    """:class:`lrkd_fast.TextBatches` whose batches are padded to a multiple of ``multiple`` tokens."""
    from lrkd_fast import TextBatches

    class PaddedBatches(TextBatches):
        def encode(self, texts):
            enc = self.tok(texts, padding=True, truncation=True, max_length=self.seq_len, return_tensors="pt",
                           pad_to_multiple_of=multiple)
            return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    return PaddedBatches(texts, tok, batch_size, seq_len, seed=seed)


# ---------------------------------------------------------------------------------------------- losses
def _make_probe_distiller(args, teacher, tok, train):
    """A Distiller whose loss adds the terms the flags ask for (``--batch-sim``, ``--bank-kl``,
    ``--attn-kl``) to the recipe's loss, from forward hooks; None when no term is asked for."""
    if not (args.batch_sim or args.bank_kl or args.attn_kl):
        return None
    from lrkd_fast import Distiller, TextBatches
    from lrkd_fast.evaluate import mean_pool, sentence_embeddings

    # the teacher's embedding of every training text, looked up by its token ids (pooling ignores padding)
    bank = sentence_embeddings(teacher, list(TextBatches(train, tok, 64, args.seq_len, shuffle=False)))
    keys = [tuple(tok(t, truncation=True, max_length=args.seq_len)["input_ids"]) for t in train]
    row_of = {k: i for i, k in enumerate(keys)}
    attn_names = [n for n, _ in teacher.named_modules() if re.search(r"attention\.self\.(query|key|value)$", n)]
    heads = teacher.config.num_attention_heads

    def attention_logp(q, k, mask):
        B, L, D = q.shape
        q, k = (t.view(B, L, heads, D // heads).transpose(1, 2) for t in (q, k))
        s = (q @ k.transpose(-1, -2)).float() / (D // heads) ** 0.5
        return F.log_softmax(s.masked_fill(~mask[:, None, None, :].bool(), -1e4), -1)

    class ProbeDistiller(Distiller):
        def __init__(self, student, teacher, config):
            super().__init__(student, teacher, config)
            self.caught = {"student": {}, "teacher": {}}
            self.handles = [student.register_forward_hook(self._catch("student", "out"))]
            if args.attn_kl:
                for n in attn_names:
                    self.handles.append(student.get_submodule(n).register_forward_hook(self._catch("student", n)))
                    self.handles.append(teacher.get_submodule(n).register_forward_hook(self._catch("teacher", n)))

        def _catch(self, who, name):
            def hook(module, inputs, output):
                self.caught[who][name] = output
            return hook

        def close(self):
            super().close()
            for h in self.handles:
                h.remove()

        def compute_loss(self, batch):
            loss, parts = super().compute_loss(batch)
            mask = batch["attention_mask"]
            es = F.normalize(mean_pool(self.caught["student"]["out"].last_hidden_state.float(), mask), dim=-1)
            if args.batch_sim or args.bank_kl:
                rows = [row_of.get(tuple(ids[m.bool()].tolist())) for ids, m in zip(batch["input_ids"], mask)]
                if None in rows:  # an augmented text: ask the teacher
                    with torch.no_grad():
                        et = F.normalize(mean_pool(self.teacher(**batch).last_hidden_state.float(), mask), dim=-1)
                else:
                    et = bank[rows]
            if args.batch_sim:
                term = ((es @ es.t() - et @ et.t()) ** 2).mean()
                parts["batch_sim"] = term.item()
                loss = loss + args.batch_sim * term
            if args.bank_kl:
                tau = args.bank_tau
                own = (et @ bank.t()) > 0.9999  # the text itself is in the bank
                lt = (et @ bank.t() / tau).masked_fill(own, -1e4)
                ls = (es @ bank.t() / tau).masked_fill(own, -1e4)
                term = tau * F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="batchmean")
                parts["bank_kl"] = term.item()
                loss = loss + args.bank_kl * term
            if args.attn_kl:
                with torch.no_grad():  # the teacher runs every step: its maps are not cached
                    self.teacher(**batch)
                s, t = self.caught["student"], self.caught["teacher"]
                term = 0.0
                for i in range(0, len(attn_names), 3):
                    q, k = attn_names[i], attn_names[i + 1]
                    lt, ls = attention_logp(t[q], t[k], mask), attention_logp(s[q], s[k], mask)
                    kl = (lt.exp() * (lt - ls)).sum(-1)
                    m = mask[:, None, :].float()
                    term = term + (kl * m).sum() / (m.sum() * heads)
                parts["attn_kl"] = float(term.detach())
                loss = loss + args.attn_kl * term
            return loss, parts

    return ProbeDistiller


# ---------------------------------------------------------------------------------------------- training
class WeightAverage:
    """Running average of the trained parameters, updated after every optimizer step: ``ema`` with
    decay ``param``, or ``swa``: the uniform mean of the steps after ``param`` of the time budget."""

    def __init__(self, params: list, mode: str, param: float, seconds: float):
        self.params, self.mode, self.param, self.seconds = params, mode, param, seconds
        self.avg = [p.detach().clone() for p in params]
        self.count, self.t0 = 0, time.time()

    @torch.no_grad()
    def __call__(self, step: int, parts: dict) -> None:
        if self.mode == "ema":
            self.count += 1
            for a, p in zip(self.avg, self.params):
                a.mul_(self.param).add_(p.detach(), alpha=1 - self.param)
        elif (time.time() - self.t0) >= self.param * self.seconds:
            self.count += 1
            for a, p in zip(self.avg, self.params):
                a.add_(p.detach() - a, alpha=1.0 / self.count)

    @torch.no_grad()
    def apply(self) -> None:
        for a, p in zip(self.avg, self.params):
            p.copy_(a)


def _rank_pattern(items: list[str]) -> dict:
    pattern = {}
    for item in items:
        regex, sep, rank = item.rpartition("=")
        if not sep or not regex:
            raise ValueError(f"--rank-pattern wants REGEX=RANK, got {item!r}")
        pattern[regex] = float(rank) if "." in rank else int(rank)
    return pattern


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.swap_variants", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", help="row label in the CSV")
    g = p.add_argument_group("start (built once per setting, kept under --start-dir)")
    g.add_argument("--keep", type=float, default=0.5, help="fraction of the swapped layers' parameters kept")
    g.add_argument("--init", choices=["whitened", "svd"], default="whitened", help="low-rank init")
    g.add_argument("--allocation", choices=["sensitivity", "uniform"], default="sensitivity",
                   help="how the parameter budget is spread over the layers (sensitivity needs --init whitened)")
    g.add_argument("--sequential", action="store_true", help="error-correcting whitened init (LowRankConfig.sequential)")
    g.add_argument("--rank-pattern", nargs="+", default=[], metavar="REGEX=RANK",
                   help="per-layer ranks, e.g. query=64 key=64 (with --allocation uniform)")
    g.add_argument("--calib", choices=["train", "docstrings"], default="train",
                   help="calibration text: the first training sentences, or standard-library docstring sentences")
    g.add_argument("--calib-texts", type=int, default=1024, help="calibration sentences")
    g.add_argument("--damping", type=float, default=1e-2, help="whitened init: diagonal damping of the input covariance")
    g.add_argument("--sensitivity-batches", type=int, default=2, help="calibration batches the sensitivity measurement runs")
    g.add_argument("--start-only", action="store_true", help="evaluate the start and stop (no distillation)")
    g = p.add_argument_group("distillation")
    g.add_argument("--minutes", type=float, default=3.5, help="time budget; the schedule ends with it (0: --steps only)")
    g.add_argument("--steps", type=int, default=100000, help="most optimizer steps")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--clone", choices=["inner", "auto", "lowrank"], default="inner",
                   help="activations cloned: every block's output but the last, every block's, every swapped layer's")
    g.add_argument("--clone-modules", nargs="+", default=None, metavar="NAME",
                   help="clone exactly these modules instead (e.g. encoder.layer.0 ... encoder.layer.3)")
    g.add_argument("--output-weight", type=float, default=1.0, help="weight of the embedding cosine loss")
    g.add_argument("--batch-size", type=int, default=16, help="texts per step")
    g.add_argument("--seq-len", type=int, default=128, help="most tokens per text")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine", help="after warm-up")
    g.add_argument("--dropout", action="store_true", help="keep the student's dropout on while training")
    g.add_argument("--freeze", default=None, metavar="REGEX", help="keep the parameters whose names match frozen")
    g.add_argument("--l2sp", type=float, default=0.0, help="add this x (U, V - their start) to their gradients")
    g.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto", help="auto: fp32 on CPU")
    g.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa", help="the student's attention kernel")
    g.add_argument("--pad-multiple", type=int, default=0, help="pad every batch to a multiple of this many tokens")
    g.add_argument("--no-teacher-cache", dest="teacher_cache", action="store_false",
                   help="run the teacher on every step instead of reusing its targets")
    g.add_argument("--seed", type=int, default=0, help="training seed")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the batch order")
    g.add_argument("--average", choices=["none", "ema", "swa"], default="none",
                   help="evaluate an average of the weights instead of the last ones")
    g.add_argument("--average-param", type=float, default=0.995,
                   help="ema: decay; swa: fraction of the budget after which steps are averaged")
    g = p.add_argument_group("extra loss terms")
    g.add_argument("--batch-sim", type=float, default=0.0,
                   help="weight of the MSE between student and teacher in-batch cosine-similarity matrices")
    g.add_argument("--bank-kl", type=float, default=0.0,
                   help="weight of a KL between student and teacher similarity rows against every training text")
    g.add_argument("--bank-tau", type=float, default=0.05, help="temperature of --bank-kl")
    g.add_argument("--attn-kl", type=float, default=0.0,
                   help="weight of a KL between every block's per-head attention maps (the teacher runs every step)")
    g = p.add_argument_group("data")
    g.add_argument("--train-texts", type=int, default=None, help="use only the first N training sentences (calibration too)")
    g.add_argument("--extra-pydoc", action="store_true", help="add the pydoc passages the sentence list leaves out")
    g.add_argument("--coverage-texts", type=int, default=0,
                   help="add this many docstring sentences chosen to cover tokens the training text lacks")
    g.add_argument("--augment", choices=["drop", "substitute", "crop", "pair"], default=None,
                   help="change every --augment-every-th batch token-wise")
    g.add_argument("--augment-rate", type=float, default=0.15, help="fraction of tokens for drop / substitute")
    g.add_argument("--augment-every", type=int, default=2, help="augment every n-th batch")
    g.add_argument("--eval-texts", type=int, default=512, help="held-out and training sentences evaluated")
    g = p.add_argument_group("output")
    g.add_argument("--csv", default="runs/swap_variants/variants.csv", help="CSV the row is appended to")
    g.add_argument("--start-dir", default="runs/swap_variants", help="where starts are kept for reuse")
    g.add_argument("--no-progress", action="store_true")
    return p


def _change(args, parser) -> str:
    """The settings that differ from the defaults."""
    defaults = vars(parser.parse_args([args.name]))
    skip = {"name", "csv", "start_dir", "no_progress", "eval_texts"}
    out = [f"{k}={v}" for k, v in vars(args).items() if k not in skip and v != defaults[k]]
    return " ".join(out) or "none"


def _start(args, teacher, tok, train):
    from lrkd_fast import LowRankConfig, TextBatches, load_lowrank, save_lowrank, swap_linear_layers

    key = {k: getattr(args, k) for k in ("keep", "init", "allocation", "sequential", "rank_pattern", "calib",
                                         "calib_texts", "damping", "sensitivity_batches", "train_texts", "seq_len")}
    path = os.path.join(args.start_dir, "start-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10])
    if os.path.exists(os.path.join(path, "start_settings.json")):
        return load_lowrank(path), path, 0.0
    texts = docstring_sentences() if args.calib == "docstrings" else train
    calib = list(TextBatches(texts[:args.calib_texts], tok, 32, args.seq_len, shuffle=False))
    student = copy.deepcopy(teacher)
    cfg = LowRankConfig(rank=args.keep, target_modules=TARGETS, init=args.init, allocation=args.allocation,
                        sequential=args.sequential, rank_pattern=_rank_pattern(args.rank_pattern),
                        damping=args.damping, sensitivity_batches=args.sensitivity_batches)
    t0 = time.time()
    swap_linear_layers(student, cfg, calibration=calib, progress=not args.no_progress)
    seconds = time.time() - t0
    save_lowrank(student, path)
    with open(os.path.join(path, "start_settings.json"), "w") as f:
        json.dump(key, f, indent=1)
    return student, path, seconds


def _write_row(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.allocation == "sensitivity" and args.init != "whitened":
        parser.error("--allocation sensitivity needs --init whitened")
    if args.sequential and args.init != "whitened":
        parser.error("--sequential needs --init whitened")
    try:
        _rank_pattern(args.rank_pattern)
    except ValueError as exc:
        parser.error(str(exc))
    import transformers
    from lrkd_fast import DistillConfig, Distiller, TextBatches
    from lrkd_fast.data import packaged_minilm_path, pydoc_sentences, split_texts
    from lrkd_fast.evaluate import embedding_fidelity, sentence_embeddings

    torch.manual_seed(0)
    path = packaged_minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    teacher = transformers.AutoModel.from_pretrained(path).eval()
    train, held = split_texts(pydoc_sentences(), 512, seed=0)
    if args.train_texts:
        train = train[:args.train_texts]
    evals = {"held": held[:args.eval_texts], "train": train[:args.eval_texts]}
    batches = {k: list(TextBatches(v, tok, 64, args.seq_len, shuffle=False)) for k, v in evals.items()}
    targets = {k: sentence_embeddings(teacher, b) for k, b in batches.items()}

    def fidelity(model, which):
        return embedding_fidelity(sentence_embeddings(model, batches[which]), targets[which])

    student, start_path, start_s = _start(args, teacher, tok, train)
    f0 = fidelity(student, "held")
    print(f"start {start_path} ({start_s:.0f} s to build): held-out {f0.mean_cosine:.4f} / {f0.min_cosine:.3f} / "
          f"{f0.nn_agreement:.3f}", flush=True)
    row = {"date": _dt.date.today().isoformat(), "name": args.name, "change": _change(args, parser),
           "command": "python -m benchmarks.swap_variants " + " ".join(shlex.quote(a) for a in argv),
           "start_mean_cos": f"{f0.mean_cosine:.4f}", "start_nn": f"{f0.nn_agreement:.3f}"}
    if args.start_only:
        ft = fidelity(student, "train")
        row.update(minutes=0, steps=0, held_mean_cos=row["start_mean_cos"], held_min_cos=f"{f0.min_cosine:.3f}",
                   held_nn=row["start_nn"], train_mean_cos=f"{ft.mean_cosine:.4f}", train_nn=f"{ft.nn_agreement:.3f}")
        _write_row(args.csv, row)
        return 0

    if args.extra_pydoc:
        more = extra_pydoc_texts(set(held))
        print(f"+ {len(more)} pydoc passages", flush=True)
        train = train + more
    if args.coverage_texts:
        chosen = coverage_texts(docstring_sentences(), train, tok, args.coverage_texts)
        print(f"+ {len(chosen)} docstring sentences for token coverage", flush=True)
        train = train + chosen
    if args.attention != "sdpa":
        student.config._attn_implementation = args.attention
    if args.pad_multiple:
        data = padded_batches(train, tok, args.batch_size, args.seq_len, args.data_seed, args.pad_multiple)
    else:
        data = TextBatches(train, tok, args.batch_size, args.seq_len, seed=args.data_seed)
    if args.augment:
        data = AugmentedBatches(data, args.augment, args.augment_rate, args.augment_every, tok, train)
    cfg = DistillConfig(steps=args.steps, max_minutes=args.minutes or None, lr=args.lr, weight_decay=args.weight_decay,
                        schedule=args.schedule, clone_modules=args.clone_modules or args.clone,
                        output_weight=args.output_weight, train_norms=True, train_bias=True, dropout=args.dropout,
                        autocast=args.autocast, teacher_cache=args.teacher_cache, teacher_cache_gb=8,
                        seed=args.seed, progress=not args.no_progress)
    d = (_make_probe_distiller(args, teacher, tok, train) or Distiller)(student, teacher, cfg)
    if args.freeze:
        names = {id(p): n for n, p in student.named_parameters()}
        frozen = [p for p in d.params if re.search(args.freeze, names[id(p)])]
        for p in frozen:
            p.requires_grad_(False)
        d.params = [p for p in d.params if p.requires_grad]
        print(f"frozen: {sum(p.numel() for p in frozen):,} of {sum(p.numel() for p in frozen + d.params):,} "
              "trainable parameters", flush=True)
    if args.l2sp:
        for n, p in student.named_parameters():
            if p.requires_grad and n.endswith((".U", ".V")):
                start = p.detach().clone()
                p.register_hook(lambda g, p=p, start=start: g + args.l2sp * (p.detach() - start))
    average = WeightAverage(d.params, args.average, args.average_param, 60 * (args.minutes or 0)) \
        if args.average != "none" else None
    stamps = [time.time()]

    def on_step(step, parts):
        stamps.append(time.time())
        if average is not None:
            average(step, parts)

    try:
        history = d.train(data, on_step=on_step)
    finally:
        d.close()
    dt = [b - a for a, b in zip(stamps, stamps[1:])]
    print(f"step time: median {statistics.median(dt):.3f} s, mean {statistics.mean(dt):.3f} s, "
          f"slowest {max(dt):.3f} s over {len(dt)} steps ({stamps[-1] - stamps[0]:.0f} s)", flush=True)
    if average is not None:
        last = fidelity(student, "held")
        print(f"last weights: held-out {last.mean_cosine:.4f} / {last.min_cosine:.3f} / {last.nn_agreement:.3f}; "
              f"evaluating the {args.average} average of {average.count} steps", flush=True)
        average.apply()
    student.config._attn_implementation = "sdpa"
    fh, ft = fidelity(student, "held"), fidelity(student, "train")
    row.update(minutes=args.minutes, steps=len(history["step"]), held_mean_cos=f"{fh.mean_cosine:.4f}",
               held_min_cos=f"{fh.min_cosine:.3f}", held_nn=f"{fh.nn_agreement:.3f}",
               train_mean_cos=f"{ft.mean_cosine:.4f}", train_nn=f"{ft.nn_agreement:.3f}")
    print(f"{args.name}: {row['steps']} steps; held-out {row['held_mean_cos']} / {row['held_min_cos']} / "
          f"{row['held_nn']}; training texts {row['train_mean_cos']} / {row['train_nn']}")
    _write_row(args.csv, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
