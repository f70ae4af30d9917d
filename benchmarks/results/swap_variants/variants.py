"""The 4-minute variant runs behind the README's table (2 CPU cores, 2026-11-30): one script,
the recipe's data split and start, one change per run. Usage:

    python benchmarks/results/swap_variants/variants.py NAME MINUTES "DistillConfig overrides"
    python benchmarks/results/swap_variants/variants.py inner_lr07 4 "clone_modules='inner', lr=7e-4"
    python benchmarks/results/swap_variants/variants.py noise 4 "rate=0.15"   # random-word substitution

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
S = pydoc_sentences(); train, held = split_texts(S, 512); H = set(held)
hb = list(TextBatches(held, tok, 64, 128, shuffle=False))
te = sentence_embeddings(teacher, hb)
trb = list(TextBatches(train[:512], tok, 64, 128, shuffle=False)); tre = sentence_embeddings(teacher, trb)
START = os.environ.get("START", "runs/minilm-whitened-start")
if not os.path.exists(START):  # the recipe's start: whitened SVD at 50% of the encoder's linear parameters
    base = copy.deepcopy(teacher)
    cal = list(TextBatches(train[:1024], tok, 32, 128, shuffle=False))
    swap_linear_layers(base, LowRankConfig(rank=0.5, target_modules=r"encoder\..*", init="whitened"), calibration=cal, progress=False)
    save_lowrank(base, START)
mode = sys.argv[1]; minutes = float(sys.argv[2]); kw = eval("dict(" + (sys.argv[3] if len(sys.argv) > 3 else "") + ")")
vocab = tok.get_vocab()
words = torch.tensor(sorted(i for t, i in vocab.items() if t.isalpha() and t.isascii() and len(t) >= 2 and not t.startswith("[")))
st = load_lowrank(START)
data = TextBatches(train, tok, kw.pop("bs", 16), 128, seed=0)
rate = kw.pop("rate", 0.0); every = kw.pop("every", 2)
if rate:
    orig_batch = data.batch
    def noisy(step):
        b = orig_batch(step)
        if step % every != every - 1: return b
        g = torch.Generator().manual_seed(1000 + step)
        ids = b["input_ids"].clone()
        special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (b["attention_mask"] == 0)
        hit = (torch.rand(ids.shape, generator=g) < rate) & ~special
        ids[hit] = words[torch.randint(len(words), (int(hit.sum()),), generator=g)]
        b["input_ids"] = ids
        return b
    data.batch = noisy
t = time.time()
h = distill(st, teacher, data, steps=kw.pop("steps", 10000), max_minutes=minutes, progress=False, train_norms=True, train_bias=True, teacher_cache_gb=8, **{'teacher_cache': True, **kw})
st.eval()
fh = embedding_fidelity(sentence_embeddings(st, hb), te)
print(mode, minutes, rate, every, kw, "steps", len(h["step"]), "time", round(time.time()-t),
      "held %.4f %.3f %.3f" % (fh.mean_cosine, fh.min_cosine, fh.nn_agreement), "train", embedding_fidelity(sentence_embeddings(st, trb), tre), flush=True)
