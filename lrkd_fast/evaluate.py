"""Fidelity of a student to its teacher on held-out text."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["mean_pool", "sentence_embeddings", "EmbeddingFidelity", "embedding_fidelity"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real (unmasked) tokens: (B, L, H) -> (B, H); sentence-transformers' pooling."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _last_hidden(out):
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    if hasattr(out, "hidden_states") and out.hidden_states is not None:
        return out.hidden_states[-1]
    return out[0]


@torch.no_grad()
def sentence_embeddings(model, batches) -> torch.Tensor:
    """L2-normalized mean-pooled last hidden states for every batch, concatenated (fp32)."""
    was = model.training
    model.eval()
    outs = []
    try:
        for b in batches:
            out = model(**b, output_hidden_states=True)
            outs.append(F.normalize(mean_pool(_last_hidden(out).float(), b.get("attention_mask")), dim=-1))
    finally:
        model.train(was)
    return torch.cat(outs)


@dataclass
class EmbeddingFidelity:
    mean_cosine: float
    min_cosine: float
    nn_agreement: float  # fraction of texts whose nearest neighbour is the same under both models
    n: int


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
    return EmbeddingFidelity(cos.mean().item(), cos.min().item(), (nn_s == nn_t).float().mean().item(), len(cos))
