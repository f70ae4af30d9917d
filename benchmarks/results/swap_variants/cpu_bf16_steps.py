"""Per-step time of distilling the recipe's start (runs/start_plain from session6_probe.py) on the CPU, fp32 vs bf16
autocast (AMX) with eager attention and batches padded to a multiple of 16 tokens. Session 6, 2026-11-30, 2 cores:
    python cpu_bf16_steps.py off sdpa 264     ->  median 0.500 / 0.324 / 0.305 s per step in epochs 1-3
    python cpu_bf16_steps.py bf16 eager 264   ->  median 0.352 / 0.324 / 0.348 s, mean 0.49 s, slowest 1.45 s
    python cpu_bf16_steps.py bf16 sdpa 30 profile  ->  top CPU ops over 5 more steps: SDPA's flash-attention
        backward 24 ms a call (26% of the time), aten::mm 1.17 s in all; "off sdpa 30 profile": 4.6 ms and 1.07 s
    python cpu_bf16_steps.py matmul           ->  one (800 x 384) @ (384 x r) @ (r x 1536) product, fp32 vs bf16:
        r = 58: 0.878 vs 0.340 ms; 153: 1.795 vs 0.490 ms; 183: 2.106 vs 0.555 ms
"""
import torch, time, copy, sys
if sys.argv[1] == "matmul":
    x = torch.randn(800, 384)
    for dt in (torch.float32, torch.bfloat16):
        for r in (58, 64, 153, 160, 183, 192):
            V, U, xx = torch.randn(r, 384, dtype=dt), torch.randn(1536, r, dtype=dt), x.to(dt)
            for _ in range(5):
                (xx @ V.t()) @ U.t()
            t = time.perf_counter()
            for _ in range(50):
                (xx @ V.t()) @ U.t()
            print(dt, r, "%.3f ms" % ((time.perf_counter() - t) / 50 * 1e3))
    sys.exit()
from transformers import AutoModel, AutoTokenizer
from lrkd_fast.data import *
from lrkd_fast.swap import *
from lrkd_fast.distillation import *
p = packaged_minilm_path()
tok = AutoTokenizer.from_pretrained(p); teacher = AutoModel.from_pretrained(p).eval()
S = pydoc_sentences(); train, held = split_texts(S, 512)
def enc(self, texts):
    e = self.tok(texts, padding=True, truncation=True, max_length=self.seq_len, return_tensors="pt", pad_to_multiple_of=16)
    return {k: v for k, v in e.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
TextBatches.encode = enc
data = TextBatches(train, tok, 16, 128, seed=0)
ac, attn, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = next((a for a in sys.argv[4:] if a != "profile"), "runs/start_plain")
st = load_lowrank(start); st.config._attn_implementation = attn
d = Distiller(st, teacher, DistillConfig(steps=n, lr=3e-4, train_norms=True, train_bias=True, teacher_cache=True, clone_modules="inner", progress=False, autocast=ac))
ts = [time.perf_counter()]
d.train(data, on_step=lambda s, p: ts.append(time.perf_counter()))
dt = torch.tensor(ts).diff()
for a in range(0, n, 88):
    seg = dt[a:a+88]
    print(ac, attn, f"steps {a}-{a+len(seg)}: mean {seg.mean():.3f}s median {seg.median():.3f}s max {seg.max():.3f}s")
if "profile" in sys.argv[4:]:
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(5):
            loss, _ = d.compute_loss(data.batch(i)); loss.backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
