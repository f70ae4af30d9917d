"""The token store and the packed reader (lrkd_fast.packed), ``lrkd-fast tokenize``, and packed data
through the training loop and the LRC recipe.

References: the tokenizer run on each document alone (+ EOS) for the store; a word-level corpus in
which every word is a distinct token id for "no token lost or duplicated"; each document run alone
through a tiny Llama / BERT for the cross-document masks; transformers' own varlen helper for
``cu_seqlens``."""
import json
import os
import random
import sys
import tracemalloc

import numpy as np
import pytest
import torch
import transformers as T

from lrkd_fast.packed import (PackedBatches, TokenStore, cu_seqlens, is_token_store, tokenize_corpus,
                              tokenizer_probe)
from lrkd_fast.training import TrainConfig, TrainingLoop

EOS = 1  # the word tokenizer's </s>


def word_tokenizer(n_words: int):
    """A fast word-level tokenizer: "<unk>" 0, "</s>" 1, "w0".."w{n-1}" 2.. (offline, no files needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": EOS, **{f"w{i}": i + 2 for i in range(n_words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def unique_docs(lengths):
    """Documents of distinct words: word j appears once in the whole corpus (token id j + 2)."""
    docs, j = [], 0
    for n in lengths:
        docs.append(" ".join(f"w{k}" for k in range(j, j + n)))
        j += n
    return docs, j


@pytest.fixture(scope="module")
def minilm_tok():
    from lrkd_fast.data import packaged_minilm_path

    return T.AutoTokenizer.from_pretrained(packaged_minilm_path())


@pytest.fixture(scope="module")
def texts():
    from lrkd_fast.data import pydoc_sentences

    return pydoc_sentences()[:120]


def expected_stream(tok, docs, eos):
    out = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [eos]
    return out


def write_inputs(kind, path, docs):
    if kind == "txt":
        path.write_text("\n".join(docs) + "\n\n   \n", encoding="utf-8")  # blank lines are not documents
    elif kind == "jsonl":
        recs = [{"text": d, "id": i} for i, d in enumerate(docs)] + [{"text": ""}]
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs + [None, ""], "n": list(range(len(docs) + 2))}), str(path),
                       row_group_size=17)
    return str(path)


# ------------------------------------------------------------------------------------ the store

@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_store_round_trip_every_format(kind, tmp_path, minilm_tok, texts):
    src = write_inputs(kind, tmp_path / f"corpus.{kind}", texts)
    meta = tokenize_corpus(src, minilm_tok, str(tmp_path / "store"), seq_len=64, batch_docs=25, progress=False)
    store = TokenStore(str(tmp_path / "store"))
    want = expected_stream(minilm_tok, texts, minilm_tok.sep_token_id)  # BERT: no EOS, SEP ends documents
    assert store.tokens.dtype == np.uint16 and isinstance(store.tokens, np.memmap)
    assert store.tokens.tolist() == want
    assert len(store) == meta["documents"] == len(texts) and meta["tokens"] == len(want)
    for i in (0, 57, len(texts) - 1):
        assert store.document(i, eos=False).tolist() == minilm_tok(texts[i], add_special_tokens=False)["input_ids"]
    assert meta["eos_id"] == minilm_tok.sep_token_id and meta["tokenizer"]["vocab_size"] == len(minilm_tok)
    assert meta["sources"] == [{"path": os.path.abspath(src), "format": {"txt": "text"}.get(kind, kind),
                                "bytes": os.path.getsize(src), "documents": len(texts), "tokens": len(want)}]
    store.check_tokenizer(minilm_tok)
    with pytest.raises(ValueError, match="another tokenizer"):
        store.check_tokenizer(word_tokenizer(10))


def test_folders_globs_and_blank_line_documents(tmp_path, minilm_tok, texts):
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    write_inputs("jsonl", d / "b" / "2.jsonl", texts[40:60])
    write_inputs("txt", d / "1.txt", texts[:40])
    (d / "notes.md").write_text("not read")
    (tmp_path / "x.txt").write_text("\n\n".join(["\n".join(texts[60:63]), texts[63]]) + "\n", encoding="utf-8")
    meta = tokenize_corpus([str(d), str(tmp_path / "x.*")], minilm_tok, str(tmp_path / "s"), txt_docs="blank",
                           progress=False)
    # the folder in sorted order (1.txt, b/2.jsonl), then the pattern's match; blank lines separate .txt documents
    docs = ["\n".join(texts[:40])] + texts[40:60] + ["\n".join(texts[60:63]), texts[63]]
    assert TokenStore(str(tmp_path / "s")).tokens.tolist() == expected_stream(minilm_tok, docs, minilm_tok.sep_token_id)
    assert [os.path.basename(s["path"]) for s in meta["sources"]] == ["1.txt", "2.jsonl", "x.txt"]
    assert meta["seq_len"] == min(2048, minilm_tok.model_max_length)


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    tok = word_tokenizer(70_000)
    docs = ["w69999 w3 w65534", "w65535 w70 w0"]
    write_inputs("txt", tmp_path / "c.txt", docs)
    tokenize_corpus(str(tmp_path / "c.txt"), tok, str(tmp_path / "s"), seq_len=8, progress=False)
    store = TokenStore(str(tmp_path / "s"))
    assert store.tokens.dtype == np.uint32
    assert store.tokens.tolist() == [70001, 5, 65536, EOS, 65537, 72, 2, EOS]


def test_writer_memory_is_one_batch_not_the_corpus(tmp_path, minilm_tok, texts):
    """Peak Python allocation while tokenizing does not grow with the corpus: 3x the text, same peak,
    both far below the corpus size."""
    rng = random.Random(0)
    peaks, sizes = [], []
    for n_lines in (2000, 6000):
        path = tmp_path / f"c{n_lines}.txt"
        path.write_text("\n".join(" ".join(rng.sample(texts, 2)) for _ in range(n_lines)) + "\n", encoding="utf-8")
        sizes.append(os.path.getsize(path))
        tracemalloc.start()
        meta = tokenize_corpus(str(path), minilm_tok, str(tmp_path / f"s{n_lines}"), batch_bytes=16 << 10,
                               progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert meta["documents"] == n_lines
    assert sizes[1] > 1_500_000
    assert peaks[1] < sizes[1] / 5, (peaks, sizes)
    assert peaks[1] < 1.5 * peaks[0], (peaks, sizes)


def test_store_errors_name_the_problem(tmp_path, minilm_tok, monkeypatch):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        tokenize_corpus(str(tmp_path / "bad.jsonl"), minilm_tok, str(tmp_path / "s"), progress=False)
    assert not is_token_store(tmp_path / "s") and not os.listdir(tmp_path / "s")  # nothing half-written
    (tmp_path / "a.txt").write_text("some text\n")
    tokenize_corpus(str(tmp_path / "a.txt"), minilm_tok, str(tmp_path / "s"), progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        tokenize_corpus(str(tmp_path / "a.txt"), minilm_tok, str(tmp_path / "s"), progress=False)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no text"):
        tokenize_corpus(str(tmp_path / "empty.txt"), minilm_tok, str(tmp_path / "e"), progress=False)
    with pytest.raises(FileNotFoundError, match="inputs"):
        tokenize_corpus(str(tmp_path / "missing*.txt"), minilm_tok, str(tmp_path / "m"), progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        tokenize_corpus(str(tmp_path / "a.txt"), minilm_tok, str(tmp_path / "m"), seq_len=1, progress=False)
    write_inputs("parquet", tmp_path / "p.parquet", ["a b"])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as when pyarrow is not installed
    with pytest.raises(ImportError, match="pip install pyarrow"):
        tokenize_corpus(str(tmp_path / "p.parquet"), minilm_tok, str(tmp_path / "p"), progress=False)
    with pytest.raises(ValueError, match="not a token store"):
        TokenStore(str(tmp_path))


# ------------------------------------------------------------------------------------ the reader

@pytest.fixture
def unique_store(tmp_path):
    """A store of 13 documents of distinct words: 187 tokens = 24 sequences of 8 (the last one short)."""
    lengths = [3, 11, 1, 25, 7, 4, 30, 2, 19, 9, 40, 13, 10]
    docs, n_words = unique_docs(lengths)
    write_inputs("txt", tmp_path / "c.txt", docs)
    tokenize_corpus(str(tmp_path / "c.txt"), word_tokenizer(n_words), str(tmp_path / "s"), seq_len=8, progress=False)
    store = TokenStore(str(tmp_path / "s"))
    assert store.n_tokens == sum(lengths) + len(lengths) == 187
    return store, n_words


def read_words(batches):
    """Word ids (token id - 2) of every real, non-EOS token of the batches, in order."""
    out = []
    for b in batches:
        ids, lab = b["input_ids"].reshape(-1), b["labels"].reshape(-1)
        real = (lab != -100) | (b["position_ids"].reshape(-1) == 0)  # labels mark padding -100; doc starts too
        out += [int(i) - 2 for i, r in zip(ids, real) if r and int(i) != EOS]
    return out


def test_rows_positions_and_labels(unique_store):
    store, _ = unique_store
    r = PackedBatches(store, batch_size=24, shuffle=False, mask="2d")
    assert r.n_sequences == 24 and len(r) == 1
    b = r.batch(0)
    flat = b["input_ids"].reshape(-1)
    assert flat[:187].tolist() == store.tokens.tolist() and (flat[187:] == store.eos_id).all()
    assert b["attention_mask"].reshape(-1).tolist() == [1] * 187 + [0] * 5
    # reference positions: restart at every document start and at every row start
    starts = set(store.offsets[:-1].tolist())
    pos, lab = b["position_ids"].reshape(-1).tolist(), b["labels"].reshape(-1).tolist()
    p = 0
    for t in range(187):
        p = 0 if (t in starts or t % 8 == 0) else p + 1
        assert pos[t] == p, t
        assert lab[t] == (-100 if (t in starts and t % 8) else int(flat[t])), t
    assert lab[187:] == [-100] * 5
    assert len(PackedBatches(store, 4, drop_last=True)) == 6 and PackedBatches(store, 4, drop_last=True).n_sequences == 23


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_every_token_once(unique_store, world):
    store, n_words = unique_store
    readers = [PackedBatches(store, batch_size=2, rank=r, world_size=world, shuffle=True, seed=3) for r in range(world)]
    steps = 24 // (2 * world)
    seen = [[r.batch(s) for s in range(steps)] for r in readers]
    words = sum((read_words(b) for b in seen), [])
    assert sorted(words) == list(range(n_words))  # none lost, none twice
    assert read_words(seen[0]) != sorted(read_words(seen[0]))  # and shuffled


def test_resume_continues_on_the_next_unseen_sequence(unique_store):
    """3 steps on 2 processes, the position saved, then 2 steps on 3 processes: the epoch exactly once."""
    store, n_words = unique_store
    first = [PackedBatches(store, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    words = sum((read_words([r.batch(s) for s in range(3)]) for r in first), [])
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["position"] == 12 and state["step"] == 3
    state = json.loads(json.dumps(state))  # plain data (checkpoints read with weights_only)
    second = [PackedBatches(store, 2, rank=r, world_size=3, seed=5) for r in range(3)]
    for r in second:
        r.load_state_dict(state)
    words += sum((read_words([r.batch(s) for s in (3, 4)]) for r in second), [])
    assert sorted(words) == list(range(n_words))
    # a checkpoint written before the last batch was trained (an interrupt) maps back to the old layout
    assert second[0].position(2) == 8 and second[0].position(3) == 12 and second[0].position(4) == 18
    with pytest.raises(ValueError, match="seq_len"):
        PackedBatches(store, 2, seq_len=16, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PackedBatches(store, 2, seed=6).load_state_dict(state)


def test_reader_rejects_bad_arguments(unique_store):
    store, _ = unique_store
    for kw, what in [(dict(batch_size=0), "batch_size"), (dict(batch_size=2, rank=2, world_size=2), "rank"),
                     (dict(batch_size=2, mask="3d"), "mask"), (dict(batch_size=2, flatten=True), "flatten"),
                     (dict(batch_size=2, token_range=(5, 500)), "token_range"),
                     (dict(batch_size=2, mask_dtype=torch.int64), "mask_dtype")]:
        with pytest.raises(ValueError, match=what):
            PackedBatches(store, **kw)


# ------------------------------------------------------------------------------------ masks

def segments(store, seq_len, seqs):
    """(row, start, end) of every document piece in the rows of sequences ``seqs``, from the store's
    document offsets (padding excluded)."""
    offsets, out = store.offsets.tolist(), []
    for row, k in enumerate(seqs):
        a, b = k * seq_len, min((k + 1) * seq_len, store.n_tokens)
        cuts = [a] + [o for o in offsets if a < o < b] + [b]
        out += [(row, x - a, y - a) for x, y in zip(cuts, cuts[1:])]
    return out


@pytest.fixture(scope="module")
def packed_batch(tmp_path_factory, minilm_tok, texts):
    """Two rows of 48 MiniLM tokens from short documents, one cut across the rows, the last row padded."""
    d = tmp_path_factory.mktemp("masks")
    docs = [texts[i][:60] for i in (0, 3, 5, 8, 13, 21)]
    write_inputs("txt", d / "c.txt", docs)
    tokenize_corpus(str(d / "c.txt"), minilm_tok, str(d / "s"), seq_len=48, progress=False)
    store = TokenStore(str(d / "s"))
    assert 48 < store.n_tokens < 96
    return store


def reference(model, batch, seg, key):
    with torch.no_grad():
        return [model(input_ids=batch["input_ids"][r:r + 1, a:b]).__getitem__(key)[0] for r, a, b in seg]


def tiny_llama(impl):
    cfg = T.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    return T.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_block_mask_gives_each_document_alone_causal(packed_batch, impl):
    model = tiny_llama(impl)
    r = PackedBatches(packed_batch, batch_size=2, shuffle=False)
    batch = r.batch(0)
    assert batch["attention_mask"].shape == (2, 1, 48, 48)
    seg = segments(packed_batch, 48, [0, 1])
    assert len(seg) >= 6 and any(a == 0 and r_ == 1 for r_, a, _ in seg)  # a document continued in row 1
    ref = reference(model, batch, seg, "logits")
    with torch.no_grad():
        packed = model(**batch).logits
        plain = model(input_ids=batch["input_ids"]).logits  # documents attending to each other
        by_pos = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    for (row, a, b), want in zip(seg, ref):
        torch.testing.assert_close(packed[row, a:b], want, rtol=0, atol=1e-5)
        # transformers 5.x: position_ids alone (no mask, no cache) give the same block-diagonal attention
        torch.testing.assert_close(by_pos[row, a:b], want, rtol=0, atol=1e-5)
    assert max((plain[row, a:b] - w).abs().max().item() for (row, a, b), w in zip(seg, ref)) > 1e-3
    # labels are usable as they are: the model's loss equals the per-document losses pooled
    with torch.no_grad():
        loss = model(**batch).loss
    num = den = 0
    for (row, a, b), want in zip(seg, ref):
        tgt = batch["labels"][row, a + 1:b]
        keep = tgt != -100
        num += torch.nn.functional.cross_entropy(want[:-1][keep], tgt[keep], reduction="sum")
        den += int(keep.sum())
    torch.testing.assert_close(loss, num / den, rtol=1e-5, atol=1e-6)


def test_block_mask_gives_each_document_alone_bidirectional(packed_batch):
    model = T.BertModel(T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)).eval()
    r = PackedBatches(packed_batch, batch_size=2, shuffle=False, causal=False, labels=False)
    batch = r.batch(0)
    seg = segments(packed_batch, 48, [0, 1])
    ref = reference(model, batch, seg, "last_hidden_state")
    bool_mask = PackedBatches(packed_batch, 2, shuffle=False, causal=False, labels=False, mask_dtype=torch.bool)
    with torch.no_grad():
        packed = model(**batch).last_hidden_state
        packed_bool = T.BertModel(model.config).eval()  # sdpa takes a boolean mask as well
        packed_bool.load_state_dict(model.state_dict())
        packed_bool = packed_bool(**bool_mask.batch(0)).last_hidden_state
    for (row, a, b), want in zip(seg, ref):
        torch.testing.assert_close(packed[row, a:b], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(packed_bool[row, a:b], want, rtol=0, atol=1e-5)


def test_flattened_batch_and_cu_seqlens(packed_batch):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    r = PackedBatches(packed_batch, batch_size=2, shuffle=False, mask="position_ids", flatten=True)
    b = r.batch(0)
    assert "attention_mask" not in b and b["input_ids"].shape == b["position_ids"].shape == (1, 96)
    cu, longest = cu_seqlens(b["position_ids"])
    (want, _), (want_max, _) = prepare_fa_kwargs_from_position_ids(b["position_ids"])
    assert cu.tolist() == want.tolist() and longest == int(want_max)
    assert cu[0] == 0 and cu[-1] == 96 and (cu.diff() > 0).all()
    with pytest.raises(ValueError, match="start with 0"):
        cu_seqlens(torch.tensor([[1, 2, 0]]))


# ------------------------------------------------------------------------------------ training loop

class LMLoop(TrainingLoop):
    """The shared loop on a Hugging Face causal LM's own loss (a packed batch goes in as it is)."""

    def __init__(self, model, cfg):
        self.model, self.cfg, self.params, self.seen = model, cfg, list(model.parameters()), []

    def compute_loss(self, batch):
        self.seen.append(batch["input_ids"].clone())
        loss = self.model(**batch).loss
        return loss, {"loss": loss.item()}


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))


def test_training_loop_checkpoints_the_read_position(unique_store, tmp_path):
    store, _ = unique_store
    cfg = dict(steps=4, lr=1e-3, progress=False, checkpoint_every=2)
    full = LMLoop(tiny_lm(), TrainConfig(checkpoint_dir=str(tmp_path / "a"), **cfg))
    h_full = full.train(PackedBatches(store, 2, seed=1))
    state = torch.load(tmp_path / "a" / "step-2.pt", weights_only=True)
    assert state["data"]["position"] == 4 and state["data"]["step"] == 2
    # resumed with the same layout: exactly the uninterrupted run
    again = LMLoop(tiny_lm(), TrainConfig(checkpoint_dir=str(tmp_path / "b"), **cfg))
    h = again.train(PackedBatches(store, 2, seed=1), resume_from=str(tmp_path / "a" / "step-2.pt"))
    assert all(torch.equal(a, b) for a, b in zip(again.seen, full.seen[2:]))
    assert h["loss"] == h_full["loss"]
    assert h_full["tokens"] == 4 * 2 * 8
    # resumed with twice the batch: the position, not the step, says where to go on
    wide = LMLoop(tiny_lm(), TrainConfig(checkpoint_dir=str(tmp_path / "c"), **{**cfg, "steps": 3}))
    wide.train(PackedBatches(store, 4, seed=1), resume_from=str(tmp_path / "a" / "step-2.pt"))
    assert torch.equal(wide.seen[0], torch.cat(full.seen[2:4]))
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=True)["data"]["position"] == 8


# ------------------------------------------------------------------------------------ command line

def test_cli_tokenize_end_to_end(tmp_path, capsys):
    from lrkd_fast.cli import main

    docs, n = unique_docs([5, 9, 2, 14])
    tok = word_tokenizer(n)
    tok.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "in").mkdir()
    write_inputs("jsonl", tmp_path / "in" / "b.jsonl", docs[2:])
    write_inputs("txt", tmp_path / "in" / "a.txt", docs[:2])
    argv = ["tokenize", str(tmp_path / "in"), "--tokenizer", str(tmp_path / "tok"), "--seq-len", "16",
            "--out", str(tmp_path / "store"), "--quiet"]
    assert main(argv) == 0
    assert "4 documents from 2 file(s), 34 tokens (uint16" in capsys.readouterr().out
    store = TokenStore(str(tmp_path / "store"))
    assert store.tokens.tolist() == expected_stream(tok, docs, EOS) and store.seq_len == 16
    assert store.meta["tokenizer"]["probe"] == tokenizer_probe(T.AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    assert main(argv) == 2
    assert "argument --out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ Low-Rank Clone

@pytest.mark.parametrize("family", ["llama", "bert"])
def test_clone_on_a_packed_row_equals_the_documents_alone(family, eager_backend):
    """The clone terms are means over tokens: one packed row of two documents (block mask, position
    ids) gives what the two documents give as two rows of their own."""
    from tests.conftest import tiny

    from lrkd_fast import LowRankClone

    teacher = tiny(family).eval()
    clone = LowRankClone.from_teacher(teacher, student_hidden_size=16, init="random")
    a, b = torch.randint(0, 96, (9,)), torch.randint(0, 96, (9,))
    seg = torch.tensor([0] * 9 + [1] * 9)
    allowed = seg[:, None] == seg[None, :]
    if family == "llama":
        allowed &= torch.ones(18, 18, dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, 18, 18).masked_fill(~allowed, torch.finfo(torch.float32).min)
    pos = torch.cat([torch.arange(9), torch.arange(9)])[None]
    try:
        with torch.no_grad():
            packed = clone(torch.cat([a, b])[None], attention_mask=mask, position_ids=pos).parts
            alone = clone(torch.stack([a, b]), attention_mask=torch.ones(2, 9, dtype=torch.long)).parts
            mixed = clone(torch.cat([a, b])[None], attention_mask=torch.ones(1, 18, dtype=torch.long)).parts
    finally:
        clone.close()
    terms = [k for k in packed if k.startswith("clone")]
    assert len(terms) > 4
    for k in terms:
        assert packed[k] == pytest.approx(alone[k], rel=1e-5, abs=1e-9), k
    # documents attending to each other: some term moves far beyond that tolerance
    assert max(abs(mixed[k] - alone[k]) / alone[k] for k in terms if alone[k] > 1e-6) > 1e-3


@pytest.fixture
def minilm_store(tmp_path, small_text_file, minilm_tok):
    tokenize_corpus(small_text_file, minilm_tok, str(tmp_path / "store"), seq_len=32, progress=False)
    return str(tmp_path / "store")


def test_lrc_recipe_trains_on_a_token_store_and_resumes_its_position(tmp_path, minilm_store, tiny_teacher_dir,
                                                                     eager_backend):
    from lrkd_fast.packed import store_split
    from lrkd_fast.recipes import LRCRecipe, run_lrc_recipe

    common = dict(teacher=tiny_teacher_dir, data=minilm_store, batch_size=2, seq_len=32, student_hidden=16,
                  calib_texts=8, fit_texts=8, heldout=8, progress=False, checkpoint_every=1, keep_checkpoints=True)
    res = run_lrc_recipe(LRCRecipe(steps=2, output=str(tmp_path / "a"), **common))
    assert len(res.history["step"]) == 2 and res.history["tokens"] == 2 * 2 * 32
    assert res.rows[0].fidelity.n == 8
    first = torch.load(tmp_path / "a" / "checkpoints" / "step-1.pt", weights_only=True)["data"]
    last = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["data"]
    store = TokenStore(minilm_store)
    assert first["position"] == 2 and last["position"] == 4
    assert last["token_range"] == [0, store_split(store, 8)]  # the held-out documents are never trained on
    # lrkd-fast eval compares on the same held-out documents (decoded with the teacher's tokenizer)
    from lrkd_fast.recipes import evaluate_student

    report = evaluate_student(str(tmp_path / "a"), max_texts=None, batch_size=8, speed_batches=1, repeats=1,
                              diagnostics_texts=0)
    assert report.texts.startswith("8 texts: the held-out texts")
    res = run_lrc_recipe(LRCRecipe(steps=3, output=str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoints" /
                                                                                   "last.pt"), **common))
    assert res.history["step"] == [0, 1, 2]
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["data"]["position"] == 6


def test_token_store_errors_in_recipes(tmp_path, minilm_store, tiny_teacher_dir, small_text_file):
    from lrkd_fast.recipes import LRCRecipe, RecipeError, SwapRecipe, run_lrc_recipe, run_swap_recipe

    with pytest.raises(RecipeError, match="token store") as e:
        run_swap_recipe(SwapRecipe(teacher=tiny_teacher_dir, data=minilm_store, output=str(tmp_path / "s"),
                                   progress=False))
    assert e.value.field == "data"
    other = str(tmp_path / "words")
    tokenize_corpus(small_text_file, word_tokenizer(50), other, seq_len=8, progress=False)
    with pytest.raises(RecipeError, match="another tokenizer"):
        run_lrc_recipe(LRCRecipe(teacher=tiny_teacher_dir, data=other, output=str(tmp_path / "l"), progress=False))
    with pytest.raises(RecipeError, match="too few") as e:
        run_lrc_recipe(LRCRecipe(teacher=tiny_teacher_dir, data=minilm_store, seq_len=4096, output=str(tmp_path / "l"),
                                 progress=False))


def test_attention_kernel_choice_reaches_the_teacher_and_the_packed_layout(tmp_path, minilm_store, tiny_teacher_dir,
                                                                             monkeypatch, capsys):
    """--attn-implementation: validated before loading (flash_attention_2 needs flash-attn, which is not
    installed here), given to the teacher, and under flash_attention_2 a token store is read as one row
    per batch with per-document position_ids (what its variable-length kernels take)."""
    import importlib.util

    from lrkd_fast.cli import main
    from lrkd_fast.recipes import LRCRecipe, RecipeError
    from lrkd_fast.recipes.base import packed_layout, prepare

    common = dict(teacher=tiny_teacher_dir, data=minilm_store, batch_size=2, seq_len=32, student_hidden=16,
                  calib_texts=8, fit_texts=8, heldout=8, progress=False)
    with pytest.raises(RecipeError, match="one of") as e:
        LRCRecipe(attn_implementation="flash", output=str(tmp_path / "x"), **common)
    assert e.value.field == "attn_implementation"
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find(name, *a))
    with pytest.raises(RecipeError, match="needs the flash-attn package"):
        LRCRecipe(attn_implementation="flash_attention_2", output=str(tmp_path / "x"), **common)
    assert main(["distill", "--method", "lrc", "--attn-implementation", "flash_attention_2", "--output",
                 str(tmp_path / "y")]) == 2
    assert "--attn-implementation" in capsys.readouterr().err and not os.path.exists(tmp_path / "y")
    monkeypatch.undo()

    r = LRCRecipe(attn_implementation="eager", output=str(tmp_path / "e"), **common)
    pre = prepare(r, token_store=True)
    assert pre.teacher.config._attn_implementation == "eager"
    b = pre.train_batches().batch(0)
    assert b["attention_mask"].dim() == 4 and b["input_ids"].shape == (2, 32)  # rows with a block mask
    assert packed_layout("flash_attention_2") == {"mask": "position_ids", "flatten": True}
    r.attn_implementation = "flash_attention_2"  # the layout alone (loading that kernel needs flash-attn)
    b = pre.train_batches().batch(0)
    assert "attention_mask" not in b and b["input_ids"].shape == b["position_ids"].shape == (1, 64)
    assert (b["position_ids"] == 0).sum() >= 2  # the documents restart their positions inside the row
