"""AdamW with steps taken in whitened input coordinates for chosen matrices (``DistillConfig(optimizer="whitened")``).

A low-rank factor ``U`` (d_in, r) is read as ``x @ U``. Transformer activations are far from
isotropic (a few outlier features, a shared mean direction), and Adam's per-entry scaling sees only
the diagonal of that. Writing ``U = M U'`` with ``M = c L^{-T}``, where ``L L^T`` is the inputs'
second moment ``G = E[x x^T]`` (damped) and ``c = sqrt(mean diag G)``, the layer reads ``z @ U'``
with whitened inputs ``z = c L^{-1} x``, ``E[z z^T] = c^2 I``. :class:`WhitenedAdamW` keeps Adam's
moments for ``U'`` (its gradient is ``M^T g``) and applies each update through ``M``; the model keeps
its ``U``, so nothing else changes and a run costs two ``d_in x d_in x r`` matmuls per whitened
factor and step. Parameters without a basis take plain AdamW steps. ``c`` keeps ``U'`` at the scale
of ``U``, so the learning rate means about the same for both.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import Tensor

__all__ = ["WhitenedAdamW", "whitening_basis"]


def whitening_basis(gram: Tensor, damping: float = 1e-2, name: Optional[str] = None) -> Tensor:
    """``M = c L^{-T}`` (d_in x d_in, float64) for inputs with second moment ``gram``:
    ``L L^T = gram + damping * mean(diag gram) * I``, ``c = sqrt(mean(diag gram))``. ``name`` names the
    layer in errors."""
    what = f"gram of {name!r}" if name else "gram"
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty square matrix, got "
                         f"{tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__}")
    if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping > 0):
        raise ValueError(f"damping must be > 0, got {damping!r}")
    g = gram.detach().to(torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError(f"{what} has NaN or infinite entries")
    scale = g.diagonal().mean()
    if not scale > 0:
        raise ValueError(f"{what} has no positive diagonal: the layer saw no input")
    eye = torch.eye(len(g), dtype=g.dtype, device=g.device)
    L, info = torch.linalg.cholesky_ex(g + damping * scale * eye)
    if info != 0:
        raise ValueError(f"{what} is not positive semi-definite (Cholesky failed at column {int(info)})")
    return torch.linalg.solve_triangular(L.t(), eye, upper=True) * scale.sqrt()


class WhitenedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose parameters in ``bases`` step in the
    coordinates ``p = M p'`` (see the module doc).

    bases: ``{parameter: M}``, M (rows of the parameter) x (rows of the parameter), e.g.
        :func:`whitening_basis` of the layer's input Gram matrix; the parameters must be among ``params``.
        With every ``M`` the identity this is ``torch.optim.AdamW``.
    """

    def __init__(self, params, bases: Optional[Mapping[Tensor, Tensor]] = None, lr: float = 1e-3,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not (number(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not (number(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        self.bases = {}
        for p, M in (bases or {}).items():
            if id(p) not in owned:
                raise ValueError(f"bases holds a parameter of shape {tuple(p.shape)} that is not among params")
            if p.dim() != 2 or tuple(M.shape) != (p.shape[0], p.shape[0]):
                raise ValueError(f"the basis of a parameter of shape {tuple(p.shape)} must be "
                                 f"({p.shape[0]}, {p.shape[0]}), got {tuple(M.shape)}")
            self.bases[id(p)] = M.detach().to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                M = self.bases.get(id(p))
                g = p.grad if M is None else M.t() @ p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = int(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if wd:
                    p.mul_(1 - lr * wd)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
                p.sub_(update if M is None else M @ update, alpha=lr)
        return loss
