"""Text data: the built-in corpus, user files, the held-out split, tokenized batches."""
import json

import pytest
import torch
import transformers as T

from lrkd_fast.data import TextBatches, packaged_minilm_path, pydoc_sentences, read_texts, split_texts


@pytest.fixture(scope="module")
def tok():
    return T.AutoTokenizer.from_pretrained(packaged_minilm_path())


def test_read_texts_plain_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first text\n\n  second text  \nthird\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "a.txt")) == ["first text", "second text", "third"]
    rows = [{"text": "one", "id": 1}, {"text": "two ü"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "b.jsonl")) == ["one", "two ü"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        read_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each JSON line needs a string field 'text'"):
        read_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        read_texts(str(tmp_path / "broken.jsonl"))


def test_split_texts_is_a_seeded_partition():
    texts = [f"t{i}" for i in range(50)]
    train, held = split_texts(texts, 7, seed=3)
    assert len(held) == 7 and len(train) == 43 and sorted(train + held) == sorted(texts)
    assert split_texts(texts, 7, seed=3) == (train, held)
    assert split_texts(texts, 7, seed=4)[1] != held
    assert split_texts(texts, 0) == (split_texts(texts, 0)[0], []) and len(split_texts(texts, 0)[0]) == 50
    for bad in (-1, 50):
        with pytest.raises(ValueError, match="heldout must be in 0..49 for 50 texts"):
            split_texts(texts, bad)


def test_pydoc_sentences_are_deduplicated_prose():
    s = pydoc_sentences()
    assert len(s) > 1000 and len(set(s)) == len(s)
    assert all(40 <= len(x) <= 400 and sum(c.isalpha() for c in x) > len(x) / 2 for x in s)
    assert s == pydoc_sentences()  # a fixed order
    short = pydoc_sentences(min_chars=10, max_chars=60)
    assert all(10 <= len(x) <= 60 for x in short)


def test_text_batches_encode_and_iterate_in_order(tok):
    texts = ["a short one", "a somewhat longer text than the first", "third", "fourth text", "fifth"]
    tb = TextBatches(texts, tok, 2, 8, shuffle=False)
    assert len(tb) == 3
    batches = list(tb)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    ref = tok(texts[:2], padding=True, truncation=True, max_length=8, return_tensors="pt")
    assert torch.equal(batches[0]["input_ids"], ref["input_ids"]) and batches[0]["input_ids"].shape[1] <= 8
    assert set(batches[0]) <= {"input_ids", "attention_mask", "token_type_ids"}
    assert torch.equal(tb.batch(0)["input_ids"], batches[0]["input_ids"]) and torch.equal(
        tb.batch(3)["input_ids"], batches[0]["input_ids"])  # epochs wrap around
    for kw, msg in ((dict(texts=[]), "texts is empty"), (dict(batch_size=0), "batch_size must be >= 1"),
                    (dict(seq_len=1), "seq_len must be >= 2"), (dict(rank=1), "rank must be in")):
        args = dict(texts=texts, tokenizer=tok, **{k: v for k, v in kw.items() if k != "texts"})
        if "texts" in kw:
            args["texts"] = kw["texts"]
        with pytest.raises(ValueError, match=msg):
            TextBatches(**args)


def test_text_batches_are_reproducible_and_bucketed(tok):
    texts = pydoc_sentences()[:200]
    a = TextBatches(texts, tok, 16, 64, seed=1)
    b = TextBatches(texts, tok, 16, 64, seed=1)
    for step in (0, 5, 13, 27):
        assert torch.equal(a.batch(step)["input_ids"], b.batch(step)["input_ids"])
    order = a.epoch_order(0)
    assert sorted(order) == list(range(200))  # every text once per epoch
    assert a.epoch_order(1) != order
    # bucketing: far less padding than a plain shuffle
    plain = TextBatches(texts, tok, 16, 64, seed=1, bucket=False)
    pad = lambda tb: sum(int((tb.batch(s)["attention_mask"] == 0).sum()) for s in range(len(tb)))
    assert pad(a) < 0.6 * pad(plain)
    # by tokens: every batch of a sorted window pads to within a few tokens of its texts
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=64)["input_ids"]]
    assert a.token_lengths() == lengths
    real = sum(int(a.batch(s)["attention_mask"].sum()) for s in range(len(a)))
    assert real == sum(lengths) and pad(a) < 0.1 * real  # a plain shuffle: 0.7 * real
    # the order is computed once per epoch, and is the same when computed again
    assert a.epoch_order(0) is a.epoch_order(0) and a.epoch_order(1) == b.epoch_order(1)
    assert a.epoch_order(0) == TextBatches(texts, tok, 16, 64, seed=1).epoch_order(0)




def test_text_batches_shard_a_global_batch_across_ranks(tok):
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(50)]
    full = TextBatches(texts, tok, 8, 32, seed=2)
    shards = [TextBatches(texts, tok, 4, 32, seed=2, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(full)
    decode = lambda b: {tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in
                        zip(b["input_ids"], b["attention_mask"])}
    for step in range(len(full)):
        parts = [decode(s.batch(step)) for s in shards]
        assert not parts[0] & parts[1]
        assert parts[0] | parts[1] == decode(full.batch(step))
    with pytest.raises(ValueError, match="rank must be in"):
        TextBatches(texts, tok, 4, rank=2, world_size=2)


def test_by_length_orders_texts_by_tokens_and_keeps_every_text(tok):
    from lrkd_fast.data import by_length

    texts = pydoc_sentences()[:300]
    ordered = by_length(texts, tok, 32)
    assert sorted(ordered) == sorted(texts)  # every text once
    lengths = [len(ids) for ids in tok(ordered, truncation=True, max_length=32)["input_ids"]]
    assert lengths == sorted(lengths)
    same = [t for t in texts if len(tok(t, truncation=True, max_length=32)["input_ids"]) == lengths[0]]
    assert ordered[:len(same)] == same  # ties keep their order
    assert by_length([], tok, 32) == []
    with pytest.raises(TypeError, match="texts must be a list"):
        by_length("one text", tok, 32)
