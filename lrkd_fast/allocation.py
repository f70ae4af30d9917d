"""Spreading one parameter budget over many low-rank layers (``LowRankConfig(allocation="sensitivity")``).

A uniform rule (every layer keeps the same fraction of its parameters) spends as much on a layer
whose truncation barely moves the model's output as on one that matters a lot. The sensitivity
rule measures, then spends:

1. Each layer's whitened spectrum ``s_1 >= s_2 >= ...`` (see :func:`lrkd_fast.swap.whitened_factors`):
   at rank r the layer's expected output error on the calibration inputs is ``sum_{i>r} s_i^2``.
2. Each layer's *sensitivity*: the model's final-output error (relative squared error of the last
   hidden state over real tokens) when that layer alone is cut to its uniform rank ``r0``, divided
   by the layer error it caused, ``sum_{i>r0} s_i^2``. This converts layer error into model error.
3. A greedy allocation: rank steps of all layers, valued ``sensitivity * s_i^2 / (d_in + d_out)``
   (model error removed per parameter), taken best first until the uniform rule's total is spent.
   Within a layer the values fall with i, so each layer gets a prefix of its spectrum.

The model-error model is additive and linear in each layer's error (first order). It is a ranking
device, not a prediction. :func:`sensitivity_ranks` measures and allocates; :func:`allocate_ranks`
is the greedy step alone.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn

from .model_utils import as_model_inputs, find_blocks, last_hidden_state, run_model, set_module

__all__ = ["allocate_ranks", "sensitivity_ranks"]


def allocate_ranks(spectra: Mapping[str, torch.Tensor], costs: Mapping[str, int], budget: int,
                   weights: Mapping[str, float], min_ranks: Mapping[str, int],
                   max_ranks: Mapping[str, int]) -> dict[str, int]:
    """Greedy ranks under a parameter budget.

    spectra: per layer, the squared singular values that rank steps buy (non-increasing).
    costs: parameters per rank step (``d_in + d_out``).
    budget: total parameters the ranks may use, ``sum(rank * cost) <= budget``.
    weights: per layer, how much one unit of its spectrum is worth (the sensitivity).
    min_ranks / max_ranks: bounds per layer; the minimums are paid first.

    Returns ``{name: rank}`` in the order of ``spectra``. Ties go to the earlier layer.
    """
    names = list(spectra)
    if not names:
        raise ValueError("spectra is empty: no layers to allocate ranks to")
    for what, m in (("costs", costs), ("weights", weights), ("min_ranks", min_ranks), ("max_ranks", max_ranks)):
        missing = [n for n in names if n not in m]
        if missing:
            raise ValueError(f"{what} lacks layers {missing[:4]}")
    for n in names:
        if costs[n] < 1:
            raise ValueError(f"costs[{n!r}] must be >= 1, got {costs[n]}")
        if not 1 <= min_ranks[n] <= max_ranks[n] <= len(spectra[n]):
            raise ValueError(f"layer {n!r}: need 1 <= min rank ({min_ranks[n]}) <= max rank ({max_ranks[n]}) "
                             f"<= spectrum length ({len(spectra[n])})")
        if not weights[n] >= 0:
            raise ValueError(f"weights[{n!r}] must be >= 0, got {weights[n]}")
    ranks = {n: min_ranks[n] for n in names}
    left = budget - sum(ranks[n] * costs[n] for n in names)
    if left < 0:
        raise ValueError(f"budget {budget:,} is below the minimum ranks' {budget - left:,} parameters")
    steps = []
    for order, n in enumerate(names):
        s = spectra[n].detach().to(torch.float64).cpu()
        vals = (s[min_ranks[n]:max_ranks[n]] * (weights[n] / costs[n])).tolist()
        steps += [(-v, order, i, n) for i, v in enumerate(vals)]
    steps.sort()
    for _, _, _, n in steps:
        if costs[n] <= left:  # within a layer the cost is fixed, so a step that no longer fits means all
            ranks[n] += 1     # its later (smaller) steps do not either: ranks stay prefixes
            left -= costs[n]
    return ranks


def _final_output(model: nn.Module, batch, forward=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the model's last hidden state, or its first output tensor; the batch's attention mask)."""
    if forward is not None:
        return last_hidden_state(forward(model, batch)), None
    out = run_model(model, batch, output_hidden_states=True)
    return last_hidden_state(out), as_model_inputs(batch).get("attention_mask")


class _Replay(nn.Module):
    """Stands in for a transformer block during the sensitivity measurement: returns the output the
    block gave on the current batch in the reference pass (the cut layer sits in a later block, so the
    block's output is the same), and reads other attributes from the block."""

    def __init__(self, block: nn.Module, outputs: list, current: dict):
        super().__init__()
        object.__setattr__(self, "_block", block)
        self._outputs, self._current = outputs, current

    def forward(self, *args, **kwargs):
        return self._outputs[self._current["batch"]]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


def _block_index(blocks: list, name: str) -> int:
    """The index of the block holding layer ``name`` (len(blocks) when it is in none: nothing replays)."""
    for i, b in enumerate(blocks):
        if name.startswith(b + "."):
            return i
    return len(blocks)


@torch.no_grad()
def sensitivity_ranks(model: nn.Module, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]],
                      truncation: Callable[[str, int], tuple[torch.Tensor, Callable[[], nn.Module]]],
                      batches, forward: Optional[Callable] = None, progress: bool = True,
                      reuse_blocks: bool = True) -> dict[str, int]:
    """Spread the parameters of ``ranks`` over the layers by measured sensitivity (module docstring).

    ranks: ``{layer name: rank}``, the uniform ranks whose total sets the budget.
    shapes: ``{layer name: (d_out, d_in)}``.
    truncation: ``truncation(name, rank) -> (spectrum, build)``: the layer's squared whitened singular
        values (non-increasing) and a function building its replacement at ``rank``.
    batches: model inputs (dicts or tensors of input ids) the output error is measured on; the model
        runs once over them per layer, each time with only that layer cut to its rank in ``ranks``.
    forward: ``forward(model, batch)`` instead of ``model(**batch)``.
    reuse_blocks: for a layer in transformer block k, blocks 0..k-1 give the outputs recorded in the
        reference pass instead of running again (the same numbers, bit for bit: their weights are the
        dense ones; about half the model's work per layer).

    Returns the new ranks (the same total parameters or fewer), each between 1 and the layer's
    break-even rank (or its uniform rank, if that is higher). Under ``torch.distributed`` every
    process measures and rank 0's result is used by all.
    """
    from tqdm.auto import tqdm

    missing = [n for n in ranks if n not in shapes]
    if missing:
        raise ValueError(f"shapes lacks layers {missing[:4]}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: the sensitivity measurement needs at least one batch")
    was_training = model.training
    model.eval()
    try:
        blocks = find_blocks(model) if reuse_blocks else []
        recorded = [[] for _ in blocks]  # recorded[j][batch]: block j's output in the reference pass
        hooks = [model.get_submodule(b).register_forward_hook(lambda m, a, o, j=j: recorded[j].append(o))
                 for j, b in enumerate(blocks)]
        try:
            refs = [_final_output(model, b, forward) for b in batches]
        finally:
            for h in hooks:
                h.remove()
        if any(len(r) != len(batches) for r in recorded):  # a block ran other than once per batch: run them all
            blocks, recorded = [], []
        current = {"batch": 0}

        def model_error(first: int) -> float:
            """The relative output error over the batches, blocks before ``first`` replayed."""
            replayed = [(b, model.get_submodule(b)) for b in blocks[:first]]
            for j, (b, m) in enumerate(replayed):
                set_module(model, b, _Replay(m, recorded[j], current))
            try:
                return _error()
            finally:
                for b, m in replayed:
                    set_module(model, b, m)

        def _error() -> float:
            num = den = 0.0
            for i, (b, (ref, mask)) in enumerate(zip(batches, refs)):
                current["batch"] = i
                out, _ = _final_output(model, b, forward)
                err, size = (out.float() - ref.float()).pow(2), ref.float().pow(2)
                if mask is not None and mask.shape == err.shape[:-1]:
                    err, size = err[mask.bool()], size[mask.bool()]
                num, den = num + err.sum().item(), den + size.sum().item()
            return num / max(den, 1e-30)

        spectra, weights, costs, lo, hi = {}, {}, {}, {}, {}
        for name in tqdm(list(ranks), desc="measuring sensitivity", disable=not progress):
            d_out, d_in = shapes[name]
            r0 = ranks[name]
            S2, build = truncation(name, r0)
            tail = S2[r0:].sum().item()
            costs[name], spectra[name] = d_in + d_out, S2
            if tail <= 1e-10 * S2.sum().item():  # exact at its rank already: nothing to trade, keep it
                weights[name], lo[name], hi[name] = 0.0, r0, r0
                continue
            dense = model.get_submodule(name)
            set_module(model, name, build())
            try:
                err = model_error(_block_index(blocks, name))
            finally:
                set_module(model, name, dense)
            weights[name] = err / tail
            lo[name], hi[name] = 1, max(r0, min(d_in, d_out, d_in * d_out // (d_in + d_out)))
    finally:
        model.train(was_training)
    budget = sum(ranks[n] * costs[n] for n in ranks)
    chosen = allocate_ranks(spectra, costs, budget, weights, lo, hi)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # under torchrun every process measures; a rounding difference must not give them different shapes
        box = [chosen]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen = box[0]
    return chosen
