"""Reusing a frozen teacher's targets for texts seen before (``DistillConfig(teacher_cache=True)``)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["TeacherCache"]


class TeacherCache:
    """The frozen teacher's targets for each text seen, to reuse when the same text comes back.

    Keyed per batch row by its unpadded token ids (and token type ids) and where they start, so a
    text gives a hit whatever batch or padding length it comes in. Each entry holds that row's
    unpadded target activations; a batch is served from the cache only when every row hits, else
    the teacher runs and the rows are stored (until ``max_bytes`` are held). Targets computed inside
    different batches can differ from a fresh forward by float rounding only. Batches carrying any
    other model input (``position_ids``, ...) are never cached: the key would not describe them.
    """

    KEYED_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})

    def __init__(self, max_bytes: int):
        if not max_bytes > 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.rows: dict = {}
        self.nbytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def _layout(batch: dict):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        return ids, valid

    def _keys(self, batch: dict) -> list:
        ids, valid = self._layout(batch)
        ids, valid = ids.cpu(), valid.cpu()
        tt = batch.get("token_type_ids")
        tt = None if tt is None else tt.cpu()
        keys = []
        for b in range(ids.shape[0]):
            pos = valid[b].nonzero().flatten()
            start = int(pos[0]) if pos.numel() else 0
            key = (start, ids[b][valid[b]].numpy().tobytes())
            if tt is not None:
                key += (tt[b][valid[b]].numpy().tobytes(),)
            keys.append(key)
        return keys

    def get(self, batch: dict) -> Optional[dict]:
        """The targets of every row (padded like ``batch``), or None if any row is missing."""
        keys = self._keys(batch)
        entries = [self.rows.get(k) for k in keys]
        if any(e is None for e in entries):
            self.misses += 1
            return None
        self.hits += 1
        ids, valid = self._layout(batch)
        out, built = {}, {}
        for name, first in entries[0].items():
            if id(first) not in built:  # names sharing one stored tensor share the padded one too
                full = first.new_zeros((*ids.shape, *first.shape[1:]))
                for b, e in enumerate(entries):
                    full[b][valid[b]] = e[name]
                built[id(first)] = full
            out[name] = built[id(first)]
        return out

    def put(self, batch: dict, targets: dict) -> None:
        if self.nbytes >= self.max_bytes:
            return
        _, valid = self._layout(batch)
        for b, key in enumerate(self._keys(batch)):
            if key in self.rows:
                continue
            entry, by_storage = {}, {}
            for n, t in targets.items():  # one copy for names that share a tensor (last block = output)
                sid = (t.data_ptr(), t.shape, t.stride())
                if sid not in by_storage:
                    by_storage[sid] = t[b][valid[b]].clone()
                    self.nbytes += by_storage[sid].numel() * by_storage[sid].element_size()
                entry[n] = by_storage[sid]
            self.rows[key] = entry
            if self.nbytes >= self.max_bytes:
                return
