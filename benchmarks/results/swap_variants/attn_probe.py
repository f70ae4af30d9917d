"""Attention-map distillation on the MiniLM recipe (2 CPU cores, 2026-11-30, session 5): adds
KL(teacher || student) between per-head softmax(x y^T / sqrt(d_h)) maps of every block's query/key/value
outputs (MiniLM-style; "qk" is the attention map itself, "qq,kk,vv" the self-relations) to the recipe's
loss, with the teacher run on every step for its maps.
    python attn_probe.py runs/start_plain 3.5 1.0 qk
"""
import torch, time, sys, re
import torch.nn.functional as F
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
st = load_lowrank(sys.argv[1]); minutes = float(sys.argv[2]); w = float(sys.argv[3]); kinds = sys.argv[4]
H = 12
cap = {"s": {}, "t": {}}
def hook(who, name):
    def fn(m, a, out): cap[who][name] = out
    return fn
names = [n for n, _ in teacher.named_modules() if re.search(r"attention\.self\.(query|key|value)$", n)]
for n in names:
    st.get_submodule(n).register_forward_hook(hook("s", n)); teacher.get_submodule(n).register_forward_hook(hook("t", n))
def rel(a, b, mask):
    B, L, D = a.shape; dh = D // H
    a = a.view(B, L, H, dh).transpose(1, 2); b = b.view(B, L, H, dh).transpose(1, 2)
    s = a @ b.transpose(-1, -2) / dh ** 0.5
    s = s.masked_fill(~mask[:, None, None, :].bool(), -1e4)
    return F.log_softmax(s.float(), -1)
def kl(lt, ls, mask):
    k = (lt.exp() * (lt - ls)).sum(-1)  # B,H,L
    m = mask[:, None, :].float()
    return (k * m).sum() / (m.sum() * H)
orig = Distiller.compute_loss
def cl(self, batch):
    loss, parts = orig(self, batch)
    with torch.no_grad(): teacher(**batch)
    mask = batch["attention_mask"]
    a = 0.0
    for i in range(0, len(names), 3):
        q, k, v = names[i:i + 3]
        pairs = {"qk": (q, k), "qq": (q, q), "kk": (k, k), "vv": (v, v)}
        for kind in kinds.split(","):
            x, y = pairs[kind]
            lt = rel(cap["t"][x], cap["t"][y], mask); ls = rel(cap["s"][x], cap["s"][y], mask)
            a = a + kl(lt, ls, mask)
    parts["attn"] = float(a)
    return loss + w * a, parts
Distiller.compute_loss = cl
cfg = DistillConfig(steps=10000, max_minutes=minutes, progress=False, train_norms=True, train_bias=True, teacher_cache=True, teacher_cache_gb=8, clone_modules="inner", lr=3e-4)
d = Distiller(st, teacher, cfg)
h = d.train(TextBatches(train, tok, 16, 128, seed=0)); d.close()
f = embedding_fidelity(sentence_embeddings(st, hb), te)
print(sys.argv[1:], "steps", len(h["step"]), "held %.4f %.3f %.3f" % (f.mean_cosine, f.min_cosine, f.nn_agreement), "last parts", h["parts"][-1], flush=True)
