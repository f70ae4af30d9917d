"""``LowRankConfig(sequential=True)``: the whitened init fitted block by block to the inputs the
partly swapped model gives each layer (see :class:`lrkd_fast.swap.LowRankConfig`)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..model_utils import ModuleNotReached, StopForward, capture_inputs, find_blocks, run_model, set_module, token_rows
from .config import LayerReport, LowRankConfig, dense_weight
from .init import as_batches, factors_at, make_lowrank, whitened_svd

__all__ = ["outside_blocks", "sequential_swap"]


class _BlockCall:
    """The arguments one block got in one calibration batch, apart from its hidden states (masks, positions)."""

    def __init__(self, args, kwargs):
        kwargs = dict(kwargs)
        self.hidden = args[0] if args else kwargs.pop("hidden_states")
        self.args, self.kwargs = args[1:], kwargs

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _block_calls(model: nn.Module, block_names: list[str], batches, forward=None) -> list[list[_BlockCall]]:
    """Per block in ``block_names`` (in call order), its :class:`_BlockCall` for every batch; the pass
    stops at the last of them. Hidden states are kept for the first block only: the others' follow
    from replaying it."""
    calls = [[] for _ in block_names]

    def record(i):
        def fn(module, args, kwargs):
            call = _BlockCall(args, kwargs)
            if i > 0:
                call.hidden = None
            calls[i].append(call)
            if i == len(block_names) - 1:
                raise StopForward
        return fn

    hooks = [model.get_submodule(b).register_forward_pre_hook(record(i), with_kwargs=True)
             for i, b in enumerate(block_names)]
    try:
        for batch in batches:
            run_model(model, batch, forward)
    finally:
        for h in hooks:
            h.remove()
    if any(len(c) != len(batches) for c in calls):
        raise RuntimeError("sequential=True needs every block to run exactly once per calibration batch")
    return calls


def _input_at(block: nn.Module, layer: str, call: _BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    """What ``block``'s sub-layer ``layer`` receives when the block runs on ``hidden`` (the rest is skipped)."""
    try:
        args, _ = capture_inputs(block.get_submodule(layer), lambda: call.run(block, hidden))
    except ModuleNotReached:
        raise RuntimeError(f"layer {layer!r} did not run when its block did: cannot fit it sequentially") from None
    return args[0]


def _stages(block: nn.Module, names: list[str], call: _BlockCall, hidden: torch.Tensor) -> list[list[str]]:
    """``names`` (relative to ``block``) in the order the block calls them, consecutive layers that read
    the very same input tensor grouped (query/key/value, gate/up)."""
    seen = []
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda module, args, n=n: seen.append((n, args[0])))
             for n in names]
    try:
        call.run(block, hidden)
    finally:
        for h in hooks:
            h.remove()
    stages, done = [], set()
    for n, x in seen:
        if n in done:
            continue
        done.add(n)
        if stages and stages[-1][1] is x:
            stages[-1][0].append(n)
        else:
            stages.append(([n], x))
    missing = [n for n in names if n not in done]
    if missing:
        raise RuntimeError(f"layers {missing} never ran when their block did: cannot fit them sequentially")
    return [group for group, _ in stages]


def outside_blocks(model: nn.Module, layers) -> list[str]:
    """The names in ``layers`` that are not inside one of the model's transformer blocks."""
    prefixes = tuple(b + "." for b in find_blocks(model))
    return [n for n in layers if not (prefixes and n.startswith(prefixes))]


@torch.no_grad()
def sequential_swap(model: nn.Module, layers: dict[str, nn.Module], ranks: dict[str, int],
                    grams: dict[str, torch.Tensor], config: LowRankConfig, calibration, forward=None,
                    progress: bool = True) -> dict[str, LayerReport]:
    """Swap the layers inside the blocks block by block and, within a block, in call order, each fitted
    (:func:`whitened_svd` with ``cross``) to the dense layer's output on the dense model's inputs from
    the inputs the partly swapped model now gives it. Layers outside the blocks get the plain
    whitened init (from ``grams``) first. Returns the reports by layer name."""
    from tqdm.auto import tqdm

    blocks = find_blocks(model)
    inside = {b: [n for n in layers if n.startswith(b + ".")] for b in blocks}
    outside = outside_blocks(model, layers)
    if len(outside) == len(layers):
        raise ValueError(f"sequential=True fits the layers inside the transformer blocks, but none of the "
                         f"selected layers of {type(model).__name__} is inside one (blocks: {blocks[:3]})")
    last = max(i for i, b in enumerate(blocks) if inside[b])
    batches = list(as_batches(calibration))
    masks = [b.get("attention_mask") if isinstance(b, dict) else None for b in batches]
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    was_training = model.training
    model.eval()
    if use_cache:
        model_config.use_cache = False  # a replayed block must not append to a key/value cache
    try:
        # every block's arguments as the dense model calls it (they may differ per block, e.g. the
        # masks of sliding-window layers)
        calls = _block_calls(model, blocks[:last + 1], batches, forward)
        reports = {}
        for name in outside:
            new, reports[name] = make_lowrank(name, layers[name], ranks[name], config, grams[name])
            set_module(model, name, new)
        dense_h = [c.hidden for c in calls[0]]
        swapped_h = dense_h
        if outside:  # the swapped layers outside the blocks may already change the first block's input
            swapped_h = [c.hidden for c in _block_calls(model, blocks[:1], batches, forward)[0]]

        for i in tqdm(range(last + 1), desc="sequential whitened init", disable=not progress):
            block_name, block = blocks[i], model.get_submodule(blocks[i])
            names = inside[block_name]
            dense = copy.deepcopy(block) if names else block
            stages = _stages(block, [n[len(block_name) + 1:] for n in names], calls[i][0], swapped_h[0]) if names else []
            for stage in stages:
                gram = cross = 0.0
                count = 0
                for call, hd, hs, mask in zip(calls[i], dense_h, swapped_h, masks):
                    xd = token_rows(_input_at(dense, stage[0], call, hd), mask)
                    xs = token_rows(_input_at(block, stage[0], call, hs), mask)
                    gram = gram + (xs.t() @ xs).double()
                    cross = cross + (xs.t() @ xd).double()
                    count += xs.shape[0]
                if count == 0:
                    raise ValueError(f"calibration data never reached block {block_name!r} (no unmasked inputs)")
                for n in stage:
                    full = f"{block_name}.{n}"
                    w, _, _ = dense_weight(layers[full])
                    factors = factors_at(whitened_svd(w, gram / count, config.damping, cross / count, name=full),
                                        ranks[full])
                    new, reports[full] = make_lowrank(full, layers[full], ranks[full], config, None, factors=factors)
                    set_module(model, full, new)
            if i < last:
                dense_h = [c.run(dense, h) for c, h in zip(calls[i], dense_h)]
                swapped_h = [c.run(block, h) for c, h in zip(calls[i], swapped_h)]
            del dense
    finally:
        if use_cache:
            model_config.use_cache = use_cache
        model.train(was_training)
    return reports
