"""Low-Rank Clone: families, identity, weight formulas, fused vs eager, padding, export, DDP, MiniLM."""
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from lrkd_fast import set_backend
from lrkd_fast.clone import LowRankClone, family_for
from lrkd_fast.clone.model import lrc_bert_class

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "bert"]
V = 97


def tiny(kind, hidden=32, layers=2):
    common = dict(vocab_size=V, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4)
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(**common, max_position_embeddings=64)).eval()
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "mistral": tf.MistralConfig}[kind]
    extra = {"head_dim": 8} if kind == "qwen3" else {}
    model = tf.AutoModelForCausalLM.from_config(cls(**common, num_key_value_heads=2, **extra))
    with torch.no_grad():  # non-trivial norms and biases so that the formulas are really exercised
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def batch(B=2, L=7, pad=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, L), generator=g)
    am = torch.ones_like(ids)
    if pad:
        am[1, L - 2:] = 0
    return ids, am


@pytest.fixture(autouse=True)
def _eager():
    with set_backend("eager"):
        yield


@pytest.mark.parametrize("kind", FAMILIES)
def test_identity_clone_reproduces_teacher(kind):
    t = tiny(kind)
    # separate_parts: log the KL and the CE apart (two head passes) so the KL can be checked alone
    c = LowRankClone.from_teacher(t, 32, init="identity", separate_parts=True)
    ids, am = batch()
    out = c(ids, attention_mask=am)
    assert out.parts["clone"] == 0.0
    assert all(v == 0.0 for k, v in out.parts.items() if k.startswith("clone_"))
    with torch.no_grad():
        s = c.student_forward(input_ids=ids, attention_mask=am, output_hidden_states=True)
        r = t(input_ids=ids, attention_mask=am, output_hidden_states=True)
    for hs, ht in zip(s.hidden_states, r.hidden_states):
        torch.testing.assert_close(hs, ht, rtol=1e-5, atol=1e-5)
    if kind != "bert":
        torch.testing.assert_close(s.logits, r.logits, rtol=1e-5, atol=1e-5)
        assert abs(out.parts["kd"]) < 1e-6


@pytest.mark.parametrize("kind", FAMILIES)
def test_student_weights_follow_lrc_formulas(kind):
    t = tiny(kind)
    fam = family_for(t)
    c = LowRankClone.from_teacher(t, 16)
    sd = c.export_student().state_dict()
    T = dict(t.named_parameters())
    pre = c.base_prefix + fam.layers
    P = c.proj
    for i in range(2):
        for site, mod in fam.in_sites.items():
            n = f"{pre}.{i}.{mod}.weight"
            torch.testing.assert_close(sd[n], T[n] @ P[f"layer{i}_{site}"])
            assert sd[n].shape == (T[n].shape[0], 16)
            if f"{pre}.{i}.{mod}.bias" in T:  # input-side biases (width d_m) unchanged
                torch.testing.assert_close(sd[f"{pre}.{i}.{mod}.bias"], T[f"{pre}.{i}.{mod}.bias"])
        for site, mod in fam.out_sites.items():
            n = f"{pre}.{i}.{mod}.weight"
            torch.testing.assert_close(sd[n], P[f"layer{i}_{site}"].t() @ T[n])
            if f"{pre}.{i}.{mod}.bias" in T:  # output-side biases projected
                torch.testing.assert_close(sd[f"{pre}.{i}.{mod}.bias"], T[f"{pre}.{i}.{mod}.bias"] @ P[f"layer{i}_{site}"])
        for mod in fam.layer_norms:
            torch.testing.assert_close(sd[f"{pre}.{i}.{mod}.weight"], torch.ones(16))
            if fam.norm_type == "layernorm":
                torch.testing.assert_close(sd[f"{pre}.{i}.{mod}.bias"], torch.zeros(16))
        for mod in fam.passthrough:
            torch.testing.assert_close(sd[f"{pre}.{i}.{mod}.weight"], T[f"{pre}.{i}.{mod}.weight"])
    for mod in fam.embeddings:
        n = f"{c.base_prefix}{mod}.weight"
        torch.testing.assert_close(sd[n], T[n] @ P["emb"])
    if fam.head:
        torch.testing.assert_close(sd[f"{fam.head}.weight"], T[f"{fam.head}.weight"] @ P["emb"])
    # nothing but projections and norms trains; the teacher stays frozen
    assert all(not p.requires_grad for p in t.parameters())
    n_norm = sum(1 for r in c.plan.values() if r[0] == "norm")
    assert len(list(c.parameters())) == len(c.proj) + n_norm


@pytest.mark.parametrize("kind", ["llama", "qwen3", "bert"])
def test_shared_projections(kind):
    c = LowRankClone.from_teacher(tiny(kind), 16, share_qkv=True, share_gate_up=True)
    keys = set(c.proj.keys())
    assert "layer0_qkv" in keys and "layer0_q" not in keys
    assert ("layer0_gateup" in keys) == (kind != "bert")
    ids, am = batch()
    c(ids, attention_mask=am).loss.backward()
    assert c.proj["layer0_qkv"].grad.abs().sum() > 0


def _step(c, ids, am):
    for p in c.parameters():
        p.grad = None
    out = c(ids, attention_mask=am)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in c.named_parameters()}


def _assert_same_step(a, b, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "bert"])
def test_fused_and_eager_steps_agree(kind):
    c = LowRankClone.from_teacher(tiny(kind), 16)
    ids, am = batch()
    eager = _step(c, ids, am)
    with set_backend("triton"):
        fused = _step(c, ids, am)
    _assert_same_step(eager, fused, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("kind", FAMILIES)
def test_padding_does_not_change_loss(kind):
    c = LowRankClone.from_teacher(tiny(kind), 16)
    ids, am = batch(pad=False)
    base = _step(c, ids, am)
    ids_p = torch.cat([ids, torch.randint(0, V, (2, 3))], 1)
    am_p = torch.cat([am, torch.zeros(2, 3, dtype=am.dtype)], 1)
    padded = _step(c, ids_p, am_p)
    _assert_same_step(base, padded, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_checkpointing_and_association_do_not_change_the_step(kind):
    t = tiny(kind)
    ids, am = batch()
    torch.manual_seed(0)
    ref = _step(LowRankClone.from_teacher(t, 16), ids, am)
    for kw in (dict(gradient_checkpointing=True), dict(association="factorized")):
        torch.manual_seed(0)
        got = _step(LowRankClone.from_teacher(t, 16, **kw), ids, am)
        _assert_same_step(ref, got)


def test_auto_association_picks_the_cheaper_order():
    c = LowRankClone.from_teacher(tiny("llama"), 16)
    # d_T 32, d_S 16, d_m 32: factorized only pays off for very few tokens
    assert c._use_factorized(32, tokens=1)
    assert not c._use_factorized(32, tokens=4096)


@pytest.mark.parametrize("kind", FAMILIES)
def test_export_round_trip(kind):
    t = tiny(kind)
    c = LowRankClone.from_teacher(t, 16)
    ids, am = batch()
    with tempfile.TemporaryDirectory() as d:
        c.save_student(d)
        if kind == "bert":
            m = tf.AutoModel.from_pretrained(d, trust_remote_code=True).eval()
        else:
            m = tf.AutoModelForCausalLM.from_pretrained(d).eval()
        assert m.config.hidden_size == 16
        with torch.no_grad():
            got = m(input_ids=ids, attention_mask=am, output_hidden_states=True)
            ref = c.student_forward(input_ids=ids, attention_mask=am, output_hidden_states=True)
        torch.testing.assert_close(got.hidden_states[-1], ref.hidden_states[-1], rtol=1e-5, atol=1e-5)
        if kind != "bert":
            torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
            assert m.config.head_dim == t.config.head_dim if getattr(t.config, "head_dim", None) else 8
            gen = m.generate(ids[:1], attention_mask=am[:1], max_new_tokens=3, do_sample=False)
            assert gen.shape == (1, ids.shape[1] + 3)


def test_bad_inputs():
    t = tiny("llama")
    with pytest.raises(ValueError, match="student_hidden_size"):
        LowRankClone.from_teacher(t, 32)
    with pytest.raises(ValueError, match="student_hidden_size"):
        LowRankClone.from_teacher(t, 48)
    with pytest.raises(ValueError, match="init"):
        LowRankClone.from_teacher(t, 16, init="svd")
    with pytest.raises(ValueError, match="calibration"):
        LowRankClone.from_teacher(t, 16, init="pca")
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="supported: bert, llama, mistral, qwen2, qwen3"):
        LowRankClone.from_teacher(gpt2, 16)
    bad = tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=30, num_attention_heads=4, embedding_size=30,
                                     intermediate_size=64, num_hidden_layers=1))
    with pytest.raises(ValueError, match="divisible"):
        LowRankClone.from_teacher(bad, 16)
    from lrkd_fast.clone import LRCTrainer
    with pytest.raises(ValueError, match="empty"):
        LRCTrainer(LowRankClone.from_teacher(t, 16)).train([])


def test_pca_init_uses_principal_directions():
    t = tiny("llama")
    ids, am = batch()
    c = LowRankClone.from_teacher(t, 16, init="pca", calibration=[{"input_ids": ids, "attention_mask": am}])
    U = c.proj["emb"]
    torch.testing.assert_close(U.t() @ U, torch.eye(16), atol=1e-4, rtol=0)
    assert torch.isfinite(c(ids, attention_mask=am).loss)


def test_ddp_matches_single_process():
    worker = os.path.join(os.path.dirname(__file__), "lrc_ddp_worker.py")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with socket.socket() as sock:  # a free port (torchrun's --master_port 0 does not work with gloo here)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_addr", "127.0.0.1", "--master_port", str(port), worker, d], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        single = torch.load(os.path.join(d, "single.pt"))
        multi = torch.load(os.path.join(d, "rank0.pt"))
    torch.testing.assert_close(multi["loss"], single["loss"], rtol=1e-5, atol=1e-7)
    for n in single["grads"]:
        torch.testing.assert_close(multi["grads"][n], single["grads"][n], rtol=1e-4, atol=1e-7, msg=n)


def test_minilm_short_run_improves():
    from lrkd_fast.recipes import LRCRecipe, run_lrc_recipe
    with tempfile.TemporaryDirectory() as d:
        r = run_lrc_recipe(LRCRecipe(init="random", steps=20, lr=1e-3, batch_size=8, seq_len=32, heldout=64,
                                     fit_texts=128, output=d, progress=False))
        assert os.path.exists(os.path.join(d, "config.json"))
    losses = r.history["loss"]
    start, trained = r.rows[1].fidelity, r.rows[2].fidelity
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert trained.mean_cosine > start.mean_cosine, r.table()


def test_tied_embeddings_teacher():
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    t = tf.AutoModelForCausalLM.from_config(cfg).eval()
    c = LowRankClone.from_teacher(t, 16)
    ids, am = batch()
    assert torch.isfinite(c(ids, attention_mask=am).loss)
    with tempfile.TemporaryDirectory() as d:
        c.save_student(d)
        m = tf.AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids).logits, c.student_forward(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


def test_the_loss_settings_have_one_owner_and_the_trainer_uses_them():
    from lrkd_fast import DistillConfig, TrainConfig
    from lrkd_fast.clone import LRCLoss, LRCTrainer
    from lrkd_fast.ops import kd_loss

    t = tiny("llama")
    ids, am = batch()
    hot = LowRankClone.from_teacher(t, 16, temperature=2.0, alpha=0.0, lm_weight=0.0)
    assert hot.loss == LRCLoss(alpha=0.0, temperature=2.0, lm_weight=0.0)
    assert LowRankClone.from_teacher(t, 16, loss=LRCLoss(temperature=3.0), alpha=0.5).loss == LRCLoss(0.5, 3.0)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['bogus'\\]"):
        LowRankClone.from_teacher(t, 16, bogus=1)
    # with alpha = lm_weight = 0 the loss is the KL at the clone's temperature, on the real tokens
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hot.proj.values():
            p.normal_(0, 0.2)
        out = hot(ids, attention_mask=am)
        s_h = hot.student_forward(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states[-1]
        t_h = t(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states[-1]
        keep = am.reshape(-1).bool()
        W_head = t.lm_head.weight
        ref = kd_loss(s_h.reshape(-1, 16)[keep], W_head @ hot.proj["emb"], None, teacher_hidden=t_h.reshape(-1, 32)[keep],
                      teacher_weight=W_head, temperature=2.0, reduction="batchmean", batch_size=2, ce_weight=0.0,
                      kl_on_ignored=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-4, atol=1e-6)
    # the trainer takes its loss from the clone: a config that sets another trainer's loss field is refused
    with pytest.raises(ValueError, match=r"config sets \['temperature'\], which it would ignore"):
        LRCTrainer(hot, DistillConfig(temperature=40.0))
    assert type(LRCTrainer(hot, DistillConfig(steps=5)).cfg) is TrainConfig
    with pytest.raises(TypeError, match="clone must be a LowRankClone"):
        LRCTrainer(t)


# ----------------------------------------------------------------------------- attention-output form, head projection

@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_teacher_width_attention_term_fused_and_eager_agree(kind):
    # attn_clone="teacher": the attention term is a direct pair in the teacher width, through the fused clone loss
    c = LowRankClone.from_teacher(tiny(kind), 16, attn_clone="teacher")
    ids, am = batch()
    eager = _step(c, ids, am)
    with set_backend("triton"):
        fused = _step(c, ids, am)
    _assert_same_step(eager, fused, rtol=2e-4, atol=1e-6)
    student = LowRankClone.from_teacher(tiny(kind), 16)
    student.load_state_dict(c.state_dict())
    assert _step(student, ids, am)[0] != eager[0]  # the two forms are different losses


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_teacher_width_attention_term_reference(kind):
    # E(o_S', o_T): o_S' = the student's attention result (o_proj input) through the teacher's o_proj;
    # o_T = the teacher's o_proj output. Both caught by hooks on a plain forward of each model.
    t = tiny(kind)
    c = LowRankClone.from_teacher(t, 16, attn_clone="teacher", clone_weights={s: 0.0 for s in
                                  ("q", "k", "v", "gate", "up", "down")}, kd_weight=0.0, lm_weight=0.0, alpha=1.0)
    ids, am = batch()
    fam = c.family
    path = fam.site_module("o")
    caught = {}
    hooks = []
    for i in range(c.n_layers):
        hooks.append(c.t_layers[i].get_submodule(path).register_forward_hook(
            lambda m, a, o, i=i: caught.__setitem__(("t", i), o)))
        hooks.append(c.s_layers[i].get_submodule(path).register_forward_pre_hook(
            lambda m, a, i=i: caught.__setitem__(("a", i), a[0])))
    with torch.no_grad():
        loss = c(ids, attention_mask=am).loss
        for h in hooks:
            h.remove()
        kw = {} if kind == "bert" else {"use_cache": False}
        base = t if kind == "bert" else t.model
        base(input_ids=ids, attention_mask=am, **kw)
        c.student_forward(input_ids=ids, attention_mask=am)  # formed weights: its o_proj input is a_S
        keep = am.reshape(-1).bool()
        ref = 0.0
        for i in range(c.n_layers):
            t_o = c.t_layers[i].get_submodule(path)
            wide = F.linear(caught[("a", i)], t_o.weight, t_o.bias)
            d = (wide - caught[("t", i)]).reshape(-1, wide.shape[-1])[keep]
            ref += d.pow(2).mean()
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-7)


def test_teacher_form_identity_checkpointing_and_association():
    t = tiny("llama")
    ids, am = batch()
    c = LowRankClone.from_teacher(t, 32, init="identity", attn_clone="teacher")
    assert c(ids, attention_mask=am).parts["clone"] == 0.0
    torch.manual_seed(0)
    ref = _step(LowRankClone.from_teacher(t, 16, attn_clone="teacher"), ids, am)
    for kw in (dict(gradient_checkpointing=True), dict(association="factorized"), dict(association="formed")):
        torch.manual_seed(0)
        _assert_same_step(ref, _step(LowRankClone.from_teacher(t, 16, attn_clone="teacher", **kw), ids, am))


@pytest.mark.parametrize("tied_teacher", [False, True])
def test_untied_head_projection_export_round_trip(tied_teacher):
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied_teacher)
    t = tf.AutoModelForCausalLM.from_config(cfg).eval()
    c = LowRankClone.from_teacher(t, 16, tie_head_projection=False)
    assert "head" in c.proj and c.proj["head"].shape == (32, 16)
    ids, am = batch()
    c(ids, attention_mask=am).loss.backward()
    assert c.proj["head"].grad.abs().sum() > 0
    with torch.no_grad():
        c.proj["head"].mul_(1.7)  # head and embedding projections apart
    W = dict(t.named_parameters(remove_duplicate=False))
    with tempfile.TemporaryDirectory() as d:
        c.save_student(d)
        m = tf.AutoModelForCausalLM.from_pretrained(d).eval()
        assert m.config.tie_word_embeddings is False
        torch.testing.assert_close(m.lm_head.weight, W["lm_head.weight"] @ c.proj["head"])
        torch.testing.assert_close(m.model.embed_tokens.weight, W["model.embed_tokens.weight"] @ c.proj["emb"])
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids, attention_mask=am).logits,
                                       c.student_forward(input_ids=ids, attention_mask=am).logits,
                                       rtol=1e-5, atol=1e-5)


def test_attn_clone_and_head_projection_bad_inputs():
    with pytest.raises(ValueError, match="attn_clone must be one of"):
        LowRankClone.from_teacher(tiny("llama"), 16, attn_clone="wide")
    with pytest.raises(ValueError, match="tie_head_projection=False needs a family with an LM head; bert"):
        LowRankClone.from_teacher(tiny("bert"), 16, tie_head_projection=False)
    with pytest.raises(TypeError, match="tie_head_projection must be a bool"):
        LowRankClone.from_teacher(tiny("llama"), 16, tie_head_projection="no")


# ----------------------------------------------------------------------------- the paper preset and its schedule

def test_paper_preset_values(tiny_teacher_dir):
    from lrkd_fast.recipes import RecipeError
    from lrkd_fast.recipes.lrc import LRCRecipe, lrc_preset, lrc_train_config, paper_alpha

    # alpha: 0.2 at half the teacher's width or less (LRC-1.5B), 0.5 wider (LRC-1.7B, LRC-4B)
    assert [paper_alpha(3072, 1536), paper_alpha(2048, 1200), paper_alpha(3584, 2048)] == [0.2, 0.5, 0.5]
    with pytest.raises(ValueError, match="student_hidden"):
        paper_alpha(64, 64)
    r = lrc_preset("paper", teacher=tiny_teacher_dir, student_hidden=16)  # hidden 32 -> 16: alpha 0.2
    assert (r.preset, r.init, r.lr, r.warmup, r.schedule, r.seq_len, r.batch_size) == \
        ("paper", "random", 1e-4, 0.005, "linear", 2048, 16)
    assert (r.loss.alpha, r.loss.temperature, r.loss.kd_weight, r.loss.lm_weight) == (0.2, 40.0, 1.0, 1.0)
    assert lrc_preset("paper", teacher=tiny_teacher_dir, student_hidden=24).loss.alpha == 0.5
    cfg = lrc_train_config(r)
    assert (cfg.lr, cfg.warmup, cfg.schedule, cfg.weight_decay) == (1e-4, 0.005, "linear", 0.0)  # AdamW, wd 0 = Adam
    over = lrc_preset("paper", teacher=tiny_teacher_dir, student_hidden=16, lr=3e-4, loss_fields={"alpha": 0.7})
    assert (over.lr, over.loss.alpha, over.loss.temperature) == (3e-4, 0.7, 40.0)
    # the small built-in run keeps its own defaults
    d = LRCRecipe()
    assert (d.preset, d.init, d.lr, d.schedule, d.seq_len, d.loss.temperature) == (None, "pca", 1e-3, "cosine", 128, 40.0)
    with pytest.raises(ValueError, match="name must be one of"):
        lrc_preset("llama")
    with pytest.raises(RecipeError, match="schedule"):
        LRCRecipe(schedule="step")
    with pytest.raises(RecipeError, match="attn_clone"):
        LRCRecipe(attn_clone="wide")


def test_cli_preset_and_attn_clone_flags(tiny_teacher_dir):
    from lrkd_fast.cli import _lrc_recipe, build_parser, main

    parse = lambda *a: build_parser().parse_args(["distill", "--method", "lrc", "--teacher", tiny_teacher_dir, *a])  # noqa: E731
    r = _lrc_recipe(parse("--preset", "paper", "--student-hidden", "16"))
    assert (r.preset, r.lr, r.schedule, r.warmup, r.seq_len, r.loss.alpha, r.loss.temperature) == \
        ("paper", 1e-4, "linear", 0.005, 2048, 0.2, 40.0)
    r = _lrc_recipe(parse("--preset", "paper", "--student-hidden", "16", "--seq-len", "64", "--alpha", "0.9",
                          "--attn-clone", "teacher", "--schedule", "wsd", "--decay-fraction", "0.2"))
    assert (r.seq_len, r.loss.alpha, r.attn_clone, r.schedule, r.decay_fraction) == (64, 0.9, "teacher", "wsd", 0.2)
    r = _lrc_recipe(parse())
    assert (r.preset, r.lr, r.seq_len, r.attn_clone, r.loss.alpha) == (None, 1e-3, 128, "teacher", 0.2)
    assert main(["distill", "--attn-clone", "teacher"]) == 2  # swap: refused, naming the flag


@pytest.mark.parametrize("schedule,decay,expect", [
    # 1000 steps, warm-up 0.5% (5 steps): lr factor at steps 0, 4, 5, 500, 899, 900, 950, 999
    ("linear", 0.1, [0.2, 1.0, 1 - 0 / 995, 1 - 495 / 995, 1 - 894 / 995, 1 - 895 / 995, 1 - 945 / 995, 1 - 994 / 995]),
    ("wsd", 0.1, [0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.01]),
    ("wsd", 0.5, [0.2, 1.0, 1.0, 1.0, 0.202, 0.2, 0.1, 0.002]),
])
def test_schedule_lr_at_given_steps(schedule, decay, expect):
    from lrkd_fast.clone import LRCTrainer
    from lrkd_fast.training import TrainConfig

    trainer = LRCTrainer(LowRankClone.from_teacher(tiny("llama"), 16),
        TrainConfig(steps=1000, warmup=0.005, schedule=schedule, decay_fraction=decay))
    got = [trainer._lr_factor(s) for s in (0, 4, 5, 500, 899, 900, 950, 999)]
    assert got == pytest.approx(expect, abs=1e-12)


def test_wsd_config_checks():
    from lrkd_fast.training import TrainConfig

    with pytest.raises(ValueError, match="decay_fraction must be a fraction"):
        TrainConfig(schedule="wsd", decay_fraction=0.0)
    with pytest.raises(ValueError, match="warmup \\+ decay_fraction must be <= 1"):
        TrainConfig(schedule="wsd", warmup=0.5, decay_fraction=0.6)


def test_attn_clone_benchmark_tiny_causal_run(tmp_path):
    from benchmarks import lrc_attn_clone as bench

    cfg = bench.CausalConfig(vocab=256, hidden=32, ffn=64, student_hidden=16, seq_len=16, batch_size=8, heldout=16,
                             fit_texts=16, teacher_steps=4, steps=3, seeds=(0,), train_texts=48)
    rows = bench.run_causal(cfg, log=lambda *a: None)
    assert [(r["form"], r["seed"], r["steps"]) for r in rows] == [("student", 0, 3), ("teacher", 0, 3)]
    for r in rows:  # a held-out CE near ln(256) for a barely trained teacher, fidelity in range
        assert 3.0 < r["heldout_ce"] < 8.0 and r["heldout_kl"] >= 0 and -1 <= r["mean_cos"] <= 1, r
    path = tmp_path / "causal.csv"
    bench.write_csv(rows, bench.CAUSAL_FIELDS, str(path))
    assert path.read_text().splitlines()[0] == ",".join(bench.CAUSAL_FIELDS)


def test_attn_clone_benchmark_merges_new_seeds_into_its_csv(tmp_path):
    from benchmarks import lrc_attn_clone as bench

    path = tmp_path / "minilm.csv"
    path.write_text("form,steps,mean_cos\nstudent,100,0.87\nteacher,100,0.875\n")  # written before the seed column
    rows = bench.merge_rows([dict(form="teacher", seed=1, steps=100, mean_cos=0.871),
                             dict(form="teacher", seed=0, steps=100, mean_cos=0.9)], str(path))
    assert [(r["form"], str(r["seed"]), str(r["mean_cos"])) for r in rows] == \
        [("student", "0", "0.87"), ("teacher", "1", "0.871"), ("teacher", "0", "0.9")]
    assert bench.merge_rows(rows, str(tmp_path / "none.csv")) is rows
