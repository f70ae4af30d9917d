"""Representation diagnostics: how close a student's activations are to its teacher's, per layer.

Two measures on paired activations X (n, d_x) of the teacher and Y (n, d_y) of the student (one row
per token; the widths may differ, as in a Low-Rank Clone's narrower hidden state):

* :func:`linear_cka` -- linear centered kernel alignment (Kornblith et al., 2019)::

      CKA(X, Y) = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)      (Xc, Yc: column-centered)

  In [0, 1]; invariant to orthogonal transforms and isotropic scaling of either side, not to
  arbitrary invertible linear maps.

* :func:`gaussian_mutual_information` -- the mutual information of X and Y if they were jointly
  Gaussian, I = -1/2 sum_i log(1 - rho_i^2) nats over the canonical correlations rho_i, computed
  on a fixed number of components so that layers of different width are compared on equal terms:

  1. each side is reduced to its top ``components`` principal directions (eigenvectors of its
     covariance C_xx, C_yy), the same count k on both sides;
  2. ridge-regularized CCA in that space: the canonical correlations are the singular values of
     ``(L_x + ridge * mean(eig C_xx) I)^-1/2 U_x^T C_xy U_y (L_y + ridge * mean(eig C_yy) I)^-1/2``
     (L: the kept eigenvalues, U: their eigenvectors; the ridge is relative to each side's mean
     variance per dimension, so it does not depend on the activations' scale);
  3. I = -1/2 sum_{i<=k} log(1 - rho_i^2), each rho_i^2 capped at 1 - 1e-12 (identical inputs with
     ``ridge=0`` would otherwise give infinity).

  The estimate is biased upward on finite samples: on independent data (I = 0) sample canonical
  correlations are not zero. To first order (Bartlett's chi-square approximation of Wilks' lambda,
  ridge = 0) its mean is ``k_x k_y / (2 (n - 1 - (k_x + k_y + 1) / 2))`` nats;
  :func:`mutual_information_null_bias` returns it and ``tests/test_diagnostics.py`` measures it.
  Tokens of one sequence are correlated, so on real activations the effective n is smaller than
  the token count and the bias larger: compare layers and runs at the same n and k.
  The ridge shrinks every rho, so it biases the estimate downward on strongly dependent data; with
  the default (1e-3) identical inputs give -1/2 log(1 - (l / (l + 1e-3 mean(l)))^2) per component.

Both are computed from first and second moments only, so :func:`representation_diagnostics`
streams over batches with memory O(d^2) per site, independent of the token count.

:func:`representation_diagnostics` runs a teacher and a student on a few batches and returns both
measures per site: every transformer block's output for a swapped student (blocks found as in
:func:`lrkd_fast.model_utils.find_blocks`), every clone site (q, k, v, gate, up, o, down per layer) for a
:class:`~lrkd_fast.clone.LowRankClone`, or the module names given. Which layer lags is the one to
look at first.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from .model_utils import find_blocks, first_tensor, token_rows

__all__ = ["DEFAULT_COMPONENTS", "DEFAULT_RIDGE", "LayerDiagnostics", "canonical_correlations", "format_diagnostics",
           "gaussian_mutual_information", "history_entry", "linear_cka", "mutual_information_null_bias",
           "plot_diagnostics", "representation_diagnostics"]

DEFAULT_COMPONENTS = 32  # components=None: min(32, d_x, d_y)
DEFAULT_RIDGE = 1e-3
_RHO2_CAP = 1.0 - 1e-12


# ------------------------------------------------------------------------------------ validation

def _check_activations(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows (samples), got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x.detach().to(torch.float64)


def _check_pair(X, Y) -> tuple[Tensor, Tensor]:
    X, Y = _check_activations("X", X), _check_activations("Y", Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows (paired samples), got {X.shape[0]} and {Y.shape[0]}")
    return X, Y


def _check_ridge(ridge) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return float(ridge)


def _components(components, n: int, dx: int, dy: int) -> int:
    if components is None:
        k = min(DEFAULT_COMPONENTS, dx, dy)
    else:
        if isinstance(components, bool) or not isinstance(components, int):
            raise TypeError(f"components must be an int or None, got {components!r}")
        if not 1 <= components <= min(dx, dy):
            raise ValueError(f"components must lie in 1..min(d_x, d_y) = {min(dx, dy)}, got {components}")
        k = components
    if n <= 2 * k:
        raise ValueError(f"components={k} needs more than {2 * k} samples (rows), got n={n}: "
                         f"pass fewer components or more data")
    return k


# ------------------------------------------------------------------------------------ moments

class _Moments:
    """Running sums of paired rows (float64): n, sum x, sum y, X^T X, Y^T Y, X^T Y."""

    def __init__(self):
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = None

    def add(self, x: Tensor, y: Tensor) -> None:
        x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
        if self.sx is None:
            self.sx, self.sy = x.sum(0), y.sum(0)
            self.sxx, self.syy, self.sxy = x.t() @ x, y.t() @ y, x.t() @ y
        else:
            if x.shape[1] != self.sx.shape[0] or y.shape[1] != self.sy.shape[0]:
                raise ValueError(f"activation widths changed between batches: ({self.sx.shape[0]}, {self.sy.shape[0]}) "
                                 f"then ({x.shape[1]}, {y.shape[1]})")
            self.sx += x.sum(0)
            self.sy += y.sum(0)
            self.sxx += x.t() @ x
            self.syy += y.t() @ y
            self.sxy += x.t() @ y
        self.n += x.shape[0]

    def covariances(self) -> tuple[Tensor, Tensor, Tensor]:
        """(C_xx, C_yy, C_xy), normalized by n - 1."""
        n = self.n
        mx, my = self.sx / n, self.sy / n
        cxx = (self.sxx - n * torch.outer(mx, mx)) / (n - 1)
        cyy = (self.syy - n * torch.outer(my, my)) / (n - 1)
        cxy = (self.sxy - n * torch.outer(mx, my)) / (n - 1)
        return (cxx + cxx.t()) / 2, (cyy + cyy.t()) / 2, cxy

    @classmethod
    def of(cls, X: Tensor, Y: Tensor) -> "_Moments":
        m = cls()
        # centering first keeps the float64 sums exact enough for data far from the origin
        m.add(X - X.mean(0), Y - Y.mean(0))
        return m


def _cka_from_cov(cxx: Tensor, cyy: Tensor, cxy: Tensor) -> float:
    den = torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)
    if den <= 0:
        raise ValueError("linear CKA is undefined for constant activations (X or Y has zero variance)")
    return (cxy.square().sum() / den).clamp(0.0, 1.0).item()


def _reduce(c: Tensor, k: int, ridge: float, name: str) -> Tensor:
    """(d, k) map to the top-k principal directions of covariance ``c``, whitened with the ridge."""
    lam, vec = torch.linalg.eigh(c)
    lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
    mean = lam.mean()
    if mean <= 0:
        raise ValueError(f"{name} has zero variance: the mutual information is undefined")
    denom = lam[:k] + ridge * mean
    if (denom <= 1e-12 * mean).any():
        raise ValueError(f"{name} has fewer than {k} directions with nonzero variance: pass fewer components "
                         f"or ridge > 0")
    return vec[:, :k] / denom.sqrt()


def _rho_from_cov(cxx: Tensor, cyy: Tensor, cxy: Tensor, k: int, ridge: float) -> Tensor:
    wx, wy = _reduce(cxx, k, ridge, "X"), _reduce(cyy, k, ridge, "Y")
    return torch.linalg.svdvals(wx.t() @ cxy @ wy).clamp(0.0, 1.0)


def _mi_from_rho(rho: Tensor) -> float:
    return (-0.5 * torch.log1p(-rho.square().clamp(max=_RHO2_CAP))).sum().item()


# ------------------------------------------------------------------------------------ public measures

def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA between X (n, d_x) and Y (n, d_y), paired by row; a float in [0, 1]."""
    X, Y = _check_pair(X, Y)
    return _cka_from_cov(*_Moments.of(X, Y).covariances())


def canonical_correlations(X: Tensor, Y: Tensor, components: Optional[int] = None,
                           ridge: float = DEFAULT_RIDGE) -> Tensor:
    """The k = ``components`` ridge-regularized canonical correlations of X (n, d_x) and Y (n, d_y),
    descending, float64 (see the module docstring for the procedure)."""
    X, Y = _check_pair(X, Y)
    ridge = _check_ridge(ridge)
    k = _components(components, X.shape[0], X.shape[1], Y.shape[1])
    return _rho_from_cov(*_Moments.of(X, Y).covariances(), k, ridge)


def gaussian_mutual_information(X: Tensor, Y: Tensor, components: Optional[int] = None,
                                ridge: float = DEFAULT_RIDGE) -> float:
    """Gaussian mutual-information estimate (nats) between X (n, d_x) and Y (n, d_y), paired by row:
    I = -1/2 sum_i log(1 - rho_i^2) over the ``components`` canonical correlations of a
    ridge-regularized CCA on each side's top ``components`` principal directions.

    components: None = min(32, d_x, d_y); otherwise 1..min(d_x, d_y), and n must exceed 2 * components.
    ridge: >= 0, relative to each side's mean variance per dimension.
    Biased upward on finite samples (see :func:`mutual_information_null_bias`).
    """
    return _mi_from_rho(canonical_correlations(X, Y, components, ridge))


def mutual_information_null_bias(n: int, components: int, components_y: Optional[int] = None) -> float:
    """Expected estimate (nats) on *independent* data with ``ridge=0``, to first order:
    p q / (2 (n - 1 - (p + q + 1) / 2)) with p = ``components``, q = ``components_y`` (default p).

    From Bartlett's approximation: -(n - 1 - (p + q + 1)/2) log prod(1 - rho_i^2) is chi-square with
    p q degrees of freedom when X and Y are independent Gaussians.
    """
    q = components if components_y is None else components_y
    for name, v in (("n", n), ("components", components), ("components_y", q)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    dof = n - 1 - (components + q + 1) / 2
    if dof <= 0:
        raise ValueError(f"n={n} is too small for {components} x {q} components (needs n > {1 + (components + q + 1) / 2})")
    return components * q / (2 * dof)


# ------------------------------------------------------------------------------------ models

@dataclass
class LayerDiagnostics:
    """CKA and Gaussian MI (nats) between teacher and student activations at one site, over ``rows``
    token rows; ``mi_null`` is the estimate's expected value on independent data of the same size."""

    site: str
    cka: float
    mi: float
    rows: int
    components: int
    mi_null: float

    def as_dict(self) -> dict:
        return dict(site=self.site, cka=self.cka, mi=self.mi, rows=self.rows, components=self.components,
                    mi_null=self.mi_null)


def _is_clone(model) -> bool:
    from .clone import LowRankClone

    return isinstance(model, LowRankClone)


def _clone_sites(clone) -> list[tuple[str, nn.Module, nn.Module]]:
    fam = clone.family
    out = []
    for i in range(clone.n_layers):
        for site in fam.sites:
            path = fam.site_module(site)
            out.append((f"layer{i}.{site}", clone.t_layers[i].get_submodule(path),
                        clone.s_layers[i].get_submodule(path)))
    return out


def _model_sites(teacher: nn.Module, student: nn.Module, sites) -> list[tuple[str, nn.Module, nn.Module]]:
    if sites is None:
        sites = find_blocks(student)
        if not sites:
            raise ValueError("could not find transformer blocks in the student: pass sites (module names)")
    elif isinstance(sites, str) or not all(isinstance(s, str) for s in sites) or not sites:
        raise ValueError(f"sites must be a non-empty list of module names, got {sites!r}")
    out = []
    for name in sites:
        try:
            out.append((name, teacher.get_submodule(name), student.get_submodule(name)))
        except AttributeError as exc:
            raise ValueError(f"site {name!r} is not a module of both the teacher and the student") from exc
    return out


def _as_batch_list(batches) -> list:
    if isinstance(batches, dict):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one batch (a dict of model inputs)")
    for b in batches:
        if not isinstance(b, dict) or "input_ids" not in b:
            raise ValueError("every batch must be a dict with at least 'input_ids' (and usually 'attention_mask')")
    return batches


@torch.no_grad()
def representation_diagnostics(teacher: Optional[nn.Module], student: nn.Module, batches: Iterable[dict], *,
                               sites: Optional[list] = None, components: Optional[int] = None,
                               ridge: float = DEFAULT_RIDGE, forward: Optional[Callable] = None
                               ) -> dict[str, LayerDiagnostics]:
    """Per-site linear CKA and Gaussian MI between teacher and student activations on ``batches``.

    teacher, student: a dense model and its swapped copy (sites default to every transformer block's
    output), or ``student`` a :class:`~lrkd_fast.clone.LowRankClone` and ``teacher`` None or the
    clone's own teacher (sites: every clone site, named ``layer{i}.{site}``).
    batches: dicts of model inputs; rows are the tokens where ``attention_mask`` is 1.
    sites: module names present in both models (swapped students only).
    components, ridge: as in :func:`gaussian_mutual_information`, the same for every site.
    forward: ``forward(model, batch)`` to run a model instead of ``model(**batch)``.
    Returns {site: LayerDiagnostics} in model order. Both models are left in the mode they were in.
    """
    ridge = _check_ridge(ridge)
    batches = _as_batch_list(batches)
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    clone = _is_clone(student)
    if clone:
        if sites is not None:
            raise ValueError("sites cannot be chosen for a LowRankClone: its clone sites are used")
        if teacher is not None and teacher is not student.teacher and \
                getattr(teacher, student.family.base, None) is not student.teacher:
            raise ValueError("teacher must be None or the LowRankClone's own teacher")
        pairs = _clone_sites(student)
    else:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher is student:
            raise ValueError("teacher and student are the same object")
        pairs = _model_sites(teacher, student, sites)
    if components is not None and (isinstance(components, bool) or not isinstance(components, int) or components < 1):
        raise ValueError(f"components must be an int >= 1 or None, got {components!r}")

    caught: dict = {}
    hooks = []

    def catch(key):
        def fn(module, args, out):
            caught[key] = first_tensor(out)
        return fn

    for name, tm, sm in pairs:
        hooks.append(tm.register_forward_hook(catch(("t", name))))
        hooks.append(sm.register_forward_hook(catch(("s", name))))
    run = forward or (lambda model, batch: model(**batch))
    models = [student] if clone else [teacher, student]
    modes = [m.training for m in models]
    moments = {name: _Moments() for name, _, _ in pairs}
    try:
        for m in models:
            m.eval()
        for batch in batches:
            caught.clear()
            for m in models:
                run(m, batch)
            mask = batch.get("attention_mask")
            for name, _, _ in pairs:
                if ("t", name) not in caught or ("s", name) not in caught:
                    raise RuntimeError(f"site {name!r} was not reached by the forward pass")
                t, s = token_rows(caught[("t", name)], mask), token_rows(caught[("s", name)], mask)
                if t.shape[0] != s.shape[0]:
                    raise RuntimeError(f"site {name!r}: teacher and student gave {t.shape[0]} and {s.shape[0]} rows")
                moments[name].add(t, s)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in zip(models, modes):
            m.train(mode)

    out = {}
    for name, mom in moments.items():
        cxx, cyy, cxy = mom.covariances()
        k = _components(components, mom.n, cxx.shape[0], cyy.shape[0])
        out[name] = LayerDiagnostics(site=name, cka=_cka_from_cov(cxx, cyy, cxy),
                                     mi=_mi_from_rho(_rho_from_cov(cxx, cyy, cxy, k, ridge)), rows=mom.n,
                                     components=k, mi_null=mutual_information_null_bias(mom.n, k))
    return out


def format_diagnostics(diags: dict) -> str:
    """A per-site table of CKA and MI (from :func:`representation_diagnostics`); the lowest CKA is marked."""
    if not diags:
        raise ValueError("diags is empty")
    low = min(diags.values(), key=lambda d: d.cka).site
    w = max(4, max(len(s) for s in diags))
    lines = [f"{'site':<{w}}  {'CKA':>7}  {'MI (nats)':>10}  {'null MI':>8}  rows", "-" * (w + 40)]
    for d in diags.values():
        mark = "  <- lowest CKA" if d.site == low and len(diags) > 1 else ""
        lines.append(f"{d.site:<{w}}  {d.cka:>7.4f}  {d.mi:>10.3f}  {d.mi_null:>8.3f}  {d.rows}{mark}")
    return "\n".join(lines)


def history_entry(step: int, diags: dict) -> dict:
    """One entry of a training history's ``"diagnostics"`` list: ``{"step": step, "sites": {site: {...}}}``
    (plain floats and ints, so the history stays JSON- and checkpoint-friendly)."""
    if not diags:
        raise ValueError("diags is empty")
    return {"step": int(step), "sites": {name: d.as_dict() for name, d in diags.items()}}


def plot_diagnostics(entries: list, path: str, title: str = "") -> str:
    """Write a PNG of MI and CKA per site over training from history entries (:func:`history_entry`):
    one line per site, so the layer that lags stands out. Returns ``path``."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError("entries must be a non-empty list of diagnostics history entries")
    if any(not isinstance(e, dict) or "step" not in e or "sites" not in e for e in entries):
        raise ValueError("every entry must be a dict with 'step' and 'sites' (see history_entry)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(dict.fromkeys(s for e in entries for s in e["sites"]))
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "mi", "Gaussian MI, teacher vs student (nats)"), (axes[1], "cka", "linear CKA")):
        for j, site in enumerate(sites):
            pts = [(e["step"], e["sites"][site][key]) for e in entries if site in e["sites"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color=cmap(j / max(1, len(sites) - 1)),
                    label=site)
        if key == "mi":
            null = entries[-1]["sites"][sites[-1]].get("mi_null")
            if null is not None:
                ax.axhline(null, color="gray", lw=0.8, ls=":", label="estimate on independent data")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=6, ncol=2 if len(sites) > 8 else 1)
    fig.suptitle(title or "representation diagnostics per site over training", fontsize=10)
    fig.tight_layout()
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
