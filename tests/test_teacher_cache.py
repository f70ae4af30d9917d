"""The teacher cache: targets served from it equal a fresh teacher forward, whatever the batching."""
import copy

import pytest
import torch

import lrkd_fast
from lrkd_fast import DistillConfig, Distiller, LowRankConfig, distill, swap_linear_layers
from lrkd_fast.teacher_cache import TeacherCache
from tests.conftest import VOCAB, tiny


def _texts(n=6, seed=0):
    """Token sequences of different lengths (the 'texts' a cache entry is keyed by)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g) for _ in range(n)]


def _batch(seqs, pad_to=None, left=False):
    L = pad_to or max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def _pair(family):
    teacher = tiny(family).eval()
    student = copy.deepcopy(teacher)
    swap_linear_layers(student, LowRankConfig(rank=4))
    return student, teacher


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_cached_targets_match_fresh_teacher(family, eager_backend):
    student, teacher = _pair(family)
    texts = _texts()
    cached = Distiller(student, teacher, DistillConfig(progress=False, teacher_cache=True))
    fresh = Distiller(student, teacher, DistillConfig(progress=False))
    # fill the cache with one batching of the texts ...
    cached.compute_loss(_batch(texts[:3]))
    cached.compute_loss(_batch(texts[3:], pad_to=12))
    assert cached.cache.misses == 2 and cached.cache.hits == 0 and len(cached.cache.rows) == 6
    # ... and ask for another: other rows together, other padding lengths
    for batch in (_batch([texts[5], texts[0], texts[2]]), _batch(texts[1:5], pad_to=15)):
        lc, pc = cached.compute_loss(batch)
        lf, pf = fresh.compute_loss(batch)
        torch.testing.assert_close(lc, lf, rtol=1e-5, atol=1e-6)
        assert pc.keys() == pf.keys()
    assert cached.cache.hits == 2 and cached.cache.misses == 2
    # a batch with one new text misses as a whole and stores only the new row
    new = _texts(1, seed=9)
    cached.compute_loss(_batch(texts[:2] + new))
    assert cached.cache.misses == 3 and len(cached.cache.rows) == 7
    cached.close()
    fresh.close()


def test_shared_last_block_is_stored_once(eager_backend):
    student, teacher = _pair("bert")  # BERT's last block output is also its last hidden state
    d = Distiller(student, teacher, DistillConfig(progress=False, teacher_cache=True))
    seq = _texts(1)[0]
    d.compute_loss(_batch([seq]))
    (entry,) = d.cache.rows.values()
    width = teacher.config.hidden_size
    n_blocks = len(d.clone_names)
    assert d.cache.nbytes == n_blocks * len(seq) * width * 4  # fp32, no extra copy for the output
    assert len(entry) == n_blocks + 1
    d.close()


def test_left_padding_keys_by_position(eager_backend):
    student, teacher = _pair("llama")  # positions follow the padding side: a shifted text is a new key
    d = Distiller(student, teacher, DistillConfig(progress=False, teacher_cache=True))
    fresh = Distiller(student, teacher, DistillConfig(progress=False))
    texts = _texts(3)
    d.compute_loss(_batch(texts, left=True))
    b2 = _batch(texts, pad_to=12, left=True)
    torch.testing.assert_close(d.compute_loss(b2)[0], fresh.compute_loss(b2)[0], rtol=1e-5, atol=1e-6)
    assert d.cache.hits == 0
    d.close()
    fresh.close()


def test_memory_cap_stops_storing_but_stays_correct(eager_backend):
    student, teacher = _pair("bert")
    tiny_cap = 1e-9  # GiB: a few bytes, filled by the first row
    d = Distiller(student, teacher, DistillConfig(progress=False, teacher_cache=True, teacher_cache_gb=tiny_cap))
    fresh = Distiller(student, teacher, DistillConfig(progress=False))
    texts = _texts()
    for _ in range(2):
        batch = _batch(texts)
        torch.testing.assert_close(d.compute_loss(batch)[0], fresh.compute_loss(batch)[0], rtol=1e-5, atol=1e-6)
    assert len(d.cache.rows) == 1 and d.cache.hits == 0
    d.close()
    fresh.close()


def test_training_with_cache_matches_training_without(eager_backend):
    student, teacher = _pair("bert")
    texts = _texts(4)
    data = [_batch(texts[:2]), _batch(texts[2:])]
    runs = {}
    for cache in (False, True):
        s = copy.deepcopy(student)
        runs[cache] = distill(s, teacher, data, steps=6, lr=2e-3, progress=False, teacher_cache=cache)
    assert runs[True]["loss"] == pytest.approx(runs[False]["loss"], rel=1e-5)
    assert runs[True]["teacher_cache"] == {"hits": 4, "misses": 2, "texts": 4,
                                           "gib": pytest.approx(runs[True]["teacher_cache"]["gib"])}
    assert "teacher_cache" not in runs[False]


def test_batches_with_other_inputs_bypass_the_cache(eager_backend):
    student, teacher = _pair("llama")
    d = Distiller(student, teacher, DistillConfig(progress=False, teacher_cache=True))
    fresh = Distiller(student, teacher, DistillConfig(progress=False))
    batch = _batch(_texts(2))
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]) + 3
    for _ in range(2):
        torch.testing.assert_close(d.compute_loss(batch)[0], fresh.compute_loss(batch)[0], rtol=1e-5, atol=1e-6)
    assert len(d.cache.rows) == 0 and d.cache.hits == d.cache.misses == 0
    d.close()
    fresh.close()


def test_cache_config_validation():
    with pytest.raises(ValueError, match="teacher_cache_gb"):
        DistillConfig(teacher_cache=True, teacher_cache_gb=0)
    with pytest.raises(ValueError, match="max_bytes"):
        TeacherCache(0)
    assert TeacherCache(10).get(_batch(_texts(1))) is None
