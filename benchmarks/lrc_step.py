"""End-to-end LRC training step: official-code-style eager, the same under torch.compile, and lrkd_fast.

    python -m benchmarks.lrc_step [--layers 2 4] [--small] [--csv benchmarks/results/lrc_step.csv]

Providers (one Llama-style teacher, widths of Llama-3.2-3B -> LRC-1.5B unless --small):
  official_eager     the reference code's step structure (factorized q/k/v, zoomed gate/up/down,
                     seven MSE terms per layer with the attention output compared in the teacher
                     width, KL(T=40, batchmean) + shifted CE on full fp32 logits), no attention mask
  official_compiled  the same with its layer and head functions under torch.compile
  lrkd_fast          LowRankClone(attn_clone="teacher") on a random-weight LlamaForCausalLM teacher (fused
                     clone / KD losses where Triton runs, cheaper association per site): the same loss
                     as official_eager for the same weights (tests/test_lrc_parity.py checks it)
Each provider runs at every --layers count; a least-squares line ms = fixed + per_layer * L gives
ms/layer and the fixed cost, extrapolated to 28 layers (tokens/s at 28 layers). Peak memory is CUDA
only. Writes one CSV row per provider and layer count plus one "fit" row per provider.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch
import torch.nn.functional as F


def shapes(small: bool):
    if small:
        return dict(B=2, T=64, dT=128, dS=64, dmid=256, H=4, KV=2, hd=32, V=1000)
    return dict(B=4, T=2048, dT=3072, dS=1536, dmid=8192, H=24, KV=8, hd=128, V=128256)


# ----------------------------------------------------------------------------- official-style provider

def official_loss_factory(s, L, dev, dt, compile_fns=False, weights=None, rope_theta=500000.0, eps=1e-6):
    """(loss(ids), trainable params) of the reference code's co-training step. ``weights``: None (random)
    or a dict with ``teacher`` (per layer: q, k, v, o, gate, up, down, n1, n2), ``proj`` (per layer: zq,
    zk, zv, zo, zg, zu, zd in the reference code's nn.Linear layouts, n1, n2), ``emb``, ``head``,
    ``norm`` (teacher final norm), ``zemb``, ``nf`` (student final norm)."""
    B, T, dT, dS, dmid, H, KV, hd, V = (s[k] for k in ("B", "T", "dT", "dS", "dmid", "H", "KV", "hd", "V"))
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(*shape, grad=False, scale=None):
        t = torch.randn(*shape, generator=g) * (scale if scale else shape[-1] ** -0.5)
        return t.to(dev, dt).requires_grad_(grad)

    def rms(x, wgt):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * wgt

    pos = torch.arange(T, device=dev).float()
    inv = 1.0 / (rope_theta ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    ang = pos[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), -1)
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    if weights is None:
        teacher = [dict(q=w(H * hd, dT), k=w(KV * hd, dT), v=w(KV * hd, dT), o=w(dT, H * hd), gate=w(dmid, dT),
                        up=w(dmid, dT), down=w(dT, dmid), n1=torch.ones(dT, device=dev, dtype=dt),
                        n2=torch.ones(dT, device=dev, dtype=dt)) for _ in range(L)]
        proj = [dict(zq=w(dT, dS, grad=True), zk=w(dT, dS, grad=True), zv=w(dT, dS, grad=True),
                     zo=w(dS, dT, grad=True), zg=w(dT, dS, grad=True), zu=w(dT, dS, grad=True), zd=w(dS, dT, grad=True),
                     n1=torch.ones(dS, device=dev, dtype=dt, requires_grad=True),
                     n2=torch.ones(dS, device=dev, dtype=dt, requires_grad=True)) for _ in range(L)]
        emb_T, head_T, norm_T = w(V, dT, scale=0.02), w(V, dT), torch.ones(dT, device=dev, dtype=dt)
        zemb = w(dS, dT, grad=True)
        nf = torch.ones(dS, device=dev, dtype=dt, requires_grad=True)
    else:
        teacher, proj = weights["teacher"], weights["proj"]
        emb_T, head_T, norm_T, zemb, nf = (weights[k] for k in ("emb", "head", "norm", "zemb", "nf"))
    params = [p for d in proj for p in d.values()] + [zemb, nf]

    def attn(q, k, v):
        q = q.view(B, T, H, hd).transpose(1, 2)
        k = k.view(B, T, KV, hd).transpose(1, 2)
        v = v.view(B, T, KV, hd).transpose(1, 2)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        o = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return o.transpose(1, 2).reshape(B, T, H * hd)

    def layer(xT, xS, tw, pw):
        with torch.no_grad():
            hT = rms(xT, tw["n1"])
            qT, kT, vT = F.linear(hT, tw["q"]), F.linear(hT, tw["k"]), F.linear(hT, tw["v"])
            aT = F.linear(attn(qT, kT, vT), tw["o"])
            xT = xT + aT
            h2T = rms(xT, tw["n2"])
            gT, uT = F.linear(h2T, tw["gate"]), F.linear(h2T, tw["up"])
            fT = F.linear(F.silu(gT) * uT, tw["down"])
            xT = xT + fT
        hS = rms(xS, pw["n1"])
        qS = F.linear(F.linear(hS, pw["zq"]), tw["q"])
        kS = F.linear(F.linear(hS, pw["zk"]), tw["k"])
        vS = F.linear(F.linear(hS, pw["zv"]), tw["v"])
        oS_wide = F.linear(attn(qS, kS, vS), tw["o"])  # the student's attention result through the teacher's o_proj
        oS = F.linear(oS_wide, pw["zo"])
        # the attention output is compared in the teacher width, before the down projection zo
        clone = F.mse_loss(qS, qT) + F.mse_loss(kS, kT) + F.mse_loss(vS, vT) + F.mse_loss(oS_wide, aT)
        xS = xS + oS
        h2S = rms(xS, pw["n2"])
        gS, uS = F.linear(h2S, tw["gate"] @ pw["zg"]), F.linear(h2S, tw["up"] @ pw["zu"])
        fS = F.linear(F.silu(gS) * uS, pw["zd"] @ tw["down"])
        clone = clone + F.mse_loss(gS, gT) + F.mse_loss(uS, uT) + F.mse_loss(fS, F.linear(fT, pw["zd"]))
        return xT, xS + fS, clone

    logit_dt = torch.promote_types(dt, torch.float32)  # full fp32 logits (fp64 stays fp64)

    def head(xT, xS, ids):
        with torch.no_grad():
            t_logits = F.linear(rms(xT, norm_T), head_T).to(logit_dt)
        s_logits = F.linear(rms(xS, nf), head_T @ zemb.t()).to(logit_dt)
        kl = F.kl_div(F.log_softmax(s_logits / 40.0, -1), F.log_softmax(t_logits / 40.0, -1), log_target=True,
                      reduction="batchmean")  # sum over tokens and vocabulary / batch size
        ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))  # next-token (shifted)
        return kl + ce

    layer_fn = torch.compile(layer) if compile_fns else layer
    head_fn = torch.compile(head) if compile_fns else head

    def loss_fn(ids):
        xT = emb_T[ids]
        xS = F.linear(emb_T[ids], zemb)
        clone = 0.0
        for tw, pw in zip(teacher, proj):
            xT, xS, c = layer_fn(xT, xS, tw, pw)
            clone = clone + c
        return head_fn(xT, xS, ids) + 0.2 * clone
    return loss_fn, params


def official_step_factory(s, L, dev, dt, compile_fns):
    loss_fn, params = official_loss_factory(s, L, dev, dt, compile_fns)

    def step():
        ids = torch.randint(0, s["V"], (s["B"], s["T"]), device=dev)
        loss_fn(ids).backward()
        for p in params:
            p.grad = None
    return step


# ----------------------------------------------------------------------------- lrkd_fast provider

def lrkd_step_factory(s, L, dev, dt):
    import transformers as tf

    from lrkd_fast.clone import LowRankClone

    cfg = tf.LlamaConfig(vocab_size=s["V"], hidden_size=s["dT"], intermediate_size=s["dmid"], num_hidden_layers=L,
                         num_attention_heads=s["H"], num_key_value_heads=s["KV"], head_dim=s["hd"],
                         rope_theta=500000.0, tie_word_embeddings=True)
    with torch.device(dev):
        teacher = tf.LlamaForCausalLM(cfg).to(dt).eval()
    clone = LowRankClone.from_teacher(teacher, s["dS"], separate_parts=False, attn_clone="teacher")
    params = list(clone.parameters())

    def step():
        ids = torch.randint(0, s["V"], (s["B"], s["T"]), device=dev)
        clone(ids).loss.backward()
        for p in params:
            p.grad = None
    return step


def time_step(step, dev, warmup=2, iters=5):
    for _ in range(warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1000 / iters
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else None
    return ms, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--small", action="store_true", help="small shapes (default on CPU)")
    ap.add_argument("--providers", nargs="+", default=["official_eager", "official_compiled", "lrkd_fast"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--csv", default="benchmarks/results/lrc_step.csv")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    s = shapes(a.small or dev == "cpu")
    tokens = s["B"] * s["T"]
    rows = []
    for prov in a.providers:
        pts = []
        for L in a.layers:
            step = None
            try:
                if prov == "lrkd_fast":
                    step = lrkd_step_factory(s, L, dev, dt)
                else:
                    step = official_step_factory(s, L, dev, dt, compile_fns=prov == "official_compiled")
                ms, peak = time_step(step, dev, iters=a.iters)
                err = ""
            except Exception as ex:  # keep going: one failing provider must not hide the others
                ms, peak, err = float("nan"), None, repr(ex)[:200]
            step = None
            if dev == "cuda":
                torch.cuda.empty_cache()
            pts.append((L, ms))
            rows.append(dict(provider=prov, layers=L, tokens=tokens, ms=round(ms, 2),
                             tokens_per_s=round(tokens / ms * 1000) if ms == ms else "", peak_gib=peak or "",
                             ms_per_layer="", fixed_ms="", tokens_per_s_28="", error=err))
            print(rows[-1], flush=True)
        good = [(L, ms) for L, ms in pts if ms == ms]
        if len(good) >= 2:
            n = len(good)
            mx, my = sum(L for L, _ in good) / n, sum(m for _, m in good) / n
            slope = sum((L - mx) * (m - my) for L, m in good) / max(sum((L - mx) ** 2 for L, _ in good), 1e-9)
            fixed = my - slope * mx
            ms28 = fixed + 28 * slope
            rows.append(dict(provider=prov, layers="fit", tokens=tokens, ms=round(ms28, 2), tokens_per_s="",
                             peak_gib="", ms_per_layer=round(slope, 3), fixed_ms=round(fixed, 2),
                             tokens_per_s_28=round(tokens / ms28 * 1000) if ms28 > 0 else "", error=""))
            print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(a.csv) or ".", exist_ok=True)
    with open(a.csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print("wrote", a.csv)


if __name__ == "__main__":
    main()
