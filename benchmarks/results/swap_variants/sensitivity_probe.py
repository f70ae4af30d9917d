"""Start-point probes behind the sensitivity allocation (2 CPU cores, 2026-11-30, session 4): the damage each
encoder layer of all-MiniLM-L6-v2 does alone at its uniform 50% rank (1 - pooled cosine on 256 training
texts), and the whitened start of a greedy allocation on it. Needs /tmp/s4/grams.pt from
lrkd_fast.swap.collect_input_grams over the recipe's 1024 calibration texts. Writes the ranks that the
`sens` run of variants.py used to ranks_sens.json. The library's allocation (lrkd_fast/allocation.py)
measures the relative error of the last hidden state instead and caps ranks at break-even."""
import copy, sys, re, time, torch
from lrkd_fast.recipes import prepare, _default_targets
from lrkd_fast.data import TextBatches
from lrkd_fast.evaluate import sentence_embeddings, embedding_fidelity
from lrkd_fast.swap import whitened_factors, rank_for_fraction
pre = prepare(None, None, 512, 16, "cpu", 0, "/tmp/s4/x")
T, tok = pre.teacher, pre.tok
held = list(TextBatches(pre.held, tok, 64, 128, shuffle=False))
temb = sentence_embeddings(T, held)
sub = list(TextBatches(pre.train[:256], tok, 64, 128, shuffle=False))
semb = sentence_embeddings(T, sub)
pat = re.compile(_default_targets(T))
layers = {n: m for n, m in T.named_modules() if isinstance(m, torch.nn.Linear) and pat.fullmatch(n)}
g = torch.load("/tmp/s4/grams.pt")
r0 = {n: rank_for_fraction(0.5, m.in_features, m.out_features) for n, m in layers.items()}
cost = {n: m.in_features + m.out_features for n, m in layers.items()}
budget = sum(r0[n] * cost[n] for n in layers)
# whitened SVD per layer
svd = {}
for n, m in layers.items():
    w = m.weight.detach().double(); gg = g[n]; d = gg.shape[0]
    L = torch.linalg.cholesky(gg + 0.01 * gg.diagonal().mean() * torch.eye(d, dtype=gg.dtype))
    B = torch.linalg.solve_triangular(L, gg @ w.t(), upper=False)
    A, S, Bh = torch.linalg.svd(B, full_matrices=False)
    svd[n] = (L, A, S, Bh)
def dense_at(n, r):
    L, A, S, Bh = svd[n]
    U = torch.linalg.solve_triangular(L.t(), A[:, :r] * S[:r], upper=True)
    return (U @ Bh[:r]).t().float()
t = time.time()
dmg = {}
for n, m in layers.items():
    w0 = m.weight.data.clone()
    m.weight.data.copy_(dense_at(n, r0[n]))
    e = sentence_embeddings(T, sub)
    dmg[n] = (1 - (e * semb).sum(-1)).mean().item()
    m.weight.data.copy_(w0)
print("sensitivity pass", time.time() - t)
for n in layers: print(n.replace("encoder.layer.", ""), f"{dmg[n]:.5f}")
def alloc(weight):
    items = []
    for n in layers:
        e = svd[n][2] ** 2 * weight[n]
        items += [(v / cost[n], n) for v in e.tolist()]
    items.sort(reverse=True)
    ranks = {n: 0 for n in layers}; used = 0
    for v, n in items:
        if used + cost[n] > budget: continue
        ranks[n] += 1; used += cost[n]
    return ranks
def evaluate(rk):
    S = copy.deepcopy(T)
    for n in layers: S.get_submodule(n).weight.data.copy_(dense_at(n, rk[n]))
    f = embedding_fidelity(sentence_embeddings(S, held), temb)
    return f"{f.mean_cosine:.4f} {f.min_cosine:.3f} {f.nn_agreement:.3f}"
tail = {n: (svd[n][2][r0[n]:] ** 2).sum().item() for n in layers}
rk = alloc({n: dmg[n] / tail[n] for n in layers})
print("sens alloc", evaluate(rk)); print({n.replace("encoder.layer.", ""): v for n, v in rk.items()})
for p in []:
    rk = alloc({n: (dmg[n] / tail[n]) ** p for n in layers})
    print("sens alloc pow", p, evaluate(rk)); print({n.replace("encoder.layer.", ""): v for n, v in rk.items()})

import json
rk = alloc({n: dmg[n] / tail[n] for n in layers})
json.dump(rk, open("ranks_sens.json", "w"))
