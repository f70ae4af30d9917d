"""Pre-tokenized, packed training data for real corpora.

:func:`tokenize_corpus` (``lrkd-fast tokenize``) tokenizes a corpus once into a *token store*, a
folder of three files:

- ``tokens.bin``: every document's token ids one after the other, each document followed by the
  end-of-document token (the tokenizer's EOS, else its SEP), as a flat array of ``uint16`` (vocabulary
  of at most 65,536 ids) or ``uint32``;
- ``documents.bin``: ``int64`` offsets into ``tokens.bin``: 0, then where each document (its EOS
  included) ends, so document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``;
- ``meta.json``: format version, dtype, counts, the tokenizer (name, vocabulary size, EOS id and the
  ids of a fixed probe text, to check a later tokenizer is the same), and every source file with its
  size, documents and tokens. It is written last: a folder without it is not a store.

Why a numpy memmap rather than a Hugging Face ``datasets`` arrow folder: it needs no new dependency
(numpy comes with torch), a training sequence is one slice of the flat array at a computable offset
(O(1) random access, no per-row index, any packing length chosen at training time), and reading
never loads the corpus: the operating system pages in the slices a batch touches, so memory stays
O(batch) whatever the corpus size. Writing streams as well: the inputs are read line by line (text,
JSON lines) or by record batches (parquet), tokenized in batches of at most ``batch_docs`` documents /
``batch_bytes`` bytes and appended to the files, so the writer never holds more than one batch.

:class:`PackedBatches` reads a store packed to ``seq_len``: sequence ``k`` is tokens
``[k * seq_len, (k + 1) * seq_len)`` of the stream (the last one padded), so documents share a row
and a long document runs on into the next row. Each batch carries ``position_ids`` restarting at 0
at every document start (and at every row start: a document cut by a row boundary continues as if
it were a new one), ``labels`` (the inputs, with -100 on padding and on each document's first token,
which is never predicted from the document before) and one of three masks:

- ``mask="4d"`` (default, eager / SDPA attention): ``attention_mask`` of shape (B, 1, L, L), additive
  (0 where a query may attend, the dtype's minimum elsewhere; ``mask_dtype=torch.bool`` gives True /
  False for SDPA-only use): block-diagonal over documents, and causal with ``causal=True``.
  Hugging Face models take it as it is (transformers passes a 4-D ``attention_mask`` through
  unchanged): ``model(**batch)``.
- ``mask="position_ids"``: no ``attention_mask``; the model finds the documents from where
  ``position_ids`` restart. transformers' ``flash_attention_2`` does so (variable-length kernels,
  ``cu_seqlens`` derived from ``position_ids``) when the batch is one row: pass ``flatten=True``.
  transformers 5.x builds the same block-diagonal causal mask from ``position_ids`` for eager / SDPA
  too when the model is called without ``attention_mask`` and without a cache (``use_cache=False``).
  :func:`cu_seqlens` gives the offsets for calling a varlen kernel directly.
- ``mask="2d"``: a plain (B, L) padding mask; documents attend to each other.

Under torchrun each process takes its own rows: global step ``s`` covers ``batch_size *
world_size`` consecutive sequences of the (optionally shuffled) order and rank ``r`` takes the
``r``-th block of ``batch_size``, so no sequence is read twice or skipped within an epoch. The read
position (sequences consumed, in global order) is the reader's :meth:`~PackedBatches.state_dict`;
:class:`~lrkd_fast.training.TrainingLoop` saves it in its checkpoints and restores it on resume,
so a resumed run continues on the next unseen sequence, also with another batch size or number of
processes.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["FORMAT_VERSION", "MASKS", "PackedBatches", "TokenStore", "cu_seqlens", "is_token_store",
           "store_split", "store_texts", "tokenize_corpus", "tokenizer_probe"]

FORMAT = "lrkd_fast.token_store"
FORMAT_VERSION = 1
META, TOKENS, DOCUMENTS = "meta.json", "tokens.bin", "documents.bin"
SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
TXT_DOCS = ("line", "blank")
MASKS = ("4d", "position_ids", "2d")
DEFAULT_SEQ_LEN = 2048  # the paper's packed sequence length
PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 (x + y) * z == 42"


# ------------------------------------------------------------------------------------ reading inputs

def _expand_inputs(inputs) -> list[str]:
    """Files of ``inputs`` (files, folders searched recursively, glob patterns), each folder and
    pattern in sorted order, duplicates dropped."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise ValueError("inputs is empty: give at least one file, folder or glob pattern")
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(item) for f in names
                           if os.path.splitext(f)[1].lower() in SUFFIXES)
            if not found:
                raise FileNotFoundError(f"inputs: folder {item!r} holds no {'/'.join(sorted(SUFFIXES))} file")
        elif os.path.isfile(item):
            found = [item]
        elif glob.has_magic(item):
            found = sorted(f for f in glob.glob(item, recursive=True) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"inputs: pattern {item!r} matches no file")
        else:
            raise FileNotFoundError(f"inputs: {item!r} is not a file, folder or glob pattern that matches")
        for f in found:
            if os.path.splitext(f)[1].lower() not in SUFFIXES:
                raise ValueError(f"inputs: {f!r} is not a supported file ({', '.join(sorted(SUFFIXES))})")
            if f not in files:
                files.append(f)
    return files


def _read_text(path, txt_docs, progress):
    """Documents of a text file: one per non-blank line ("line") or runs of lines between blank
    lines ("blank", the lines joined with a newline). Yields texts; ``progress(n)`` gets bytes read."""
    lines = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            progress(len(raw))
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{i}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                if lines:
                    yield "\n".join(lines)
                    lines = []
                continue
            if txt_docs == "line":
                yield line
            else:
                lines.append(line)
    if lines:
        yield "\n".join(lines)


def _read_jsonl(path, field, progress):
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            progress(len(raw))
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise ValueError(f"{path}:{i}: each JSON line needs a string field {field!r}")
            if rec[field].strip():
                yield rec[field]


def _read_parquet(path, field, progress, batch_rows=1024):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path!r} needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names})")
    size, rows = os.path.getsize(path), max(pf.metadata.num_rows, 1)
    done = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[field]):
        col = batch.column(0)
        for v in col.to_pylist():
            if v is None:
                continue
            if not isinstance(v, str):
                raise ValueError(f"{path}: column {field!r} must hold strings, found {type(v).__name__}")
            if v.strip():
                yield v
        # progress by the share of rows read (parquet is compressed: bytes read are not file offsets)
        now = size * min(done + batch.num_rows, rows) // rows
        progress(now - size * done // rows)
        done += batch.num_rows


def _documents(path, text_field, txt_docs, progress) -> Iterator[str]:
    kind = SUFFIXES[os.path.splitext(path)[1].lower()]
    if kind == "text":
        return _read_text(path, txt_docs, progress)
    if kind == "jsonl":
        return _read_jsonl(path, text_field, progress)
    return _read_parquet(path, text_field, progress)


# ------------------------------------------------------------------------------------ writing

def _eos_id(tok) -> int:
    for name in ("eos_token_id", "sep_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    raise ValueError("tokenizer has neither an EOS nor a SEP token to end documents with; pass eos_id")


def _load_tokenizer(tokenizer):
    if not isinstance(tokenizer, (str, os.PathLike)):
        if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise TypeError(f"tokenizer must be a path, a hub name or a Hugging Face tokenizer, got "
                            f"{type(tokenizer).__name__}")
        return tokenizer
    import transformers

    path = os.fspath(tokenizer)
    if not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") != "0":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: fail fast with a clear message
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"tokenizer: cannot load {path!r}: {exc}") from None


def _encode(tok, texts: list) -> list:
    return tok(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
               verbose=False)["input_ids"]


def tokenizer_probe(tok) -> list[int]:
    """The ids of a fixed text: two tokenizers with equal probes and vocabulary sizes are taken to be the same."""
    return [int(i) for i in _encode(tok, [PROBE])[0]]


def tokenize_corpus(inputs: Union[str, Sequence[str]], tokenizer, out: str, seq_len: Optional[int] = None,
                    text_field: str = "text", txt_docs: str = "line", eos_id: Optional[int] = None,
                    batch_docs: int = 1024, batch_bytes: int = 4 << 20, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Tokenize a corpus once into a token store in ``out`` (see the module docstring); returns its metadata.

    inputs: files, folders (every .txt / .jsonl / .json / .parquet below, in sorted order) or glob
        patterns, read in the order given. ``.txt``: one document per non-blank line
        (``txt_docs="line"``) or documents separated by blank lines (``txt_docs="blank"``); JSON lines
        and parquet: the string field / column ``text_field``. Empty documents are skipped.
    tokenizer: a Hugging Face tokenizer or its folder / offline-cached hub name (a fast tokenizer
        tokenizes each batch in parallel); no special tokens are added, ``eos_id`` (default: the
        tokenizer's EOS, else SEP) follows every document.
    seq_len: the packing length recorded as the store's default (:class:`PackedBatches` may use another);
        default 2048, or the tokenizer's ``model_max_length`` when that is shorter.
    batch_docs, batch_bytes: the most documents / UTF-8 bytes tokenized and written at once (the
        writer's memory bound; a single document is never split).
    overwrite: replace a store already in ``out`` (otherwise an error).
    """
    from tqdm.auto import tqdm

    for name, v, low in (("seq_len", 2 if seq_len is None else seq_len, 2), ("batch_docs", batch_docs, 1),
                         ("batch_bytes", batch_bytes, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if txt_docs not in TXT_DOCS:
        raise ValueError(f"txt_docs must be one of {TXT_DOCS}, got {txt_docs!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"out must be a folder path, got {out!r}")
    out = os.fspath(out)
    files = _expand_inputs(inputs)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"out: {out!r} exists and is not a folder")
    if any(os.path.exists(os.path.join(out, n)) for n in (META, TOKENS, DOCUMENTS)) and not overwrite:
        raise FileExistsError(f"out: {out!r} already holds a token store (pass overwrite=True / --overwrite)")
    tok = _load_tokenizer(tokenizer)
    vocab = len(tok)
    eos = _eos_id(tok) if eos_id is None else eos_id
    if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < vocab:
        raise ValueError(f"eos_id must be a token id in 0..{vocab - 1}, got {eos!r}")
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    max_len = getattr(tok, "model_max_length", None)
    max_len = max_len if isinstance(max_len, int) and 2 <= max_len < 1 << 30 else None
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, max_len or DEFAULT_SEQ_LEN)
    elif max_len is not None and seq_len > max_len:
        import warnings

        warnings.warn(f"seq_len {seq_len} is longer than the tokenizer's model_max_length {max_len}")

    os.makedirs(out, exist_ok=True)
    for n in (META, TOKENS, DOCUMENTS):  # an overwritten store stops being one until its meta.json is back
        if os.path.exists(os.path.join(out, n)):
            os.remove(os.path.join(out, n))
    tmp_tok, tmp_doc = os.path.join(out, TOKENS + ".partial"), os.path.join(out, DOCUMENTS + ".partial")
    sources = [{"path": os.path.abspath(f), "format": SUFFIXES[os.path.splitext(f)[1].lower()],
                "bytes": os.path.getsize(f), "documents": 0, "tokens": 0} for f in files]
    total_bytes = sum(s["bytes"] for s in sources)
    n_tokens = n_docs = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               dynamic_ncols=True)

    def flush(texts, src_of, f_tok, f_doc):
        nonlocal n_tokens, n_docs
        ids = _encode(tok, texts)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids),
                           dtype=np.int64, count=int(lengths.sum()))
        if flat.size and (flat.min() < 0 or flat.max() >= vocab):
            raise ValueError(f"the tokenizer produced ids outside 0..{vocab - 1}")
        f_tok.write(flat.astype(dtype).tobytes())
        f_doc.write((n_tokens + np.cumsum(lengths)).tobytes())
        for s, n in zip(src_of, lengths.tolist()):
            sources[s]["documents"] += 1
            sources[s]["tokens"] += n
        n_tokens += int(lengths.sum())
        n_docs += len(ids)

    try:
        with open(tmp_tok, "wb") as f_tok, open(tmp_doc, "wb") as f_doc:
            f_doc.write(np.zeros(1, dtype=np.int64).tobytes())
            texts, src_of, size = [], [], 0
            for s, path in enumerate(files):
                for text in _documents(path, text_field, txt_docs, bar.update):
                    texts.append(text)
                    src_of.append(s)
                    size += len(text)
                    if len(texts) >= batch_docs or size >= batch_bytes:
                        flush(texts, src_of, f_tok, f_doc)
                        texts, src_of, size = [], [], 0
            if texts:
                flush(texts, src_of, f_tok, f_doc)
        if n_docs == 0:
            raise ValueError(f"inputs hold no text ({len(files)} file(s) read)")
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "tokens": n_tokens,
                "documents": n_docs, "seq_len": seq_len, "eos_id": eos, "eos_appended": True,
                "tokenizer": {"name_or_path": str(getattr(tok, "name_or_path", "")), "class": type(tok).__name__,
                              "vocab_size": vocab, "probe": tokenizer_probe(tok)},
                "txt_docs": txt_docs, "text_field": text_field, "sources": sources}
        os.replace(tmp_tok, os.path.join(out, TOKENS))
        os.replace(tmp_doc, os.path.join(out, DOCUMENTS))
        with open(os.path.join(out, META + ".partial"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(out, META + ".partial"), os.path.join(out, META))
    finally:
        bar.close()
        for p in (tmp_tok, tmp_doc):
            if os.path.exists(p):
                os.remove(p)
    return meta


# ------------------------------------------------------------------------------------ the store

def is_token_store(path) -> bool:
    """Whether ``path`` is a folder written by :func:`tokenize_corpus`."""
    try:
        with open(os.path.join(os.fspath(path), META)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, TypeError, AttributeError):
        return False


class TokenStore:
    """A token store opened read-only: ``tokens`` and ``offsets`` are numpy memmaps (nothing is loaded)."""

    def __init__(self, path: str):
        if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
            raise FileNotFoundError(f"path: {path!r} is not a folder")
        if not is_token_store(path):
            raise ValueError(f"path: {path!r} is not a token store (no {META} written by lrkd-fast tokenize)")
        with open(os.path.join(path, META)) as f:
            self.meta = json.load(f)
        if self.meta["version"] > FORMAT_VERSION:
            raise ValueError(f"path: {path!r} has store format {self.meta['version']}; this lrkd_fast reads up to "
                             f"{FORMAT_VERSION}")
        self.path = os.fspath(path)
        dtype, n, d = np.dtype(self.meta["dtype"]), self.meta["tokens"], self.meta["documents"]
        for name, want in ((TOKENS, n * dtype.itemsize), (DOCUMENTS, (d + 1) * 8)):
            got = os.path.getsize(os.path.join(path, name))
            if got != want:
                raise ValueError(f"path: {name} holds {got} bytes, {META} says {want}: the store is damaged")
        self.tokens = np.memmap(os.path.join(path, TOKENS), dtype=dtype, mode="r", shape=(n,))
        self.offsets = np.memmap(os.path.join(path, DOCUMENTS), dtype=np.int64, mode="r", shape=(d + 1,))

    @property
    def n_tokens(self) -> int:
        return self.meta["tokens"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    @property
    def seq_len(self) -> int:
        return self.meta["seq_len"]

    def __len__(self) -> int:
        """Documents."""
        return self.meta["documents"]

    def document(self, i: int, eos: bool = True) -> np.ndarray:
        """Token ids of document ``i`` (with its trailing EOS unless ``eos=False``)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"i: document {i} out of range for {len(self)} documents")
        i %= len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.tokens[a:b - (0 if eos else 1)], dtype=np.int64)

    def check_tokenizer(self, tok) -> None:
        """Raise ValueError unless ``tok`` tokenizes as the store's tokenizer did (vocabulary size and probe)."""
        want = self.meta["tokenizer"]
        if len(tok) != want["vocab_size"] or tokenizer_probe(tok) != want["probe"]:
            raise ValueError(f"the token store {self.path!r} was made with another tokenizer "
                             f"({want['name_or_path'] or want['class']}, {want['vocab_size']} ids) than "
                             f"{getattr(tok, 'name_or_path', '') or type(tok).__name__} ({len(tok)} ids)")

    def document_batches(self, docs: Sequence[int], batch_size: int, seq_len: int, pad_id: int = 0,
                         device=None) -> list[dict]:
        """Documents ``docs`` one per row (without EOS, cut at ``seq_len``), right-padded:
        ``{"input_ids", "attention_mask"}`` batches for evaluation and calibration."""
        out = []
        for i in range(0, len(docs), batch_size):
            rows = [self.document(j, eos=False)[:seq_len] for j in docs[i:i + batch_size]]
            width = max(max(len(r) for r in rows), 1)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for k, r in enumerate(rows):
                ids[k, :len(r)] = torch.from_numpy(r)
                mask[k, :len(r)] = 1
            out.append({"input_ids": ids.to(device) if device else ids,
                        "attention_mask": mask.to(device) if device else mask})
        return out

    def decode_documents(self, tok, docs: Sequence[int]) -> list[str]:
        """Documents ``docs`` decoded back to text with ``tok`` (without the EOS)."""
        return [tok.decode(self.document(j, eos=False).tolist()) for j in docs]


def store_split(store: TokenStore, heldout: int) -> int:
    """Where the training stream ends when the last ``heldout`` documents are held out (a token offset)."""
    if isinstance(heldout, bool) or not isinstance(heldout, int) or not 0 <= heldout < len(store):
        raise ValueError(f"heldout must be an int in 0..{len(store) - 1}, got {heldout!r}")
    return int(store.offsets[len(store) - heldout])


def store_texts(store: TokenStore, tok, heldout: int, n_train: int) -> tuple[list, list]:
    """(the first ``n_train`` training documents, the last ``heldout`` documents) decoded with ``tok``:
    the texts a recipe evaluates and calibrates on when its data is a token store."""
    end = len(store) - heldout
    store_split(store, heldout)  # checks heldout
    return (store.decode_documents(tok, range(min(max(n_train, 0), end))),
            store.decode_documents(tok, range(end, len(store))))


# ------------------------------------------------------------------------------------ packed reading

def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) of the documents in ``position_ids`` (flattened; a document starts
    where the position is 0), as variable-length attention kernels (``flash_attn_varlen_func``) take them."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        raise TypeError("position_ids must be an integer tensor")
    flat = position_ids.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("position_ids is empty")
    starts = (flat == 0).nonzero().reshape(-1)
    if starts.numel() == 0 or starts[0] != 0:
        raise ValueError("position_ids must start with 0 (the first document's first token)")
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


@dataclass
class _Rows:
    ids: np.ndarray  # (B, L) int64
    seg: np.ndarray  # (B, L) segment id per token, padding a segment of its own
    pos: np.ndarray  # (B, L) position in the segment
    first: np.ndarray  # (B, L) bool: first token of a document that starts inside the row
    real: np.ndarray  # (B, L) bool: not padding


class PackedBatches:
    """Batches of a :class:`TokenStore` packed to ``seq_len`` (see the module docstring), for
    :class:`~lrkd_fast.training.TrainingLoop` (``batch(step)``, ``len``) and for your own loop.

    store: a :class:`TokenStore` or its folder. seq_len: packing length (default: the store's).
    batch_size: rows per step and process. rank, world_size: this process under torchrun.
    shuffle, seed: a fresh permutation of the sequences every epoch (else stream order).
    mask: "4d" | "position_ids" | "2d"; causal: the 4-D mask is causal within each document (False
        for encoders); mask_dtype: the 4-D mask's dtype (a float dtype: additive; torch.bool: True = attend).
    labels: add ``labels`` (inputs with -100 on padding and on every document's first token).
    flatten: one row of ``batch_size * seq_len`` tokens (for ``flash_attention_2``; not with "4d").
    drop_last: leave out the final partial sequence (else it is padded: attention_mask 0 / labels -100).
    token_range: (start, end) read only this span of the token stream (e.g. all but held-out documents).
    device: where the tensors go.
    """

    def __init__(self, store: Union[TokenStore, str], batch_size: int, seq_len: Optional[int] = None, *,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, mask: str = "4d",
                 causal: bool = True, mask_dtype: torch.dtype = torch.float32, labels: bool = True,
                 flatten: bool = False, drop_last: bool = False, token_range: Optional[tuple] = None,
                 pad_id: Optional[int] = None, device=None):
        self.store = store if isinstance(store, TokenStore) else TokenStore(store)
        seq_len = self.store.seq_len if seq_len is None else seq_len
        for name, v, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 2), ("world_size", world_size, 1),
                             ("seed", seed, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank={rank!r}, world_size={world_size}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        if not isinstance(mask_dtype, torch.dtype) or not (mask_dtype == torch.bool or mask_dtype.is_floating_point):
            raise ValueError(f"mask_dtype must be torch.bool or a float dtype, got {mask_dtype!r}")
        if flatten and mask == "4d":
            raise ValueError("flatten=True is for mask='position_ids' or '2d' (one row has no 4-D block mask)")
        n = self.store.n_tokens
        lo, hi = (0, n) if token_range is None else (int(token_range[0]), int(token_range[1]))
        if not 0 <= lo < hi <= n:
            raise ValueError(f"token_range must satisfy 0 <= start < end <= {n}, got {token_range!r}")
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.shuffle, self.seed, self.mask, self.causal, self.mask_dtype = shuffle, seed, mask, causal, mask_dtype
        self.labels, self.flatten, self.device = labels, flatten, device
        self.lo, self.hi = lo, hi
        self.pad_id = self.store.eos_id if pad_id is None else pad_id
        self.n_sequences = (hi - lo) // seq_len if drop_last else -(-(hi - lo) // seq_len)
        if self.n_sequences < 1:
            raise ValueError(f"{hi - lo} tokens make no full sequence of {seq_len} (drop_last=True)")
        self._base_step = self._base_pos = self._next_step = 0
        self._base_global = batch_size * world_size  # global batch of the steps before the anchor
        self._order_epoch, self._order = None, None

    # ---------------------------------------------------------------- positions
    def __len__(self) -> int:
        """Steps per epoch (global batches of batch_size * world_size sequences, the last possibly
        running into the next epoch)."""
        return -(-self.n_sequences // (self.batch_size * self.world_size))

    def _sequence(self, position: int) -> int:
        """The sequence at global read position ``position`` (epochs follow each other)."""
        epoch, i = divmod(position, self.n_sequences)
        if not self.shuffle:
            return i
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch % (1 << 63)])
            self._order = rng.permutation(self.n_sequences).astype(np.uint32 if self.n_sequences < 1 << 32
                                                                   else np.int64)
            self._order_epoch = epoch
        return int(self._order[i])

    def position(self, step: int) -> int:
        """Global read position (sequences consumed by all processes) at the start of ``step``. After
        :meth:`load_state_dict` the steps before the saved one keep the saved run's global batch size."""
        glob = self.batch_size * self.world_size if step >= self._base_step else self._base_global
        return self._base_pos + (step - self._base_step) * glob

    def sequences(self, step: int) -> list[int]:
        """The sequence indices this process reads at ``step``."""
        p = self.position(step) + self.rank * self.batch_size
        return [self._sequence(p + j) for j in range(self.batch_size)]

    # ---------------------------------------------------------------- rows
    def _rows(self, seqs: list[int]) -> _Rows:
        B, L = len(seqs), self.seq_len
        ids = np.full((B, L), self.pad_id, dtype=np.int64)
        seg = np.zeros((B, L), dtype=np.int64)
        first = np.zeros((B, L), dtype=bool)
        real = np.zeros((B, L), dtype=bool)
        pos = np.zeros((B, L), dtype=np.int64)
        offsets = self.store.offsets
        for r, k in enumerate(seqs):
            a = self.lo + k * L
            b = min(a + L, self.hi)
            n = b - a
            ids[r, :n] = self.store.tokens[a:b]
            real[r, :n] = True
            i, j = np.searchsorted(offsets, a, side="right"), np.searchsorted(offsets, b, side="left")
            starts = np.asarray(offsets[i:j], dtype=np.int64) - a  # documents starting inside the row
            first[r, starts] = True
            marks = np.zeros(L, dtype=np.int64)
            marks[starts] = 1
            marks[n:n + 1] = 1 if n < L else 0  # padding is a segment of its own
            seg[r] = np.cumsum(marks)
            seg_start = np.concatenate([[0], starts, [n]])
            pos[r] = np.arange(L) - seg_start[seg[r]]
        return _Rows(ids, seg, pos, first, real)

    def encode(self, seqs: list[int]) -> dict:
        """The batch of sequences ``seqs`` (indices into this reader's sequences)."""
        if any(not 0 <= k < self.n_sequences for k in seqs):
            raise IndexError(f"seqs: sequence indices must be in 0..{self.n_sequences - 1}")
        rows = self._rows(seqs)
        t = lambda a: torch.from_numpy(a)  # noqa: E731
        out = {"input_ids": t(rows.ids), "position_ids": t(rows.pos)}
        if self.labels:
            lab = rows.ids.copy()
            lab[rows.first | ~rows.real] = -100
            out["labels"] = t(lab)
        if self.mask == "2d":
            out["attention_mask"] = t(rows.real.astype(np.int64))
        elif self.mask == "4d":
            seg = t(rows.seg)
            allowed = seg[:, :, None] == seg[:, None, :]
            if self.causal:
                allowed &= torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril()
            allowed = allowed[:, None]
            if self.mask_dtype == torch.bool:
                out["attention_mask"] = allowed
            else:
                m = torch.zeros(allowed.shape, dtype=self.mask_dtype)
                out["attention_mask"] = m.masked_fill_(~allowed, torch.finfo(self.mask_dtype).min)
        if self.flatten:
            out = {k: v.reshape(1, -1) for k, v in out.items()}
        if self.device is not None:
            out = {k: v.to(self.device) for k, v in out.items()}
        return out

    def batch(self, step: int) -> dict:
        """This process's batch of global step ``step``; the read position after it is what
        :meth:`state_dict` reports."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        self._next_step = step + 1
        return self.encode(self.sequences(step))

    def __iter__(self) -> Iterator[dict]:
        """One epoch of this process's batches from the current position."""
        start = self._next_step
        for s in range(start, start + len(self)):
            yield self.batch(s)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The read position after the last batch served, as (step, position) with the global batch
        size (sequences per step, all processes): the same on every process. A checkpoint written
        after another step stays right: positions are linear in the step."""
        return {"format": FORMAT_VERSION, "step": self._next_step, "position": self.position(self._next_step),
                "global_batch": self.batch_size * self.world_size,
                "n_sequences": self.n_sequences, "seq_len": self.seq_len, "shuffle": self.shuffle,
                "seed": self.seed, "token_range": [self.lo, self.hi], "tokens": self.store.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (of a reader over the same store, packing and order; the batch
        size and number of processes may differ): ``batch(state["step"])`` reads the next unseen sequences."""
        if not isinstance(state, dict) or "position" not in state or "step" not in state:
            raise ValueError("state must be a dict from PackedBatches.state_dict()")
        for key in ("tokens", "token_range", "seq_len", "n_sequences", "shuffle", "seed"):
            mine = self.state_dict()[key]
            if key in state and list(np.atleast_1d(state[key])) != list(np.atleast_1d(mine)):
                raise ValueError(f"state: saved {key}={state[key]!r} differs from this reader's {mine!r}: "
                                 "the saved position would point at other tokens")
        self._base_step, self._base_pos, self._next_step = int(state["step"]), int(state["position"]), int(state["step"])
        self._base_global = int(state.get("global_batch", self.batch_size * self.world_size))
