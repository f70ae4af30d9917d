"""Session 6 of 2026-11-30 (2 CPU cores): distill the recipe's plain whitened start (sensitivity ranks,
1024 calibration sentences, saved once under runs/start_plain*) for MINUTES with one change, then print
held-out (512 texts) and training-text (512 texts) fidelity. Raw lines: runs_session6.txt.

    python session6_probe.py base 3.5 ""                                  # recipe defaults (lr 3e-4, inner clones)
    python session6_probe.py base_seed1 3.5 "dseed=1, seed=1"             # another data order and seed
    python session6_probe.py bank1 3.5 "bank=1.0, tau=0.05"               # + KL of similarity rows against a bank of
                                                                          #   the teacher's training-text embeddings
    python session6_probe.py bf16 3.5 "attn='eager', autocast='bf16', pad=16"  # bf16 autocast on the CPU (AMX)
    python session6_probe.py extra 3.5 "extra=True"                       # + pydoc passages outside the sentence list
    python session6_probe.py wd05 3.5 "weight_decay=0.05"
    python session6_probe.py uniform 3.5 "alloc='uniform'"
    python session6_probe.py floor075 3.5 "floor=0.75"                    # sensitivity ranks, each >= 0.75 x uniform
    python session6_probe.py long25 25 ""                                 # the defaults for 25 minutes
    python session6_probe.py half 8.6 "ntrain=704"                        # half the training texts
"""
import torch, time, copy, sys, os
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer
from lrkd_fast.data import *
from lrkd_fast.evaluate import *
from lrkd_fast.swap import *
from lrkd_fast.distillation import *
from lrkd_fast.recipes import _default_targets
torch.manual_seed(0)
p = packaged_minilm_path()
tok = AutoTokenizer.from_pretrained(p); teacher = AutoModel.from_pretrained(p).eval()
S = pydoc_sentences(); train, held = split_texts(S, 512)
hb = list(TextBatches(held, tok, 64, 128, shuffle=False)); te = sentence_embeddings(teacher, hb)
trb = list(TextBatches(train[:512], tok, 64, 128, shuffle=False)); tre = sentence_embeddings(teacher, trb)
name = sys.argv[1]; minutes = float(sys.argv[2]); kw = eval("dict(" + (sys.argv[3] if len(sys.argv) > 3 else "") + ")")
alloc = kw.pop("alloc", "sensitivity"); floor = kw.pop("floor", 0.0)
ntrain = kw.pop("ntrain", None)  # keep only the first ntrain training texts (for calibration too)
if ntrain:
    train = train[:ntrain]
START = "runs/start_plain" + ("" if alloc == "sensitivity" and not floor else f"_{alloc}_{floor}") + (f"_n{ntrain}" if ntrain else "")
if floor:
    import lrkd_fast.allocation as A
    _orig_alloc = A.allocate_ranks
    def _alloc(spectra, costs, budget, weights, min_ranks, max_ranks):
        lo = {n: max(min_ranks[n], int(floor * 0.5 * max_ranks[n])) for n in spectra}
        return _orig_alloc(spectra, costs, budget, weights, lo, max_ranks)
    A.allocate_ranks = _alloc
if not os.path.exists(START):
    st = copy.deepcopy(teacher)
    cal = list(TextBatches(train[:1024], tok, 32, 128, shuffle=False))
    swap_linear_layers(st, LowRankConfig(rank=0.5, allocation=alloc, target_modules=_default_targets(teacher), init="whitened"), calibration=cal, progress=False)
    save_lowrank(st, START)
    print("ranks", [m.rank for m in st.modules() if hasattr(m, "rank") and hasattr(m, "U")], flush=True)
st = load_lowrank(START)
attn = kw.pop("attn", None)
if attn: st.config._attn_implementation = attn
bank_w = kw.pop("bank", 0.0); tau = kw.pop("tau", 0.05)
if bank_w:
    allb = list(TextBatches(train, tok, 64, 128, shuffle=False))
    B = sentence_embeddings(teacher, allb)  # (n_train, d) teacher bank, fixed
    _orig = Distiller._output_loss
    def _ol(self, hs, ht, batch):
        base = _orig(self, hs, ht, batch)
        m = batch.get("attention_mask")
        es = F.normalize(mean_pool(hs.float(), m), dim=-1); et = F.normalize(mean_pool(ht.float(), m), dim=-1)
        lt, ls = et @ B.t() / tau, es @ B.t() / tau
        self_mask = (et @ B.t()) > 0.9999  # the text itself is in the bank
        lt, ls = lt.masked_fill(self_mask, -1e4), ls.masked_fill(self_mask, -1e4)
        kl = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="batchmean")
        return base + bank_w * tau * kl
    Distiller._output_loss = _ol
extra = kw.pop("extra", False)
if extra:  # same-distribution text outside the sentence list: >400-char passages cut at word bounds, <40-char sentences
    import re
    from pydoc_data.topics import topics
    held_set = set(held); more = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s_ in re.split(r"(?<=[.!?])\s+(?=[A-Z`\"'(])", text):
            s_ = s_.strip()
            if len(s_) > 400:
                words, cur = s_.split(" "), ""
                for w in words:
                    if len(cur) + len(w) + 1 > 250:
                        more.append(cur); cur = w
                    else:
                        cur = (cur + " " + w).strip()
                if len(cur) >= 40: more.append(cur)
            elif 15 <= len(s_) < 40:
                more.append(s_)
    more = [m for m in dict.fromkeys(more) if m not in held_set and sum(c.isalpha() for c in m) > len(m) / 2]
    print("extra texts", len(more), flush=True)
    train = train + more
pad = kw.pop("pad", 0)
if pad:
    def enc(self, texts):
        e = self.tok(texts, padding=True, truncation=True, max_length=self.seq_len, return_tensors="pt", pad_to_multiple_of=pad)
        return {k: v for k, v in e.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    TextBatches.encode = enc
data = TextBatches(train, tok, kw.pop("bs", 16), 128, seed=kw.pop("dseed", 0))
kw = {"clone_modules": "inner", "lr": 3e-4, **kw}
t = time.time()
h = distill(st, teacher, data, steps=kw.pop("steps", 10000), max_minutes=minutes, progress=False, train_norms=True,
            train_bias=True, teacher_cache=True, teacher_cache_gb=8, **kw)
st.eval(); st.config._attn_implementation = "sdpa"
fh = embedding_fidelity(sentence_embeddings(st, hb), te)
ftr = embedding_fidelity(sentence_embeddings(st, trb), tre)
print(name, minutes, sys.argv[3:], "steps", len(h["step"]), "time", round(time.time()-t),
      "held %.4f %.3f %.3f" % (fh.mean_cosine, fh.min_cosine, fh.nn_agreement),
      "train %.4f %.3f %.3f" % (ftr.mean_cosine, ftr.min_cosine, ftr.nn_agreement), flush=True)
