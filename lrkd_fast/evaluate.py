"""Fidelity of a student to its teacher on held-out text, and how fast each runs."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model_utils import is_causal_lm, last_hidden_state

__all__ = ["EmbeddingFidelity", "embedding_fidelity", "mean_pool", "pairwise_similarity_spearman", "readout_fidelity",
           "sentence_embeddings", "spearman", "throughput"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real (unmasked) tokens: (B, L, H) -> (B, H); sentence-transformers' pooling."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, L, H), got shape {tuple(hidden.shape)}")
    if attention_mask is None:
        return hidden.mean(1)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask must be (B, L) = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}")
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def sentence_embeddings(model, batches) -> torch.Tensor:
    """L2-normalized mean-pooled last hidden states for every batch, concatenated (fp32)."""
    was = model.training
    model.eval()
    outs = []
    try:
        for b in batches:
            out = model(**b, output_hidden_states=True)
            outs.append(F.normalize(mean_pool(last_hidden_state(out).float(), b.get("attention_mask")), dim=-1))
    finally:
        model.train(was)
    if not outs:
        raise ValueError("batches is empty: no texts to embed")
    return torch.cat(outs)


@dataclass
class EmbeddingFidelity:
    mean_cosine: float
    min_cosine: float
    nn_agreement: float  # fraction of texts whose nearest neighbour is the same under both models
    n: int
    # rank correlation of the two models' cosine similarities over all pairs of texts (nan: not measured)
    spearman: float = float("nan")


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties sharing their mean rank (as scipy.stats.rankdata)."""
    order = torch.argsort(v, stable=True)
    sv = v[order]
    new = torch.ones_like(sv, dtype=torch.bool)
    new[1:] = sv[1:] != sv[:-1]
    group = torch.cumsum(new, 0) - 1
    first = torch.nonzero(new).squeeze(1).double()
    last = torch.cat([first[1:], torch.tensor([float(len(v))], dtype=torch.float64, device=v.device)]) - 1
    ranks = torch.empty(len(v), dtype=torch.float64, device=v.device)
    ranks[order] = ((first + last) / 2 + 1)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors of the same length (>= 2); nan when one is constant."""
    if a.dim() != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D of the same length, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() < 2:
        raise ValueError(f"need at least 2 values, got {a.numel()}")
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.square().sum() * rb.square().sum()).sqrt()
    return float("nan") if den == 0 else float((ra * rb).sum() / den)


def pairwise_similarity_spearman(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> float:
    """Spearman correlation between the teacher's and the student's cosine similarities over all
    pairs of texts (i < j) of normalized embeddings: does the student order pairs as the teacher does?
    Unlike nearest-neighbour agreement it does not flip on near ties."""
    n = student_emb.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=student_emb.device)
    s = (student_emb.double() @ student_emb.double().t())[i, j]
    t = (teacher_emb.double() @ teacher_emb.double().t())[i, j]
    return spearman(s, t)


def embedding_fidelity(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> EmbeddingFidelity:
    """Compare two sets of normalized embeddings of the same texts."""
    if student_emb.shape != teacher_emb.shape or student_emb.dim() != 2:
        raise ValueError(f"embeddings must be matching (n, d) tensors, got {tuple(student_emb.shape)} "
                         f"and {tuple(teacher_emb.shape)}")
    if student_emb.shape[0] < 2:
        raise ValueError("need at least 2 texts to compare nearest neighbours")
    cos = (student_emb * teacher_emb).sum(-1)
    eye = torch.eye(len(cos), dtype=torch.bool, device=cos.device)
    nn_s = (student_emb @ student_emb.t()).masked_fill(eye, -2).argmax(-1)
    nn_t = (teacher_emb @ teacher_emb.t()).masked_fill(eye, -2).argmax(-1)
    return EmbeddingFidelity(cos.mean().item(), cos.min().item(), (nn_s == nn_t).float().mean().item(), len(cos),
                             pairwise_similarity_spearman(student_emb, teacher_emb))


def _ridge(S: torch.Tensor, T: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    S, T = S.double(), T.double()
    A = S.t() @ S
    A += lam * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A, S.t() @ T)


def readout_fidelity(s_fit, t_fit, s_held, t_held) -> EmbeddingFidelity:
    """Fidelity of a student whose embeddings have another width than the teacher's: held-out student
    embeddings mapped to the teacher's space by a ridge read-out (least squares, student -> teacher)
    fitted on (``s_fit``, ``t_fit``), embeddings of other texts. The read-out cannot be gamed by
    the student: it only sees the fit texts."""
    if s_fit.shape[0] != t_fit.shape[0] or s_held.shape[0] != t_held.shape[0]:
        raise ValueError(f"student and teacher embeddings must cover the same texts, got {s_fit.shape[0]} vs "
                         f"{t_fit.shape[0]} fit and {s_held.shape[0]} vs {t_held.shape[0]} held-out rows")
    if s_fit.shape[1] != s_held.shape[1] or t_fit.shape[1] != t_held.shape[1]:
        raise ValueError("fit and held-out embeddings must have the same widths")
    W = _ridge(s_fit, t_fit)
    mapped = F.normalize((s_held.double() @ W).float(), dim=-1)
    return embedding_fidelity(mapped, t_held)


@torch.no_grad()
def throughput(models: dict, batches, repeats: int = 3, new_tokens: int = 16) -> dict[str, float]:
    """Texts per second (encoders: one forward per batch) or generated tokens per second (causal LMs:
    ``generate`` with ``new_tokens`` greedy tokens per batch), per model in ``models``.

    The models take turns on every batch and repeat (after one untimed warm-up batch each), so load
    on the machine falls on all of them alike; each gets its best of ``repeats`` passes.
    """
    if not models:
        raise ValueError("models is empty")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")

    modes = {name: m.training for name, m in models.items()}
    best = {name: float("inf") for name in models}
    try:
        for m in models.values():
            m.eval()
            _run(m, batches[0], new_tokens)
        for _ in range(repeats):
            spent = dict.fromkeys(models, 0.0)
            for b in batches:
                for name, m in models.items():
                    t0 = time.perf_counter()
                    _run(m, b, new_tokens)
                    spent[name] += time.perf_counter() - t0
            best = {name: min(best[name], spent[name]) for name in models}
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return {name: sum(_units(m, b, new_tokens) for b in batches) / max(best[name], 1e-12)
            for name, m in models.items()}


def _units(model, batch: dict, new_tokens: int) -> int:
    """What :func:`throughput` counts for one batch: texts (encoders) or generated tokens (causal LMs)."""
    return batch["input_ids"].shape[0] * (new_tokens if is_causal_lm(model) else 1)


def _run(model, batch: dict, new_tokens: int) -> None:
    if is_causal_lm(model):
        pad = getattr(model.config, "pad_token_id", None)
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0 if pad is None else pad)
    else:
        model(**batch)
