"""The built-in corpus: docstring prose from installed packages (a fake package tree here), its
filters, dedupe, order and cache; the default run's split; the pairwise-similarity Spearman."""
import json
import os
import sys
import textwrap

import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from lrkd_fast import corpus as C
from lrkd_fast.data import builtin_corpus, builtin_split, pydoc_sentences, split_texts
from lrkd_fast.evaluate import embedding_fidelity, pairwise_similarity_spearman, spearman

PROSE_1 = "The BertLoader reads every record from the given file and returns them in their original order."
PROSE_2 = "A cache keeps the most recent results so that repeated calls finish without doing the work again."
PROSE_3 = "When the queue is full the producer waits until a consumer has taken at least one item away."
NEAR_DUP = "The Llama2Loader reads every record from the given file and returns them in their original order."
STDLIB_PROSE = "This module provides a small set of helpers for working with temporary files on any platform."

MODULE = f'''
"""{PROSE_1} Short one.

Args:
    path (str): {PROSE_3}

Example:
    >>> load("x")
"""


class Cache:
    """{PROSE_2}

        this_is = code(indented=True)

    See :class:`~pkg.Other` for the rest of the story and how it ends in practice today.
    """

    def get(self):
        """{PROSE_1}"""


def f():
    """{NEAR_DUP} Calls x = y() here, which the filter drops as code."""
'''


def _write(root, files: dict) -> str:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(textwrap.dedent(text))
    return str(root)


@pytest.fixture
def fake_tree(tmp_path):
    pkg = _write(tmp_path / "site" / "fakepkg", {
        "__init__.py": MODULE,
        "sub/b.py": f'"""{PROSE_3}"""\n',
        "sub/a.py": "def broken(:\n    pass\n",  # does not parse: skipped
        "tests/test_x.py": '"""Tests are never read, however long and well written their docstrings are."""\n',
    })
    std = _write(tmp_path / "stdlib", {"tempfile_helpers.py": f'"""{STDLIB_PROSE}"""\n',
                                       "again.py": f'"""{PROSE_2}"""\n'})  # a training text: not held out
    return pkg, std, tmp_path


def test_fake_package_tree_sources_filters_dedupe_and_order(fake_tree):
    pkg, std, tmp = fake_tree
    c = builtin_corpus({"fakepkg": pkg}, cache_dir=str(tmp / "cache"), progress=False, stdlib=std)
    pydoc = [t for t, s in zip(c.texts, c.sources) if s == "pydoc"]
    assert c.sources[:len(pydoc)] == ["pydoc"] * len(pydoc)  # pydoc first, then the packages, stdlib last
    assert set(pydoc) <= set(pydoc_sentences()) and len(pydoc) > 1500
    # module docstring's prose sentence, the class's prose (markup reduced, indented code dropped), the
    # method's copy of PROSE_1 (dropped), the near-duplicate (dropped), sub/b.py; no Args/Example text
    assert c.select(["fakepkg"]) == [PROSE_1, PROSE_2,
                                     "See Other for the rest of the story and how it ends in practice today.",
                                     PROSE_3]
    assert c.select(["stdlib"]) == [STDLIB_PROSE]  # files in sorted order; PROSE_2 is a training text
    assert c.counts() == {"pydoc": len(pydoc), "fakepkg": 4, "stdlib": 1}
    assert c.versions["fakepkg"].startswith("files:")  # no package metadata: a fingerprint of its files
    again = builtin_corpus({"fakepkg": pkg}, cache_dir=str(tmp / "cache2"), progress=False, stdlib=std)
    assert (again.texts, again.sources) == (c.texts, c.sources)  # a fresh build gives the same order


def test_cache_is_read_and_rebuilt_when_the_installed_version_changes(fake_tree, monkeypatch):
    pkg, std, tmp = fake_tree
    site = os.path.dirname(pkg)
    meta = os.path.join(site, "fakepkg-1.0.dist-info")
    os.makedirs(meta)
    with open(os.path.join(meta, "METADATA"), "w") as fh:
        fh.write("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(site)
    cache = str(tmp / "cache")
    c1 = builtin_corpus(["fakepkg"], cache_dir=cache, progress=False, stdlib=std)
    assert c1.versions["fakepkg"] == "1.0" and len(os.listdir(cache)) == 1
    # the cached copy is what a second call returns: edit it and see the edit come back
    path = os.path.join(cache, os.listdir(cache)[0])
    with open(path) as fh:
        data = json.load(fh)
    data["texts"][-1] = "Edited in the cache."
    with open(path, "w") as fh:
        json.dump(data, fh)
    assert builtin_corpus(["fakepkg"], cache_dir=cache, progress=False, stdlib=std).texts[-1] == "Edited in the cache."
    # an upgrade: new version, new docstring -> a new build under a new key
    _write(pkg, {"sub/b.py": '"""An upgraded release documents its new behaviour in this longer sentence here."""\n'})
    os.rename(meta, os.path.join(site, "fakepkg-1.1.dist-info"))
    with open(os.path.join(site, "fakepkg-1.1.dist-info", "METADATA"), "w") as fh:
        fh.write("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.1\n")
    sys.modules.pop("fakepkg", None)
    c2 = builtin_corpus(["fakepkg"], cache_dir=cache, progress=False, stdlib=std)
    assert c2.versions["fakepkg"] == "1.1" and len(os.listdir(cache)) == 2
    assert "An upgraded release documents its new behaviour in this longer sentence here." in c2.select(["fakepkg"])
    assert PROSE_3 not in c2.select(["fakepkg"])
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]


def test_prose_filter():
    keep = "Returns a new tensor with the same data as the input but of a different shape."
    assert list(C.prose_sentences(keep)) == [keep]
    for bad in ["x = torch.zeros(3) creates a tensor of zeros with three elements in it.",  # code
                "See https://example.com/docs for the complete list of supported options.",  # link
                "Too short to keep.",
                "lowercase start is not a sentence of running prose in the documentation.",
                "A" * 401 + ".",
                "Uses __init__ and self.value to store the configured value on the object."]:
        assert list(C.prose_sentences(bad)) == [], bad


def test_bad_arguments_name_themselves(tmp_path):
    with pytest.raises(ValueError, match="packages: 'not a name'"):
        builtin_corpus(["not a name"], cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="packages: folder"):
        builtin_corpus({"x": str(tmp_path / "missing")}, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="built-in source"):
        builtin_corpus(["stdlib"], cache_dir=str(tmp_path))
    with pytest.raises(TypeError, match="packages must be"):
        builtin_corpus("torch", cache_dir=str(tmp_path))


def test_default_split_never_trains_on_its_held_out_sets():
    corpus = builtin_corpus(progress=False)  # the real one (cached after its first build)
    split = builtin_split(512, seed=0, corpus=corpus)
    assert len(split.held) == len(split.other) == 512 and len(split.train) > 20000
    assert split.held == split_texts(pydoc_sentences(), 512, seed=0)[1]  # the same pydoc split as before
    train_keys = {C._template(t) for t in split.train}
    assert not train_keys & {C._template(t) for t in split.held}
    assert not train_keys & {C._template(t) for t in split.other}
    assert set(split.other) <= set(corpus.select(["stdlib"]))
    assert sum(split.counts.values()) == len(split.train) and split.counts["torch"] > 1000
    small = builtin_split(512, seed=0, corpus=corpus, corpus_size=3000)
    n_pydoc = split.counts["pydoc"]  # the pydoc training split comes first, whole
    assert len(small.train) == 3000 and small.train[:n_pydoc] == split.train[:n_pydoc] and small.other == split.other
    with pytest.raises(ValueError, match="corpus_size must be"):
        builtin_split(512, corpus=corpus, corpus_size=10)
    rep = builtin_split(512, seed=0, corpus=corpus, corpus_size=3000, pydoc_repeats=3)
    assert rep.train == small.train + 2 * small.train[:n_pydoc] and rep.counts == small.counts
    assert rep.held == small.held and rep.other == small.other
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="pydoc_repeats must be"):
            builtin_split(512, corpus=corpus, pydoc_repeats=bad)


def test_pydoc_repeats_is_the_recipes_and_the_commands(tmp_path, small_text_file):
    from lrkd_fast.recipes import LRCRecipe, RecipeError, SwapRecipe

    assert SwapRecipe().resolved_pydoc_repeats == 4 and LRCRecipe().resolved_pydoc_repeats == 1
    assert SwapRecipe(pydoc_repeats=2).resolved_pydoc_repeats == 2
    with pytest.raises(RecipeError, match="pydoc_repeats: is for the built-in corpus"):
        SwapRecipe(data=small_text_file, pydoc_repeats=2)
    with pytest.raises(RecipeError, match="pydoc_repeats: must be None or an int >= 1"):
        SwapRecipe(pydoc_repeats=0)
    from lrkd_fast.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--pydoc-repeats", "0", "--output", str(tmp_path / "x")])


def test_spearman_matches_scipy_with_and_without_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, generator=g)
    b = a + torch.randn(300, generator=g)
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    a = torch.randint(0, 6, (200,), generator=g).float()
    b = a + torch.randint(0, 3, (200,), generator=g).float()
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(torch.ones(5), torch.arange(5.0)) != spearman(torch.ones(5), torch.arange(5.0))  # nan
    with pytest.raises(ValueError, match="a and b must be 1-D"):
        spearman(torch.ones(3), torch.ones(4))


def test_pairwise_similarity_spearman_over_all_pairs():
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(40, 8, generator=g), dim=-1)
    s = F.normalize(t + 0.3 * torch.randn(40, 8, generator=g), dim=-1)
    i, j = torch.triu_indices(40, 40, offset=1)
    expected = scipy.stats.spearmanr((s @ s.t())[i, j], (t @ t.t())[i, j]).statistic
    assert pairwise_similarity_spearman(s, t) == pytest.approx(expected, abs=1e-9)
    assert embedding_fidelity(s, t).spearman == pytest.approx(expected, abs=1e-9)
    assert pairwise_similarity_spearman(t, t) == pytest.approx(1.0)


@pytest.mark.usefixtures("eager_backend")
def test_corpus_size_experiment_runs_on_a_tiny_teacher(tmp_path, tiny_teacher_dir):
    from benchmarks import corpus_size

    out = tmp_path / "cs"
    corpus_size.main(["--sizes", "0", "2500", "--steps", "2", "--teacher", tiny_teacher_dir, "--calib-texts", "16",
                      "--seq-len", "16", "--out", str(out), "--quiet"])
    rows = list(__import__("csv").DictReader(open(out / "corpus_size.csv")))
    n_pydoc = builtin_split().counts["pydoc"]
    assert [int(r["train_texts"]) for r in rows] == [n_pydoc, 2500] and {r["steps"] for r in rows} == {"2"}
    assert all(-1 <= float(r["stdlib_spearman"]) <= 1 and 0 < float(r["pydoc_mean_cos"]) <= 1 for r in rows)
    assert "| 2,500 | 2 |" in (out / "README.md").read_text()


def test_default_tuning_arms_and_texts():
    from benchmarks.default_tuning import parse_arm, training_texts

    defaults = {"lr": 3e-4, "steps": 800, "batch": 16, "text": "all", "opt": "whitened", "whiten": 1024}
    assert parse_arm("lr=1e-3,text=pydoc4", defaults) == {"lr": 1e-3, "steps": 800, "batch": 16, "text": "pydoc4",
                                                         "opt": "whitened", "whiten": 1024,
                                                         "name": "lr=1e-3,text=pydoc4"}
    assert parse_arm("opt=adamw,whiten=0", defaults)["opt"] == "adamw"
    for bad in ("rate=1", "lr", "text=books", "steps=0", "opt=sgd", "whiten=-1"):
        with pytest.raises(ValueError, match="arm"):
            parse_arm(bad, defaults)
    train = [f"p{i}" for i in range(3)] + [f"o{i}" for i in range(10)]
    assert training_texts(train, 3, "all") == train and training_texts(train, 3, "pydoc") == train[:3]
    assert training_texts(train, 3, "pydoc2") == train + train[:3]
    some = training_texts(train, 3, "7")
    assert some[:3] == train[:3] and len(some) == 7 and set(some[3:]) <= set(train[3:])


@pytest.mark.usefixtures("eager_backend")
def test_default_tuning_arm_is_the_default_run(tmp_path, tiny_teacher_dir):
    """An arm with the default settings (the pydoc sentences 4 times) trains exactly as ``lrkd-fast distill``
    does from the same start."""
    import csv

    from benchmarks import default_tuning
    from lrkd_fast.recipes import SwapRecipe, run_swap_recipe

    out = tmp_path / "dt"
    default_tuning.main(["--arms", "steps=3", "steps=2,text=pydoc,lr=1e-3", "--eval-every", "2", "--teacher",
                         tiny_teacher_dir, "--calib-texts", "16", "--out", str(out), "--quiet"])
    rows = list(csv.DictReader(open(out / "default_tuning.csv")))
    assert [(r["arm"], int(r["step"])) for r in rows] == [("steps=3", 0), ("steps=3", 2), ("steps=3", 3),
                                                         ("steps=2,text=pydoc,lr=1e-3", 0),
                                                         ("steps=2,text=pydoc,lr=1e-3", 2)]
    assert rows[0]["pydoc_mean_cos"] == rows[3]["pydoc_mean_cos"]  # one start for every arm
    counts = builtin_split().counts
    assert int(rows[3]["train_texts"]) == counts["pydoc"]
    assert int(rows[0]["train_texts"]) == sum(counts.values()) + 3 * counts["pydoc"] and rows[0]["text"] == "pydoc4"
    res = run_swap_recipe(SwapRecipe(teacher=tiny_teacher_dir, steps=3, calib_texts=16, progress=False,
                                     output=str(tmp_path / "ref")))
    start, end = res.rows[1], res.rows[2]
    assert float(rows[0]["pydoc_mean_cos"]) == pytest.approx(start.fidelity.mean_cosine, abs=1e-4)
    assert float(rows[2]["pydoc_mean_cos"]) == pytest.approx(end.fidelity.mean_cosine, abs=1e-4)
    assert float(rows[2]["stdlib_spearman"]) == pytest.approx(end.other.spearman, abs=1e-4)
    assert "| steps=3 | " in (out / "README.md").read_text() and (out / "default_tuning.png").stat().st_size > 0
