"""Low-Rank Clone against an independent implementation of the authors' co-training loss.

The reference below is written from the method's description alone (docs of the paper and of the
authors' code), with torch ops on the teacher's weights and the clone's projections and norms; it
calls nothing of lrkd_fast. The authors' loss on a packed batch (no padding):

    CE (next token, shifted, mean) + KL(p_T || p_S) at temperature T (log-target, summed over every
    position and the vocabulary, divided by the batch size) + alpha * sum over layers of seven MSE
    terms: q, k, v, gate, up (same width), the FFN output against o_T,ffn P_down, and the attention
    output in the teacher width: the student's attention result through the teacher's o_proj
    against the teacher's attention output. The LM head's projection is the embedding projection.

The paper's form of the attention term, E(o_S, o_T P_o), is the reference's ``attn="student"``.
Everything runs in float64; RMSNorm is the authors' (and Hugging Face's): statistics in float32.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from lrkd_fast import set_backend
from lrkd_fast.clone import LowRankClone

V, D_T, D_S, H, KV, FFN, LAYERS = 61, 48, 24, 4, 2, 80, 2
TOL = 1e-10


def llama_teacher(tie_word_embeddings=False):
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=D_T, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=H, num_key_value_heads=KV, tie_word_embeddings=tie_word_embeddings,
                         rope_theta=10000.0)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # non-trivial norms and larger weights, so that every term is exercised
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15)
    return model


def ids_batch(B=2, L=9):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (B, L), generator=g)


def perturb(clone):
    """Projections and norms away from their init (the paper's N(0, 0.02) makes some terms tiny)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in clone.proj.values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
        for p in clone.norms.values():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ----------------------------------------------------------------------------- the reference

def rms(x, w, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rope(x, theta):
    """x (B, heads, L, hd): rotary embedding with the tables in float32 (as the authors' code has them)."""
    hd, L = x.shape[-1], x.shape[-2]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    ang = torch.arange(L).float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(q, k, v, heads, kv_heads, theta):
    """Causal multi-head attention of pre-RoPE q (B, L, heads*hd), k, v (B, L, kv_heads*hd): the per-head
    results, heads concatenated (B, L, heads*hd)."""
    B, L, _ = q.shape
    hd = q.shape[-1] // heads
    q = rope(q.view(B, L, heads, hd).transpose(1, 2), theta)
    k = rope(k.view(B, L, kv_heads, hd).transpose(1, 2), theta).repeat_interleave(heads // kv_heads, 1)
    v = v.view(B, L, kv_heads, hd).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, heads * hd)


def reference_loss(teacher, P: dict, N: dict, ids, alpha, temperature, attn="teacher", head_key="emb",
                   attn_weight=1.0):
    """(loss, per-layer terms) of the authors' co-training loss (attn="teacher") or the paper's form
    (attn="student"). P: projections (d_T, d_S) by name; N: student norms by teacher parameter name."""
    cfg = teacher.config
    W = dict(teacher.named_parameters(remove_duplicate=False))
    eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    E = W["model.embed_tokens.weight"]
    xT = E[ids]
    xS = E[ids] @ P["emb"]
    clone, terms = 0.0, []
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        w = {k: W[pre + m + ".weight"] for k, m in
             (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
              ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))}
        p = {k: P[f"layer{i}_{k}"] for k in w}
        with torch.no_grad():  # teacher block
            h = rms(xT, W[pre + "input_layernorm.weight"], eps)
            qT, kT, vT = h @ w["q"].t(), h @ w["k"].t(), h @ w["v"].t()
            oT = attention(qT, kT, vT, heads, kv, theta) @ w["o"].t()
            xT = xT + oT
            h = rms(xT, W[pre + "post_attention_layernorm.weight"], eps)
            gT, uT = h @ w["gate"].t(), h @ w["up"].t()
            fT = (F.silu(gT) * uT) @ w["down"].t()
            xT = xT + fT
        # student block: input-side weights W P, output-side P^T W
        h = rms(xS, N[pre + "input_layernorm.weight"], eps)
        qS, kS, vS = h @ (w["q"] @ p["q"]).t(), h @ (w["k"] @ p["k"]).t(), h @ (w["v"] @ p["v"]).t()
        oS_wide = attention(qS, kS, vS, heads, kv, theta) @ w["o"].t()  # through the TEACHER's o_proj
        oS = oS_wide @ p["o"]
        xS = xS + oS
        h = rms(xS, N[pre + "post_attention_layernorm.weight"], eps)
        gS, uS = h @ (w["gate"] @ p["gate"]).t(), h @ (w["up"] @ p["up"]).t()
        fS = (F.silu(gS) * uS) @ (p["down"].t() @ w["down"]).t()
        xS = xS + fS
        t_attn = F.mse_loss(oS_wide, oT) if attn == "teacher" else F.mse_loss(oS, oT @ p["o"])
        layer = dict(q=F.mse_loss(qS, qT), k=F.mse_loss(kS, kT), v=F.mse_loss(vS, vT), gate=F.mse_loss(gS, gT),
                     up=F.mse_loss(uS, uT), o=t_attn, down=F.mse_loss(fS, fT @ p["down"]))
        terms.append(layer)
        clone = clone + sum(v * (attn_weight if k == "o" else 1.0) for k, v in layer.items())
    W_head = W["lm_head.weight"]
    with torch.no_grad():
        t_logits = rms(xT, W["model.norm.weight"], eps) @ W_head.t()
    s_logits = rms(xS, N["model.norm.weight"], eps) @ (W_head @ P[head_key]).t()
    kl = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                  log_target=True, reduction="batchmean")
    ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    return ce + kl + alpha * clone, dict(kl=kl, ce=ce, layers=terms)


def clone_tensors(clone):
    P = dict(clone.proj.items())
    N = {name: clone.norms[rule[2]] for name, rule in clone.plan.items() if rule[0] == "norm"}
    return P, N


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_tight(got, ref, what):
    assert got is not None and ref is not None, what
    err = (got - ref).abs().max().item()
    assert err <= TOL * max(1.0, ref.abs().max().item()), f"{what}: max abs error {err:.3g}"


@pytest.fixture(autouse=True)
def _eager():
    with set_backend("eager"):  # float64 runs eagerly in any case
        yield


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("tie", [True, False])
def test_teacher_form_matches_the_authors_loss_and_every_gradient(tie):
    t = llama_teacher()
    c = LowRankClone.from_teacher(t, D_S, attn_clone="teacher", tie_head_projection=tie, alpha=0.3, temperature=7.0)
    perturb(c)
    ids = ids_batch()
    params = list(c.parameters())
    out = c(ids)
    P, N = clone_tensors(c)
    ref, _ = reference_loss(t, P, N, ids, alpha=0.3, temperature=7.0, attn="teacher",
                            head_key="emb" if tie else "head")
    assert_tight(out.loss, ref, "loss")
    names = [n for n, _ in c.named_parameters()]
    for n, g, r in zip(names, grads(out.loss, params), grads(ref, params)):
        assert_tight(g, r, n)
    assert ("head" in c.proj) == (not tie)


def test_paper_form_coincides_with_the_authors_loss_except_the_attention_term():
    t = llama_teacher()
    ids = ids_batch()
    c = LowRankClone.from_teacher(t, D_S, attn_clone="student", separate_parts=True, alpha=0.3)
    perturb(c)
    params = list(c.parameters())
    P, N = clone_tensors(c)
    out = c(ids)
    authors, parts = reference_loss(t, P, N, ids, alpha=0.3, temperature=40.0, attn="teacher")
    # every term but the attention output's is the same number (the per-site parts are logged in fp32)
    assert_tight(torch.tensor(out.parts["kd"], dtype=torch.float64), parts["kl"].detach(), "kl")
    assert_tight(torch.tensor(out.parts["lm"], dtype=torch.float64), parts["ce"].detach(), "ce")
    for site in ("q", "k", "v", "gate", "up", "down"):
        ref = sum(layer[site] for layer in parts["layers"]).item() / LAYERS
        assert out.parts[f"clone_{site}"] == pytest.approx(ref, rel=1e-6), site
    wide = sum(layer["o"] for layer in parts["layers"]).detach() / LAYERS
    assert abs(out.parts["clone_o"] - wide.item()) > 0.1 * wide.item()  # the two forms really differ
    # the paper's form is the reference's attn="student", in the loss and every gradient
    paper, _ = reference_loss(t, P, N, ids, alpha=0.3, temperature=40.0, attn="student")
    assert_tight(out.loss, paper, "loss")
    for n, g, r in zip([n for n, _ in c.named_parameters()], grads(out.loss, params), grads(paper, params)):
        assert_tight(g, r, n)
    # without the attention-output term the default form is the authors' loss, gradients included
    c0 = LowRankClone.from_teacher(t, D_S, attn_clone="student", alpha=0.3, clone_weights={"o": 0.0})
    c0.load_state_dict(c.state_dict())
    P0, N0 = clone_tensors(c0)
    loss0 = c0(ids).loss
    ref0, _ = reference_loss(t, P0, N0, ids, alpha=0.3, temperature=40.0, attn="teacher", attn_weight=0.0)
    assert_tight(loss0, ref0, "loss without the attention term")
    p0 = list(c0.parameters())
    for n, g, r in zip([n for n, _ in c0.named_parameters()], grads(loss0, p0), grads(ref0, p0)):
        assert_tight(g if g is not None else torch.zeros(()), r if r is not None else torch.zeros(()), n)


def test_teacher_form_sends_no_gradient_to_p_o_from_its_term():
    t = llama_teacher()
    ids = ids_batch()
    only_o = {s: 0.0 for s in ("q", "k", "v", "gate", "up", "down")}
    last = f"layer{LAYERS - 1}_o"
    for form, reaches in (("teacher", False), ("student", True)):
        c = LowRankClone.from_teacher(t, D_S, attn_clone=form, clone_weights=only_o, kd_weight=0.0, lm_weight=0.0)
        perturb(c)
        c(ids).loss.backward()
        g = c.proj[last].grad
        # the last layer's P_o feeds nothing after its own attention term: only that term could reach it
        assert (g is not None and g.abs().max().item() > 0) == reaches, form


def test_benchmark_official_provider_is_the_authors_loss():
    """benchmarks/lrc_step.py's official-style provider, fed the clone's weights, computes the same loss as
    LowRankClone(attn_clone="teacher"): its step-time comparison is like for like."""
    from benchmarks.lrc_step import official_loss_factory

    t = llama_teacher()
    c = LowRankClone.from_teacher(t, D_S, attn_clone="teacher")
    perturb(c)
    ids = ids_batch()
    W = dict(t.named_parameters())
    P, N = clone_tensors(c)
    layers, projs = [], []
    for i in range(LAYERS):
        pre = f"model.layers.{i}."
        m = lambda n: W[pre + n + ".weight"]  # noqa: E731
        layers.append(dict(q=m("self_attn.q_proj"), k=m("self_attn.k_proj"), v=m("self_attn.v_proj"),
                           o=m("self_attn.o_proj"), gate=m("mlp.gate_proj"), up=m("mlp.up_proj"),
                           down=m("mlp.down_proj"), n1=m("input_layernorm"), n2=m("post_attention_layernorm")))
        p = lambda k: P[f"layer{i}_{k}"]  # noqa: E731
        projs.append(dict(zq=p("q"), zk=p("k"), zv=p("v"), zo=p("o").t(), zg=p("gate"), zu=p("up"), zd=p("down").t(),
                          n1=N[pre + "input_layernorm.weight"], n2=N[pre + "post_attention_layernorm.weight"]))
    weights = dict(teacher=layers, proj=projs, emb=W["model.embed_tokens.weight"], head=W["lm_head.weight"],
                   norm=W["model.norm.weight"], zemb=P["emb"].t(), nf=N["model.norm.weight"])
    s = dict(B=ids.shape[0], T=ids.shape[1], dT=D_T, dS=D_S, dmid=FFN, H=H, KV=KV, hd=D_T // H, V=V)
    loss_fn, _ = official_loss_factory(s, LAYERS, "cpu", torch.float64, weights=weights,
                                       rope_theta=t.config.rope_parameters["rope_theta"])
    official = loss_fn(ids)
    ours = c(ids).loss
    assert_tight(ours, official, "loss")
    params = list(c.parameters())
    for n, g, r in zip([n for n, _ in c.named_parameters()], grads(ours, params), grads(official, params)):
        assert_tight(g, r, n)
