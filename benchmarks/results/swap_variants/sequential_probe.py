"""Sequential (error-correcting) whitened init on all-MiniLM-L6-v2: start and 3.5-minute distillation
(2 CPU cores, 2026-11-30, session 5). The recipe's split, 1024 calibration texts, sensitivity ranks.

    python sequential_probe.py start plain          # LowRankConfig(init="whitened", allocation="sensitivity")
    python sequential_probe.py start seq            # ... sequential=True
    python sequential_probe.py start seqdocs        # ... calibrated on stdlib docstring sentences instead
    python sequential_probe.py distill runs/start_seq 3.5 "lr=2e-4"

`start` saves the student under runs/start_NAME and prints its fidelity on the held-out texts, on
385 calibration texts and on the 385 training texts outside the calibration set; `distill` trains
a saved start like the recipe does (inner clones, cached teacher) and prints held-out and training (first 512 texts) fidelity.
"""
import ast, copy, os, random, re, sys, sysconfig, time
import torch
from lrkd_fast.data import TextBatches
from lrkd_fast.distillation import distill
from lrkd_fast.evaluate import embedding_fidelity, sentence_embeddings
from lrkd_fast.recipes import _default_targets, prepare
from lrkd_fast.swap import LowRankConfig, load_lowrank, save_lowrank, swap_linear_layers


def docstring_sentences():
    """Sentences of the standard library's docstrings, split and filtered as pydoc_sentences does."""
    out, seen = [], set()
    for dp, _, files in os.walk(sysconfig.get_paths()["stdlib"]):
        if "site-packages" in dp or "test" in dp:
            continue
        for f in sorted(files):
            try:
                tree = ast.parse(open(os.path.join(dp, f), encoding="utf-8").read()) if f.endswith(".py") else None
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree) if tree else []:
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`\"'(])", re.sub(r"\s+", " ", ast.get_docstring(node) or "")):
                        s = s.strip()
                        if 40 <= len(s) <= 400 and s not in seen and sum(c.isalpha() for c in s) > len(s) / 2:
                            seen.add(s)
                            out.append(s)
    random.Random(0).shuffle(out)
    return out


torch.manual_seed(0)
pre = prepare(None, None, 512, 16, "cpu", 0, "runs/x")
T, tok = pre.teacher, pre.tok
sets = {"held": pre.held, "calib": pre.train[:385], "noncalib": pre.train[1024:], "train": pre.train[:512]}
batches = {k: list(TextBatches(v, tok, 64, 128, shuffle=False)) for k, v in sets.items()}
targets = {k: sentence_embeddings(T, b) for k, b in batches.items()}


def report(model, keys):
    fids = {k: embedding_fidelity(sentence_embeddings(model, batches[k]), targets[k]) for k in keys}
    return " ".join(f"{k} {f.mean_cosine:.4f}/{f.min_cosine:.3f}/{f.nn_agreement:.3f}" for k, f in fids.items())


if sys.argv[1] == "start":
    name = sys.argv[2]
    texts = docstring_sentences() if name.endswith("docs") else pre.train
    calib = list(TextBatches(texts[:1024], tok, 32, 128, shuffle=False))
    S = copy.deepcopy(T)
    t = time.time()
    swap_linear_layers(S, LowRankConfig(rank=0.5, allocation="sensitivity", target_modules=_default_targets(T),
                                        init="whitened", sequential=name.startswith("seq")), calibration=calib,
                       progress=False)
    print(name, "swap s", round(time.time() - t, 1), report(S, ["held", "calib", "noncalib"]), flush=True)
    save_lowrank(S, f"runs/start_{name}")
else:
    start, minutes = sys.argv[2], float(sys.argv[3])
    kw = {"clone_modules": "inner", "lr": 7e-4, **eval("dict(" + (sys.argv[4] if len(sys.argv) > 4 else "") + ")")}
    st = load_lowrank(start)
    t = time.time()
    h = distill(st, T, TextBatches(pre.train, tok, 16, 128, seed=0), steps=10000, max_minutes=minutes, progress=False,
                train_norms=True, train_bias=True, teacher_cache=True, teacher_cache_gb=8, **kw)
    print(start, minutes, kw, "steps", len(h["step"]), "s", round(time.time() - t), report(st, ["held", "train"]),
          flush=True)
