"""The backward of the fused losses: scale the gradients formed in the forward by d_loss.

One mutating custom op (so torch.compile traces it), backed by :func:`lrkd_fast.kernels.scale.scale_`
on the Triton path: when d_loss is exactly 1, as it is when the loss ends the graph, nothing is
read or written. The gradients are scaled in place, so each forward supports one backward.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("lrkd_fast::scale_grads_", mutates_args=("grads",))
def _scale_grads_(grads: list[Tensor], factor: Tensor) -> None:
    from lrkd_fast.kernels.scale import scale_

    for g in grads:
        if g.numel():
            scale_(g, factor.to(torch.float32))


@_scale_grads_.register_fake
def _(grads, factor):
    return None


def scale_saved_grads(ctx, grads: list[Tensor], d_loss: Tensor, op: str) -> list[Tensor]:
    """Scale ``grads`` (saved by the forward for a unit loss gradient) by ``d_loss`` in place.

    Raises where the answer would be silently wrong: a second backward through the same forward
    (``retain_graph=True``: the gradients were already scaled) and double backward
    (``create_graph=True``: the gradients were formed in the forward, so their own derivatives
    are not tracked).
    """
    if torch.is_grad_enabled():  # backward runs with grad mode on only under create_graph=True
        raise RuntimeError(f"{op}: second derivatives (create_graph=True) are not supported by the fused "
                           f"Triton path; use lrkd_fast.set_backend('eager') for higher-order gradients")
    if getattr(ctx, "_lrkd_backward_done", False):
        raise RuntimeError(f"{op}: the fused Triton path supports one backward per forward (its gradients are "
                           f"scaled in place); recompute the loss instead of retain_graph=True")
    ctx._lrkd_backward_done = True
    live = [g for g in grads if g is not None and g.numel()]
    if live:
        _scale_grads_(live, d_loss.detach().reshape(()))
    return grads
