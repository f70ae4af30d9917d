"""The built-in offline corpus: English prose from what every install of the package already has.

Sources, in a fixed order:

- ``pydoc``: CPython's documentation topics (``pydoc_data.topics``), the held-out split of the
  default run is drawn from these;
- the docstrings of the installed packages lrkd_fast depends on (:data:`CORPUS_PACKAGES`: torch,
  transformers, numpy, tokenizers, safetensors, huggingface_hub, tqdm, triton, ...), read with
  :mod:`ast` from their source files (importing every module would be slow and has side effects);
- ``stdlib`` (never trained on by the default run): docstrings of CPython's standard library,
  the second, other-source held-out set (:func:`stdlib_heldout`).

Docstrings keep their prose only: argument / return / example sections, doctest lines, indented
code and reST directives are dropped, markup (``:class:`~a.B```, ````x````, links) is reduced to
its text. Everything is split into sentences and kept when it is 40-400 characters, mostly
letters, starts with a capital and ends like a sentence, and holds no code (``=``, braces,
``__``, ``>>>``, ...). Exact duplicates and near-duplicates (the same sentence with other names
or numbers, as in model docs generated per architecture) are dropped, first occurrence kept.

The result is cached on disk (``$LRKD_FAST_CACHE``, else ``$XDG_CACHE_HOME/lrkd_fast``, else
``~/.cache/lrkd_fast``) under a key of the builder's version, the Python version and every
source's installed version (or, for a source without package metadata, its files' sizes and
modification times), so an upgrade rebuilds it.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from .data import pydoc_sentences

__all__ = ["CORPUS_PACKAGES", "BuiltinSplit", "Corpus", "builtin_corpus", "builtin_split", "docstring_sentences",
           "prose_sentences", "stdlib_heldout"]

BUILDER_VERSION = 2
# the dependencies (and their own) whose docstrings are read: installed wherever lrkd_fast is
CORPUS_PACKAGES = ("torch", "transformers", "numpy", "tokenizers", "safetensors", "huggingface_hub", "tqdm",
                   "triton", "filelock", "fsspec", "jinja2", "networkx", "sympy", "packaging", "regex", "requests",
                   "yaml", "urllib3", "setuptools")
MIN_CHARS, MAX_CHARS = 40, 400
_MAX_FILE_BYTES = 2_000_000  # generated files (tables, stubs) hold no prose worth the parse

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(])")
# docstring sections that hold no running prose: parameters, returns, examples, ...
_STOP_SECTION = re.compile(
    r"^(args|arguments|parameters|params|other parameters|keyword arguments|kwargs|returns?|yields?|raises|"
    r"attributes|examples?|example usage|usage|shape|inputs|outputs|see also|references|methods|properties|"
    r"type|rtype|todo)\s*:{0,2}\s*$", re.I)
_UNDERLINE = re.compile(r"^[-=~^]{3,}\s*$")
_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :class:`~torch.Tensor` -> torch.Tensor
_CODE = re.compile(r"``([^`]*)``|`([^`]*)`")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_NOT_PROSE = re.compile(r"=|\{|\}|>>>|__|::|\\|\bdef\b|\bself\.|\(\)|->|\$|#|\|")
_TEMPLATE = re.compile(r"\b\w*[A-Z0-9]\w*\b")


@dataclass
class Corpus:
    """Texts in a fixed order, the source of each, and what they were built from."""
    texts: list
    sources: list  # one source name per text
    versions: dict = field(default_factory=dict)  # source -> installed version (or a file fingerprint)

    def counts(self) -> dict:
        """Texts per source, in the corpus's order."""
        out: dict = {}
        for s in self.sources:
            out[s] = out.get(s, 0) + 1
        return out

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, names: Iterable[str]) -> list:
        """The texts of the given sources."""
        names = set(names)
        return [t for t, s in zip(self.texts, self.sources) if s in names]


# ------------------------------------------------------------------------------------ text

def _clean(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = _LINK.sub(r"\1", text)
    text = _CODE.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    text = re.sub(r"\*\*?([^*]+)\*\*?", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(s: str) -> bool:
    if not (MIN_CHARS <= len(s) <= MAX_CHARS) or not s[0].isupper() or s[-1] not in ".!?":
        return False
    if "http" in s or "www." in s or _NOT_PROSE.search(s):
        return False
    words = s.split()
    if len(words) < 6:
        return False
    alpha = sum(c.isalpha() for c in s)
    plain = sum(w.strip(".,;:!?()'\"").isalpha() for w in words)
    return alpha > 0.7 * len(s) and plain >= 0.75 * len(words)


def prose_sentences(text: str) -> Iterator[str]:
    """The sentences of running text (whitespace already normalized or not) that pass the prose filter."""
    for s in _SENTENCE.split(_clean(text)):
        s = s.strip()
        if _is_prose(s):
            yield s


def _prose_paragraphs(doc: str) -> Iterator[str]:
    """The running-prose paragraphs of a (cleaned, dedented) docstring."""
    para: list = []
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if _STOP_SECTION.match(stripped) or (stripped and _UNDERLINE.match(nxt) and
                                             _STOP_SECTION.match(stripped + ":")):
            break  # the rest is parameters, returns, examples
        if not stripped or line.startswith((" ", "\t")) or stripped.startswith((">>>", "...", ".. ", "```")) \
                or _UNDERLINE.match(stripped):
            if para:
                yield " ".join(para)
                para = []
            continue
        para.append(stripped)
    if para:
        yield " ".join(para)


def docstring_sentences(source: str) -> Iterator[str]:
    """Prose sentences of every docstring (module, class, function) in Python ``source``, in file order.
    A file that does not parse yields nothing."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    for node in _docstring_nodes(tree):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            for para in _prose_paragraphs(doc):
                yield from prose_sentences(para)


_HAS_DOC = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


def _docstring_nodes(tree) -> Iterator[ast.AST]:
    """Module, classes and functions in file order, visiting statements only (docstrings never sit
    inside expressions; walking every expression node would cost more than the parse)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _HAS_DOC):
            yield node
        children = []
        for name in _BLOCKS:
            children += [c for c in getattr(node, name, ()) or () if isinstance(c, (ast.stmt, ast.excepthandler,
                                                                                  ast.match_case))]
        stack += reversed(children)


def _template(s: str) -> str:
    """A near-duplicate key: case folded, every word with a capital or digit (names, numbers) one token."""
    return _TEMPLATE.sub("X", s[0].lower() + s[1:]).lower()


class _Dedupe:
    def __init__(self):
        self.seen: set = set()

    def new(self, s: str) -> bool:
        key = _template(s)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


# ------------------------------------------------------------------------------------ sources

def package_root(name: str) -> Optional[str]:
    """Folder (or single file) of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return sorted(spec.submodule_search_locations)[0]
    return spec.origin if spec.origin and spec.origin.endswith(".py") else None


def _python_files(root: str, skip: tuple = ()) -> list:
    if os.path.isfile(root):
        return [root]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("tests", "test", "__pycache__") and x not in skip
                         and not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return out


def _read(path: str) -> str:
    try:
        if os.path.getsize(path) > _MAX_FILE_BYTES:
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _file_sentences(path: str) -> list:
    return list(docstring_sentences(_read(path)))


def _source_texts(root: str, skip: tuple = (), pool=None) -> Iterator[str]:
    """Sentences of every Python file under ``root`` in sorted path order (``pool``: a
    multiprocessing pool to parse with; the order stays the same)."""
    files = _python_files(root, skip)
    results = pool.imap(_file_sentences, files, chunksize=16) if pool is not None else map(_file_sentences, files)
    for sentences in results:
        yield from sentences


def _version(name: str, root: Optional[str]) -> str:
    for dist in (name, name.replace("_", "-"), {"yaml": "PyYAML"}.get(name, name)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if root is None:
        return "missing"
    files = _python_files(root)
    stat = [(os.path.relpath(p, root), os.path.getsize(p), int(os.path.getmtime(p))) for p in files]
    return "files:" + hashlib.sha1(json.dumps(stat).encode()).hexdigest()[:16]


def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


_STDLIB_SKIP = ("site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data",
                "config-3", "tkinter")


# ------------------------------------------------------------------------------------ corpus

def _cache_dir(cache_dir: Optional[str]) -> str:
    if cache_dir:
        return cache_dir
    if os.environ.get("LRKD_FAST_CACHE"):
        return os.environ["LRKD_FAST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lrkd_fast")


def _check_packages(packages) -> dict:
    """``packages`` as {name: root folder or None}: names are found installed, a dict gives folders."""
    if isinstance(packages, dict):
        items = packages.items()
    elif isinstance(packages, (list, tuple)):
        items = ((p, None) for p in packages)
    else:
        raise TypeError(f"packages must be a list of package names or a {{name: folder}} dict, got "
                        f"{type(packages).__name__}")
    out = {}
    for name, root in items:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"packages: {name!r} is not a package name")
        if name in ("pydoc", "stdlib"):
            raise ValueError(f"packages: {name!r} is the name of a built-in source")
        if root is not None and not os.path.exists(root):
            raise FileNotFoundError(f"packages: folder {root!r} of {name!r} does not exist")
        out[name] = root if root is not None else package_root(name)
    return out


def builtin_corpus(packages=CORPUS_PACKAGES, cache_dir: Optional[str] = None, progress: bool = True,
                   rebuild: bool = False, stdlib: Optional[str] = None) -> Corpus:
    """The built-in training corpus: CPython's pydoc topics, then the docstrings of ``packages`` (names
    found installed, or a {name: folder} dict), sentence-split, filtered and deduplicated, in a fixed
    order (see the module docstring). A package that is not installed is skipped (it shows in
    ``versions`` as "missing"). The standard library's docstrings (``stdlib``: its folder, default
    CPython's) come last, source "stdlib", for :func:`stdlib_heldout` only. Built once, then read from
    the cache (``rebuild`` forces a build)."""
    roots = _check_packages(packages)
    if stdlib is not None and not os.path.isdir(stdlib):
        raise FileNotFoundError(f"stdlib: folder {stdlib!r} does not exist")
    stdlib = stdlib or _stdlib_root()
    versions = {"python": sys.version.split()[0], "builder": str(BUILDER_VERSION)}
    versions.update({name: _version(name, root) for name, root in roots.items()})
    if stdlib != _stdlib_root():
        versions["stdlib"] = _version("stdlib", stdlib)
    key = hashlib.sha1(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    folder = _cache_dir(cache_dir)
    path = os.path.join(folder, f"corpus-{key}.json")
    if not rebuild and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return Corpus(data["texts"], data["sources"], data["versions"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt
    corpus = _build(roots, versions, progress, stdlib)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"texts": corpus.texts, "sources": corpus.sources, "versions": corpus.versions}, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return corpus


def _build(roots: dict, versions: dict, progress: bool, stdlib: str) -> Corpus:
    from tqdm.auto import tqdm

    import multiprocessing

    dedupe, texts, sources = _Dedupe(), [], []
    jobs = [("pydoc", None)] + [(n, r) for n, r in roots.items() if r is not None] + [("stdlib", stdlib)]
    bar = tqdm(jobs, desc="building the built-in corpus (once)", unit="source", disable=not progress)
    workers = min(os.cpu_count() or 1, 8)
    # parsing dominates the build: spread the files over the cores (fork: no re-import of the caller)
    ctx = multiprocessing.get_context("fork") if workers > 1 and sys.platform == "linux" else None
    pool = ctx.Pool(workers) if ctx is not None else None
    try:
        for name, root in bar:
            bar.set_postfix_str(name)
            skip = _STDLIB_SKIP if name == "stdlib" else ()
            for s in (pydoc_sentences() if root is None else _source_texts(root, skip, pool=pool)):
                if dedupe.new(s):
                    texts.append(s)
                    sources.append(name)
    finally:
        if pool is not None:
            pool.terminate()
    return Corpus(texts, sources, versions)


def stdlib_heldout(corpus: Corpus, n: int = 512, seed: int = 0) -> list:
    """``n`` sentences of CPython's standard-library docstrings, a source the built-in corpus never
    trains on (built last, so none is a near-duplicate of a training text); a fixed sample per ``seed``."""
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a Corpus (builtin_corpus()), got {type(corpus).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    pool = corpus.select(["stdlib"])
    if len(pool) < n:
        raise ValueError(f"n: the standard library gave {len(pool)} sentences, fewer than {n}")
    return random.Random(seed).sample(pool, n)


HELD_SOURCES = ("stdlib",)  # built into the corpus only to be held out


@dataclass
class BuiltinSplit:
    """The default run's texts: ``train`` (pydoc minus its held-out split, then the package
    docstrings), ``held`` (the pydoc held-out split) and ``other`` (the standard-library held-out set)."""
    train: list
    held: list
    other: list
    counts: dict  # training texts per source


def builtin_split(heldout: int = 512, seed: int = 0, corpus_size: Optional[int] = None, other: int = 512,
                  corpus: Optional[Corpus] = None, progress: bool = True, pydoc_repeats: int = 1) -> BuiltinSplit:
    """Split the built-in corpus for a run: ``heldout`` pydoc sentences held out (the same split as
    ``split_texts(pydoc_sentences(), heldout, seed)``), every other training text that is a
    near-duplicate of one of them dropped, ``other`` standard-library sentences as the second held-out
    set. ``corpus_size``: train on the pydoc training split plus a fixed random subset of the package
    texts, this many distinct training texts in all (None: every text). ``pydoc_repeats``: each pydoc
    training sentence is in ``train`` this many times (the copies after the other texts, so ``train``
    starts with the distinct pydoc sentences and then the package texts whatever the repeats);
    ``counts`` counts distinct texts."""
    from .data import split_texts

    if isinstance(pydoc_repeats, bool) or not isinstance(pydoc_repeats, int) or pydoc_repeats < 1:
        raise ValueError(f"pydoc_repeats must be an int >= 1, got {pydoc_repeats!r}")

    corpus = corpus if corpus is not None else builtin_corpus(progress=progress)
    train_pd, held = split_texts(pydoc_sentences(), heldout, seed=seed)
    held_keys = {_template(t) for t in held}
    train_pd = [t for t in train_pd if _template(t) not in held_keys]  # pydoc repeats some sentences nearly
    extra = [(t, s) for t, s in zip(corpus.texts, corpus.sources)
             if s not in ("pydoc",) + HELD_SOURCES and _template(t) not in held_keys]
    if corpus_size is not None:
        if isinstance(corpus_size, bool) or not isinstance(corpus_size, int) or corpus_size < len(train_pd):
            raise ValueError(f"corpus_size must be None or an int >= {len(train_pd)} (the pydoc training split), "
                             f"got {corpus_size!r}")
        keep = sorted(random.Random(seed).sample(range(len(extra)), min(len(extra), corpus_size - len(train_pd))))
        extra = [extra[i] for i in keep]
    counts = {"pydoc": len(train_pd)}
    for _, s in extra:
        counts[s] = counts.get(s, 0) + 1
    train = train_pd + [t for t, _ in extra] + train_pd * (pydoc_repeats - 1)
    return BuiltinSplit(train, held, stdlib_heldout(corpus, other, seed=seed), counts)
