"""Weight averaging on the MiniLM recipe (2 CPU cores, 2026-11-30, session 5): distill a saved start
(runs/start_plain from sequential_probe.py) and compare the last weights with an average of them.
    python ema_swa_probe.py runs/start_plain 3.5 ema 0.995                      # EMA over the whole run
    python ema_swa_probe.py runs/start_plain 3.5 swa 0.5 "schedule='constant'"  # uniform average of the last half
"""
import torch, time, sys
from transformers import AutoModel, AutoTokenizer
from lrkd_fast.data import *
from lrkd_fast.evaluate import *
from lrkd_fast.distillation import Distiller, DistillConfig
from lrkd_fast.swap import load_lowrank
torch.manual_seed(0)
p = packaged_minilm_path()
tok = AutoTokenizer.from_pretrained(p); teacher = AutoModel.from_pretrained(p).eval()
S = pydoc_sentences(); train, held = split_texts(S, 512)
hb = list(TextBatches(held, tok, 64, 128, shuffle=False)); te = sentence_embeddings(teacher, hb)
st = load_lowrank(sys.argv[1]); minutes = float(sys.argv[2]); mode = sys.argv[3]; arg = float(sys.argv[4])
kw = eval("dict(" + (sys.argv[5] if len(sys.argv) > 5 else "") + ")")
kw = {"clone_modules": "inner", "lr": 3e-4, **kw}
cfg = DistillConfig(steps=10000, max_minutes=minutes, progress=False, train_norms=True, train_bias=True, teacher_cache=True, teacher_cache_gb=8, **kw)
d = Distiller(st, teacher, cfg)
params = d.params
avg = [p.detach().clone() for p in params]; n = [0]
t0 = time.time()
def on_step(step, parts):
    frac = (time.time() - t0) / (60 * minutes)
    with torch.no_grad():
        if mode == "ema":
            for a, p in zip(avg, params): a.mul_(arg).add_(p.detach(), alpha=1 - arg)
        elif mode == "swa" and frac >= arg:
            n[0] += 1
            for a, p in zip(avg, params): a.add_(p.detach() - a, alpha=1.0 / n[0])
h = d.train(TextBatches(train, tok, 16, 128, seed=0), on_step=on_step); d.close()
raw = embedding_fidelity(sentence_embeddings(st, hb), te)
with torch.no_grad():
    for a, p in zip(avg, params): p.copy_(a)
av = embedding_fidelity(sentence_embeddings(st, hb), te)
print(sys.argv[1:], "steps", len(h["step"]), "avg over", n[0], "raw %.4f %.3f %.3f" % (raw.mean_cosine, raw.min_cosine, raw.nn_agreement),
      "avg %.4f %.3f %.3f" % (av.mean_cosine, av.min_cosine, av.nn_agreement), flush=True)
