"""Variant runs of the MiniLM swap recipe (2 CPU cores): one script, the recipe's data split and a
fixed low-rank start, one change per run. Session 2 of 2026-11-30 (``runs.txt``) and session 4 of the
same day (``runs_allocation.txt``). Usage:

    python benchmarks/results/swap_variants/variants.py NAME MINUTES "overrides"
    python .../variants.py base 4 ""                       # clone_modules='inner', lr 7e-4 (the defaults)
    python .../variants.py drop15 4 "aug='drop'"           # delete 15% of tokens, every other batch
    python .../variants.py crop 4 "aug='crop'"             # random 50-100% span of each text
    python .../variants.py pair 4 "aug='pair'"             # a second random training text appended
    python .../variants.py alloc 4 "alloc=(64,128,153)"    # ranks: query/key, value/attn-out, FFN
    python .../variants.py sens 4 "ranks='ranks.json'"     # {layer name: rank} from a file
    python .../variants.py freeze5 4 "freeze=r'layer\\.5\\.'"  # keep matching parameters frozen
    python .../variants.py rel10 4 "rel=10.0"              # + in-batch similarity-matrix MSE
    python .../variants.py l2sp 4 "l2sp=1.0"               # pull U, V toward their start
    python .../variants.py d 4 "dropout=True"              # any other DistillConfig field

Prints held-out (512 texts) and training-text (512 texts) fidelity after the run.
"""
import torch, time, copy, sys, os, re, random
from transformers import AutoModel, AutoTokenizer
from lrkd_fast.data import *
from lrkd_fast.evaluate import *
from lrkd_fast.swap import *
from lrkd_fast.distillation import *
torch.manual_seed(0)
p = packaged_minilm_path()
tok = AutoTokenizer.from_pretrained(p); teacher = AutoModel.from_pretrained(p).eval()
S = pydoc_sentences(); train, held = split_texts(S, 512)
hb = list(TextBatches(held, tok, 64, 128, shuffle=False))
te = sentence_embeddings(teacher, hb)
trb = list(TextBatches(train[:512], tok, 64, 128, shuffle=False)); tre = sentence_embeddings(teacher, trb)
mode = sys.argv[1]; minutes = float(sys.argv[2]); kw = eval("dict(" + (sys.argv[3] if len(sys.argv) > 3 else "") + ")")
alloc = kw.pop("alloc", None); ranks_file = kw.pop("ranks", None)
START = "runs/minilm-whitened-start" + ("_%d_%d_%d" % alloc if alloc else "") + ("_" + os.path.basename(ranks_file) if ranks_file else "")
if not os.path.exists(START):
    base = copy.deepcopy(teacher)
    cal = list(TextBatches(train[:1024], tok, 32, 128, shuffle=False))
    rp = {}
    if alloc:
        qk, vo, ff = alloc
        rp = {r"query": qk, r"key": qk, r"value": vo, r"attention\.output\.dense": vo, r"intermediate\.dense": ff, r"\d\.output\.dense": ff}
    if ranks_file:
        import json
        rp = {re.escape(k): v for k, v in json.load(open(ranks_file)).items()}
    rep = swap_linear_layers(base, LowRankConfig(rank=0.5, rank_pattern=rp, target_modules=r"encoder\..*", init="whitened"), calibration=cal, progress=False)
    print(rep)
    save_lowrank(base, START)
freeze = kw.pop("freeze", None)
if freeze:
    _orig_sel = Distiller._select_trainable
    def _sel(self):
        ps = _orig_sel(self); names = {id(p): n for n, p in self.student.named_parameters()}
        keep = [p for p in ps if not re.search(freeze, names[id(p)])]
        for p in ps: p.requires_grad_(any(p is q for q in keep))
        print("trainable", sum(p.numel() for p in keep), "of", sum(p.numel() for p in ps))
        return keep
    Distiller._select_trainable = _sel
st = load_lowrank(START)
data = TextBatches(train, tok, kw.pop("bs", 16), 128, seed=0)
aug = kw.pop("aug", None); every = kw.pop("every", 2); rate = kw.pop("rate", 0.15)
l2sp = kw.pop("l2sp", 0.0)
if aug:
    orig_batch = data.batch
    def augmented(step):
        b = orig_batch(step)
        if step % every != every - 1: return b
        g = torch.Generator().manual_seed(1000 + step)
        ids, am = b["input_ids"], b["attention_mask"]
        rows = []
        for i in range(ids.shape[0]):
            row = ids[i][am[i].bool()].tolist()[1:-1]
            if aug == "drop":
                keep = torch.rand(len(row), generator=g) >= rate
                row = [t for t, k in zip(row, keep.tolist()) if k] or row[:1]
            elif aug == "crop":
                n = len(row); L = max(4, int(n * (0.5 + 0.5 * torch.rand(1, generator=g).item())))
                s0 = torch.randint(0, max(1, n - L + 1), (1,), generator=g).item(); row = row[s0:s0 + L]
            elif aug == "pair":
                j = torch.randint(len(train), (1,), generator=g).item()
                other = tok(train[j], add_special_tokens=False)["input_ids"]
                row = (row + other)[:126]
            rows.append([tok.cls_token_id] + row + [tok.sep_token_id])
        m = max(map(len, rows))
        out_ids = torch.full((len(rows), m), tok.pad_token_id); out_am = torch.zeros((len(rows), m), dtype=torch.long)
        for i, r in enumerate(rows): out_ids[i, :len(r)] = torch.tensor(r); out_am[i, :len(r)] = 1
        b = dict(b); b["input_ids"] = out_ids; b["attention_mask"] = out_am
        if "token_type_ids" in b: b["token_type_ids"] = torch.zeros_like(out_ids)
        return b
    data.batch = augmented
if l2sp:
    for n, prm in st.named_parameters():
        if n.endswith(".U") or n.endswith(".V"):
            p0 = prm.detach().clone()
            prm.register_hook(lambda g, prm=prm, p0=p0: g + l2sp * (prm.detach() - p0))
rel = kw.pop("rel", 0.0)
if rel:
    import torch.nn.functional as F
    from lrkd_fast.evaluate import mean_pool
    _orig_ol = Distiller._output_loss
    def _ol(self, hs, ht, batch):
        base = _orig_ol(self, hs, ht, batch)
        m = batch.get("attention_mask")
        es = F.normalize(mean_pool(hs.float(), m), dim=-1); et = F.normalize(mean_pool(ht.float(), m), dim=-1)
        return base + rel * ((es @ es.t() - et @ et.t()) ** 2).mean()
    Distiller._output_loss = _ol
kw = {"clone_modules": "inner", "lr": 7e-4, **kw}
t = time.time()
h = distill(st, teacher, data, steps=kw.pop("steps", 10000), max_minutes=minutes, progress=False, train_norms=True, train_bias=True, teacher_cache_gb=8, **{'teacher_cache': True, **kw})
st.eval()
fh = embedding_fidelity(sentence_embeddings(st, hb), te)
ftr = embedding_fidelity(sentence_embeddings(st, trb), tre)
print(mode, minutes, aug, every, rate, l2sp, kw, "steps", len(h["step"]), "time", round(time.time()-t),
      "held %.4f %.3f %.3f" % (fh.mean_cosine, fh.min_cosine, fh.nn_agreement), "train %.4f %.3f %.3f" % (ftr.mean_cosine, ftr.min_cosine, ftr.nn_agreement), flush=True)
