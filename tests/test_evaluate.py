"""Fidelity measures against plain-loop references, and the side-by-side throughput timer."""
import pytest
import torch
import torch.nn.functional as F

from lrkd_fast.evaluate import embedding_fidelity, mean_pool, readout_fidelity, sentence_embeddings, throughput
from tests.conftest import VOCAB, tiny


def test_mean_pool_matches_a_loop_over_real_tokens():
    h = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    ref = torch.stack([sum(h[b, i] for i in range(5) if mask[b, i]) / int(mask[b].sum()) for b in range(3)])
    torch.testing.assert_close(mean_pool(h, mask), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean_pool(h, None), h.mean(1))
    with pytest.raises(ValueError, match="attention_mask must be"):
        mean_pool(h, mask[:, :3])
    with pytest.raises(ValueError, match="hidden must be"):
        mean_pool(h[0], None)


def test_embedding_fidelity_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(20, 6, generator=g), dim=-1)
    s = F.normalize(t + 0.4 * torch.randn(20, 6, generator=g), dim=-1)
    cos = [float(s[i] @ t[i]) for i in range(20)]

    def nearest(e, i):
        return max((j for j in range(20) if j != i), key=lambda j: float(e[i] @ e[j]))

    agree = sum(nearest(s, i) == nearest(t, i) for i in range(20)) / 20
    f = embedding_fidelity(s, t)
    assert f.n == 20 and 0 < agree < 1
    assert f.mean_cosine == pytest.approx(sum(cos) / 20, abs=1e-6)
    assert f.min_cosine == pytest.approx(min(cos), abs=1e-6)
    assert f.nn_agreement == pytest.approx(agree)
    same = embedding_fidelity(t, t)
    assert (same.mean_cosine, same.nn_agreement) == (pytest.approx(1.0), 1.0)
    with pytest.raises(ValueError, match="matching"):
        embedding_fidelity(s, t[:, :5])
    with pytest.raises(ValueError, match="at least 2 texts"):
        embedding_fidelity(s[:1], t[:1])


def test_readout_fidelity_is_a_ridge_least_squares_map():
    g = torch.Generator().manual_seed(1)
    s_fit, s_held = torch.randn(200, 4, generator=g), torch.randn(30, 4, generator=g)
    M = torch.randn(4, 8, generator=g)
    t_fit, t_held = F.normalize(s_fit @ M, dim=-1), F.normalize(s_held @ M, dim=-1)
    f = readout_fidelity(s_fit, t_fit, s_held, t_held)
    # reference: the ridge problem as an augmented least-squares system, solved by QR (lstsq)
    S, T = s_fit.double(), t_fit.double()
    lam = 1e-3 * (S.t() @ S).diagonal().mean()
    A = torch.cat([S, lam.sqrt() * torch.eye(4, dtype=torch.float64)])
    B = torch.cat([T, torch.zeros(4, 8, dtype=torch.float64)])
    W = torch.linalg.lstsq(A, B).solution
    ref = embedding_fidelity(F.normalize((s_held.double() @ W).float(), dim=-1), t_held)
    assert f.mean_cosine == pytest.approx(ref.mean_cosine, abs=1e-6)
    assert f.min_cosine == pytest.approx(ref.min_cosine, abs=1e-6)
    assert f.mean_cosine > 0.95  # the teacher is (up to normalization) a linear map of the student
    with pytest.raises(ValueError, match="same texts"):
        readout_fidelity(s_fit, t_fit[:10], s_held, t_held)


def test_sentence_embeddings_and_throughput_on_tiny_models():
    bert, llama = tiny("bert").eval(), tiny("llama").eval()
    ids = torch.randint(1, VOCAB, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    batches = [{"input_ids": ids, "attention_mask": mask}]
    emb = sentence_embeddings(bert, batches)
    with torch.no_grad():
        h = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(emb, F.normalize(mean_pool(h, mask), dim=-1))
    speed = throughput({"a": bert, "b": bert}, batches, repeats=2)
    assert set(speed) == {"a", "b"} and all(v > 0 for v in speed.values())
    gen = throughput({"lm": llama}, [{"input_ids": ids}], repeats=1, new_tokens=3)
    assert gen["lm"] > 0
    with pytest.raises(ValueError, match="repeats"):
        throughput({"a": bert}, batches, repeats=0)
    with pytest.raises(ValueError, match="batches is empty"):
        throughput({"a": bert}, [])
