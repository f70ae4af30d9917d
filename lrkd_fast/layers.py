"""``LowRankLinear``: a drop-in, factorized replacement for ``nn.Linear``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .ops.lowrank_linear import lowrank_linear

__all__ = ["DENSE_KINDS", "LowRankLinear", "check_rank", "svd_factors"]

# the dense layers a LowRankLinear can stand for: nn.Linear and GPT-2's Conv1D (weight stored (in, out))
DENSE_KINDS = ("linear", "conv1d")


def check_rank(rank, in_features: int, out_features: int) -> int:
    """Rank must be an int in 1..min(in_features, out_features); ValueError naming ``rank`` otherwise."""
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int in 1..{limit}, got {rank!r}")
    if not 1 <= rank <= limit:
        raise ValueError(f"rank must be in 1..min(in_features={in_features}, out_features={out_features})"
                         f"={limit}, got {rank}")
    return rank


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors of a (d_out, d_in) weight: U (d_in, r), V (r, d_out) with U V ~ W^T.

    Truncated SVD in float64, singular values split evenly (sqrt on each side) so both factors have
    the same scale. Exact at full rank; at lower rank the spectral-norm error is sigma_{r+1}
    (Eckart-Young).
    """
    w = weight.detach().to(torch.float64)
    A, S, Bh = torch.linalg.svd(w.t(), full_matrices=False)  # W^T = A diag(S) Bh
    root = S[:rank].sqrt()
    U = A[:, :rank] * root
    V = root[:, None] * Bh[:rank]
    return U, V


class LowRankLinear(nn.Module):
    """y = (x U) V + b with U (in_features, rank), V (rank, out_features).

    Holds ``rank * (in_features + out_features)`` weights instead of ``in_features * out_features``.
    The product runs through :func:`lrkd_fast.lowrank_linear` (fused Triton kernels on GPU, eager
    matmuls elsewhere).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.rank = check_rank(rank, in_features, out_features)
        kw = dict(dtype=dtype, device=device)
        self.U = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, out_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        # Which dense layer this stands for: "linear" (nn.Linear) or "conv1d" (GPT-2's Conv1D,
        # weight stored (in, out)); merging back restores the same kind.
        self.dense_kind = "linear"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Scales chosen so x U V has the variance of nn.Linear's default init on unit inputs.
        bound_u = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.U, -bound_u, bound_u)
        nn.init.normal_(self.V, 0.0, math.sqrt(1.0 / (3.0 * self.rank)))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound_u, bound_u)

    def forward(self, x: Tensor) -> Tensor:
        return lowrank_linear(x, self.U, self.V, self.bias)

    @property
    def weight(self) -> Tensor:
        """The dense (out_features, in_features) weight this layer represents (computed, not stored)."""
        return (self.U @ self.V).t()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, init: str = "svd") -> "LowRankLinear":
        """Factor a dense ``nn.Linear`` at ``rank``.

        init: "svd" (truncated SVD, singular values split evenly; exact at full rank) or
        "random" (fresh init, only the bias copied).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if init not in ("svd", "random"):
            raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                    dtype=w.dtype, device=w.device)
        with torch.no_grad():
            if init == "svd":
                U, V = svd_factors(w, rank)
                layer.U.copy_(U)
                layer.V.copy_(V)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` computing the same function (product formed in float64)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          dtype=self.U.dtype, device=self.U.device)
        with torch.no_grad():
            dense.weight.copy_((self.U.double() @ self.V.double()).t())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def to_dense(self) -> nn.Module:
        """The dense layer of the kind this one replaced (``nn.Linear`` or GPT-2's ``Conv1D``)."""
        if self.dense_kind not in DENSE_KINDS:
            raise ValueError(f"dense_kind must be one of {DENSE_KINDS}, got {self.dense_kind!r}")
        if self.dense_kind == "linear":
            return self.to_linear()
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(self.out_features, self.in_features).to(device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.U.double() @ self.V.double())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
            else:
                conv.bias.zero_()
        return conv

    @property
    def num_dense_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def num_factor_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        saving = 1.0 - self.num_factor_params / self.num_dense_params
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, params={self.num_factor_params} vs dense "
                f"{self.num_dense_params} ({saving:+.1%} saved)")
