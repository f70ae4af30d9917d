"""What every end-to-end recipe shares: its settings (:class:`Recipe`), the start (process layout,
teacher, text split), the result table and the finished output folder."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Optional

import torch

from .._table import format_table
from ..data import TextBatches, builtin_split, packaged_minilm_path, pydoc_sentences, read_texts, split_texts
from ..evaluate import EmbeddingFidelity

__all__ = ["RUN_FILE", "Prepared", "Recipe", "RecipeError", "RecipeResult", "Row", "check_before_loading",
           "check_device", "check_output", "default_heldout", "finish_output", "init_distributed", "is_lrkd_output",
           "keep_better", "load_teacher", "prepare", "read_run_file"]

RUN_FILE = "lrkd_fast_run.json"  # in a saved student's folder: what it was distilled from
HELDOUT_CAP = 512
HELDOUT_FRACTION = 0.1


class RecipeError(ValueError):
    """A recipe setting that cannot work; ``field`` names it (the CLI turns it into its flag)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise RecipeError(name, message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(kw_only=True)
class Recipe:
    """Settings every recipe has (a base: each recipe sets the defaults of its own). ``heldout=None`` holds out 10% of the texts, at most 512; ``steps``
    fixes the run's length, ``minutes`` optionally caps it. ``save_worse=False`` saves the start
    instead of the distilled student when distillation made held-out fidelity worse.

    The run writes ``output/checkpoints/last.pt`` every ``checkpoint_minutes`` (0: off), when it is
    stopped (Ctrl-C, an error) and at the end; ``resume`` continues from such a checkpoint without
    recomputing the init (its factors are in it), up to ``steps`` / ``minutes`` in all. ``output``
    must be new, empty or a previous output of a recipe (``overwrite=True`` writes into any folder);
    the paths and the device are checked before anything is loaded."""

    teacher: Optional[str] = None  # model folder or offline-cached hub name; None = packaged all-MiniLM-L6-v2
    data: Optional[str] = None  # text file (one text per line) or .jsonl; None = CPython's pydoc topics
    # each recipe gives these its own default
    calib_texts: int
    steps: int
    lr: float
    batch_size: int
    output: str
    heldout: Optional[int] = None
    minutes: Optional[float] = None
    seq_len: int = 128
    device: Optional[str] = None
    # the teacher's (and so the student's) attention kernel, as transformers names it; None: its default (sdpa).
    # "flash_attention_2" (flash-attn installed) reads a token store's packed rows as one row per batch,
    # documents found from position_ids (variable-length kernels)
    attn_implementation: Optional[str] = None
    seed: int = 0
    resume: Optional[str] = None
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.0
    overwrite: bool = False
    corpus_size: Optional[int] = None  # built-in data only: train on this many texts (None: all of the corpus)
    # built-in data only: each pydoc training sentence this many times per epoch (None: the recipe's default)
    pydoc_repeats: Optional[int] = None
    diagnostics_every: int = 0  # steps between per-layer CKA / MI logs (0: off); plot in output/diagnostics.png
    keep_checkpoints: bool = False
    save_worse: bool = False
    progress: bool = True
    DEFAULT_PYDOC_REPEATS: ClassVar[int] = 1  # pydoc_repeats=None on the built-in corpus

    @property
    def resolved_pydoc_repeats(self) -> int:
        return self.DEFAULT_PYDOC_REPEATS if self.pydoc_repeats is None else self.pydoc_repeats

    def __post_init__(self):
        _check(self.heldout is None or (_is_int(self.heldout) and self.heldout >= 2), "heldout",
               f"must be an int >= 2 (fidelity compares nearest neighbours) or None, got {self.heldout!r}")
        _check(_is_int(self.steps) and self.steps >= 1, "steps", f"must be an int >= 1, got {self.steps!r}")
        _check(self.minutes is None or (_is_finite(self.minutes) and self.minutes > 0), "minutes",
               f"must be > 0 (and finite) or None, got {self.minutes!r}")
        _check(_is_finite(self.lr) and self.lr > 0, "lr", f"must be > 0 and finite, got {self.lr!r}")
        for name in ("calib_texts", "batch_size"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, f"must be an int >= 1, got {v!r}")
        _check(_is_int(self.seq_len) and self.seq_len >= 2, "seq_len", f"must be an int >= 2, got {self.seq_len!r}")
        _check(_is_int(self.checkpoint_every) and self.checkpoint_every >= 0, "checkpoint_every",
               f"must be an int >= 0, got {self.checkpoint_every!r}")
        _check(self.corpus_size is None or (_is_int(self.corpus_size) and self.corpus_size >= 2), "corpus_size",
               f"must be None or an int >= 2, got {self.corpus_size!r}")
        _check(self.corpus_size is None or self.data is None, "corpus_size",
               "is for the built-in corpus; with data= every text of the file is used")
        _check(self.pydoc_repeats is None or (_is_int(self.pydoc_repeats) and self.pydoc_repeats >= 1),
               "pydoc_repeats", f"must be None or an int >= 1, got {self.pydoc_repeats!r}")
        _check(self.pydoc_repeats is None or self.data is None, "pydoc_repeats",
               "is for the built-in corpus; with data= every text of the file is used once per epoch")
        _check(_is_int(self.diagnostics_every) and self.diagnostics_every >= 0, "diagnostics_every",
               f"must be an int >= 0, got {self.diagnostics_every!r}")
        _check(_is_finite(self.checkpoint_minutes) and self.checkpoint_minutes >= 0, "checkpoint_minutes",
               f"must be >= 0 and finite (0: off), got {self.checkpoint_minutes!r}")
        _check(isinstance(self.output, str) and self.output.strip() != "", "output",
               f"must be a folder path, got {self.output!r}")
        check_device(self.device)
        check_attn_implementation(self.attn_implementation)


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_attn_implementation(impl: Optional[str]) -> None:
    """A clear RecipeError for an attention kernel transformers does not name, or flash_attention_2 without
    the flash-attn package (checked here, before the teacher loads)."""
    if impl is None:
        return
    _check(impl in ATTN_IMPLEMENTATIONS, "attn_implementation",
           f"must be None or one of {ATTN_IMPLEMENTATIONS}, got {impl!r}")
    if impl == "flash_attention_2":
        import importlib.util

        _check(importlib.util.find_spec("flash_attn") is not None, "attn_implementation",
               "'flash_attention_2' needs the flash-attn package (pip install flash-attn, on a CUDA machine); "
               "it is not installed here: use 'sdpa' (the default) or 'eager'")


def packed_layout(attn_implementation: Optional[str]) -> dict:
    """How a token store's batches are laid out for the teacher's attention kernel
    (:class:`~lrkd_fast.packed.PackedBatches` ``mask`` / ``flatten``): under flash_attention_2 one row per
    batch whose documents the variable-length kernels find from where ``position_ids`` restart; otherwise
    rows with a block-diagonal 4-D mask."""
    if attn_implementation == "flash_attention_2":
        return {"mask": "position_ids", "flatten": True}
    return {"mask": "4d", "flatten": False}


def check_device(device: Optional[str]) -> None:
    """A clear RecipeError for a device this machine cannot run on (None: chosen later)."""
    if device is None:
        return
    _check(isinstance(device, str), "device", f"must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise RecipeError("device", f"unknown device {device!r}: use cpu or cuda (cuda:N for one GPU)") from None
    if d.type == "cpu":
        return
    if d.type == "cuda":
        _check(torch.cuda.is_available(), "device",
               f"{device!r} was asked for, but this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False; "
               f"a CPU-only build or no driver): use cpu")
        _check(d.index is None or d.index < torch.cuda.device_count(), "device",
               f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    if d.type == "mps":
        _check(torch.backends.mps.is_available(), "device", f"{device!r} was asked for, but MPS is not available")
        return
    raise RecipeError("device", f"{device!r} is not supported: use cpu or cuda")


def is_lrkd_output(path: str) -> bool:
    """A folder a recipe wrote: it holds the run file, or only what an unfinished run leaves
    (``checkpoints/``, the diagnostics plot)."""
    entries = set(os.listdir(path))
    return RUN_FILE in entries or (bool(entries) and entries <= {"checkpoints", "diagnostics.png"})


def check_output(output: str, overwrite: bool = False) -> None:
    """RecipeError unless ``output`` can take a student: a new folder (its parent not a file and
    writable), an empty one, a previous recipe output (:func:`is_lrkd_output`), or any folder
    with ``overwrite``."""
    if os.path.exists(output):
        _check(os.path.isdir(output), "output", f"{output!r} is a file, not a folder: give a folder for the student")
        entries = sorted(os.listdir(output))
        _check(not entries or overwrite or is_lrkd_output(output), "output",
               f"{output!r} is a folder with other files in it ({', '.join(entries[:3])}"
               f"{', ...' if len(entries) > 3 else ''}) and no {RUN_FILE}, so not a previous lrkd-fast output: "
               f"give a new or empty folder, or write into it anyway with overwrite (--overwrite)")
        _check(os.access(output, os.W_OK), "output", f"{output!r} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    _check(os.path.isdir(parent), "output", f"{output!r} cannot be created: {parent!r} is a file")
    _check(os.access(parent, os.W_OK), "output", f"{output!r} cannot be created: {parent!r} is not writable")


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _offline() -> bool:
    """No downloads: HF_HUB_OFFLINE set (anything but 0), or unset (this package never downloads unasked)."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off", "")


def check_teacher(name_or_path: Optional[str], field: str = "teacher") -> None:
    """A clear RecipeError, before anything is loaded, for a teacher that cannot load: a path that
    does not exist or is not a model folder, or a hub name that is not in the local cache while
    downloads are off (``HF_HUB_OFFLINE`` unset or 1)."""
    if name_or_path is None:
        return
    _check(isinstance(name_or_path, str) and name_or_path.strip() != "", field,
           f"must be a model folder or a hub name, got {name_or_path!r}")
    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        _check(os.path.isdir(path), field, f"{name_or_path!r} is a file: give the model's folder")
        _check(os.path.isfile(os.path.join(path, "config.json")), field,
               f"{name_or_path!r} is not a model folder (it has no config.json)")
        return
    local = name_or_path.startswith(("./", "../", "/", "~", ".")) or (os.altsep and os.altsep in name_or_path) \
        or not _HUB_NAME.fullmatch(name_or_path)
    _check(not local, field, f"no such folder: {name_or_path!r}")
    if not _offline():
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    _check(isinstance(cached, str), field,
           f"no such folder {name_or_path!r}, and no model of that name in the local Hugging Face cache (downloads "
           f"are off; set HF_HUB_OFFLINE=0 to allow them, or download it first with: hf download {name_or_path})")


def check_before_loading(r: Recipe) -> Optional[dict]:
    """Every path setting of ``r`` checked before a model is loaded: ``output`` (:func:`check_output`),
    ``data``, ``teacher`` (:func:`check_teacher`) and ``resume``. Returns the resume checkpoint (read
    with :func:`~lrkd_fast.training.read_checkpoint`: tensors and plain data only), or None."""
    from ..training import CheckpointError, read_checkpoint

    check_output(r.output, r.overwrite)
    if r.data is not None:
        _check(isinstance(r.data, str) and os.path.exists(r.data), "data", f"{r.data!r} does not exist")
    check_teacher(r.teacher)
    if r.resume is None:
        return None
    try:
        return read_checkpoint(r.resume)
    except (CheckpointError, FileNotFoundError) as exc:
        raise RecipeError("resume", str(exc)) from None


def diagnostics_settings(r: Recipe) -> dict:
    """TrainConfig fields for the recipe's representation diagnostics: every ``r.diagnostics_every``
    steps, plotted to ``output/diagnostics.png``."""
    return dict(diagnostics_every=r.diagnostics_every, diagnostics_plot=os.path.join(r.output, "diagnostics.png"))


def diagnostics_batches(r: Recipe, pre: "Prepared") -> Optional[list]:
    """The batches the diagnostics are measured on: two batches of the first held-out texts, in their
    order (which layer lags on text the student never trained on; the measuring batches are ordered by
    length, so their first ones would be the shortest texts), or None when they are off."""
    if not r.diagnostics_every:
        return None
    return list(TextBatches(pre.held[:128], pre.tok, 64, r.seq_len, shuffle=False, device=pre.device))


BUILTIN_HELDOUT = 512  # pydoc sentences held out from the built-in corpus
OTHER_NAME = "stdlib"  # the built-in corpus's other-source held-out set: CPython's standard-library docstrings


def default_heldout(n_texts: int) -> int:
    """Held-out texts for ``n_texts`` when none is asked for: 10%, at least 2, at most 512."""
    return min(HELDOUT_CAP, max(2, round(HELDOUT_FRACTION * n_texts)))


def init_distributed(device: Optional[str]) -> tuple[int, int, str]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL
    with one GPU per process (LOCAL_RANK) when CUDA is available, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    use_nccl = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_nccl else "gloo")
    if use_nccl:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return dist.get_rank(), dist.get_world_size(), device


def load_teacher(name_or_path: Optional[str], device: str, skeleton_dtype: Optional[torch.dtype] = None,
                 attn_implementation: Optional[str] = None):
    """(model, tokenizer) from a local path or an offline-cached hub name; the packaged MiniLM by default;
    ``attn_implementation``: transformers' attention kernel (None: its default).
    ``skeleton_dtype``: build the model from its config in that dtype with its parameters on the meta
    device (no weights read; :func:`lrkd_fast.sharding.parameters_on_meta`) and its buffers on the CPU
    (``device`` is not used)."""
    import transformers

    check_teacher(name_or_path)
    path = os.path.expanduser(name_or_path) if name_or_path else packaged_minilm_path()
    # a hub name is read from the local cache only, unless HF_HUB_OFFLINE=0 allows downloads: setting the
    # variable here would come too late (huggingface_hub reads it on import), so every call says so
    kw = {"local_files_only": True} if not os.path.isdir(path) and _offline() else {}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load teacher {path!r}: {exc}") from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = transformers.AutoModelForCausalLM if ("CausalLM" in arch or "LMHead" in arch) else transformers.AutoModel
    check_attn_implementation(attn_implementation)
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if skeleton_dtype is not None:
        from ..sharding import parameters_on_meta

        with parameters_on_meta():
            model = cls.from_config(config, dtype=skeleton_dtype, **attn)
        model = model.eval()  # the buffers on the CPU: sharding moves them
    else:
        model = cls.from_pretrained(path, **kw, **attn).to(device).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


@dataclass
class Row:
    label: str
    fidelity: EmbeddingFidelity  # on the held-out texts
    params: int
    seconds: float
    other: Optional[EmbeddingFidelity] = None  # on the other-source held-out set (built-in data)


@dataclass
class RecipeResult:
    rows: list = field(default_factory=list)  # Row per stage
    output: str = ""
    rank: int = 0  # process rank under torchrun (only rank 0 saves and prints)
    history: dict = field(default_factory=dict)
    swap_report: object = None
    notes: list = field(default_factory=list)  # what the table alone does not say
    saved: str = ""  # which student was saved: "distilled" or "start"
    total_seconds: float = 0.0
    other_name: str = ""  # the second held-out set's source ("" when there is none)
    train_counts: dict = field(default_factory=dict)  # built-in data: training texts per source
    pydoc_repeats: int = 1  # built-in data: times each pydoc training sentence is in an epoch

    def table(self) -> str:
        """One line per stage: fidelity (mean / min cosine, pairwise-similarity Spearman, nearest-neighbour
        agreement; then mean cosine and Spearman on the other-source set), parameters, the stage's seconds."""
        other = bool(self.other_name)
        head = ["model", "mean cos", "Spearman", "min cos", "NN agree"] + \
            ([f"{self.other_name} cos", "Spearman"] if other else []) + ["params", "stage time s"]
        body = []
        for r in self.rows:
            f, o = r.fidelity, r.other
            row = [r.label, f"{f.mean_cosine:.4f}", f"{f.spearman:.4f}", f"{f.min_cosine:.4f}", f"{f.nn_agreement:.3f}"]
            if other:
                row += [f"{o.mean_cosine:.4f}", f"{o.spearman:.4f}"] if o is not None else ["", ""]
            body.append(row + [f"{r.params:,}", f"{r.seconds:.1f}"])
        return format_table(head, body)


@dataclass
class Prepared:
    """What every recipe starts from: the process layout, teacher, tokenizer and the text split."""
    rank: int
    world: int
    device: str
    teacher: object
    tok: object
    train: list
    held: list
    result: RecipeResult
    heldout: int
    held_batches: list  # the held-out texts, tokenized for evaluation
    started: float  # time.time() when the recipe started
    recipe: Recipe
    checkpoint: Optional[dict] = None  # the resume checkpoint, read before anything was loaded
    other_batches: list = field(default_factory=list)  # the built-in data's second held-out set (another source)
    _teacher_emb: dict = field(default_factory=dict)
    store: Optional[object] = None  # a token store (lrkd_fast.packed.TokenStore) given as data
    train_tokens: int = 0  # with a store: its tokens before the held-out documents, the training stream

    def measure(self, fidelity) -> dict:
        """Row fields ``fidelity`` and ``other`` for a student: ``fidelity(batches, teacher_embeddings)``
        on the held-out texts and, with the built-in data, on the other-source held-out set."""
        from ..evaluate import sentence_embeddings

        out = {}
        for key, batches in (("fidelity", self.held_batches), ("other", self.other_batches)):
            if batches:
                if key not in self._teacher_emb:
                    self._teacher_emb[key] = sentence_embeddings(self.teacher, batches)
                out[key] = fidelity(batches, self._teacher_emb[key])
        return out

    def train_batches(self) -> "TextBatches":
        """This process's shuffled training batches (of a token store: packed, no attention across documents)."""
        r = self.recipe
        if self.store is not None:
            from ..clone.families import family_for
            from ..packed import PackedBatches

            return PackedBatches(self.store, r.batch_size, r.seq_len, rank=self.rank, world_size=self.world,
                                 **packed_layout(r.attn_implementation),
                                 seed=r.seed, causal=family_for(self.teacher).causal, labels=False, drop_last=True,
                                 mask_dtype=next(self.teacher.parameters()).dtype, token_range=(0, self.train_tokens),
                                 device=self.device)
        return TextBatches(self.train, self.tok, r.batch_size, r.seq_len, seed=r.seed, device=self.device,
                           rank=self.rank, world_size=self.world)

    def eval_batches(self, texts: list) -> list:
        """Batches of ``texts`` for measuring (ordered by length: little padding; teacher and student get the same)."""
        return length_batches(texts, self.tok, 64, self.recipe.seq_len, self.device)


def length_batches(texts: list, tok, batch_size: int, seq_len: int, device) -> list:
    """Every text of ``texts`` once, in batches of similar lengths (:func:`~lrkd_fast.data.by_length`);
    none for no texts."""
    from ..data import by_length

    if not texts:
        return []
    return list(TextBatches(by_length(texts, tok, seq_len), tok, batch_size, seq_len, shuffle=False, device=device))


def load_teacher_on_rank0(name_or_path: Optional[str], rank: int, attn_implementation: Optional[str] = None):
    """:func:`load_teacher` for a run that shards the teacher from rank 0's copy
    (``shard_training(..., from_rank0=True)``): rank 0 reads the weights into CPU memory, every other
    process builds the skeleton (parameters on the meta device) in rank 0's dtype. A collective."""
    import torch.distributed as dist

    model = tok = None
    if rank == 0:
        model, tok = load_teacher(name_or_path, "cpu", attn_implementation=attn_implementation)
    box = [next(model.parameters()).dtype if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if rank != 0:
        model, tok = load_teacher(name_or_path, "cpu", skeleton_dtype=box[0], attn_implementation=attn_implementation)
    return model, tok


def _load(r: Recipe, rank: int, world: int, device: str):
    if getattr(r, "fsdp", False) and world > 1:  # the teacher whole on rank 0's CPU only, sharded from there
        return load_teacher_on_rank0(r.teacher, rank, r.attn_implementation)
    return load_teacher(r.teacher, device, attn_implementation=r.attn_implementation)


def prepare(r: Recipe, token_store: bool = False) -> Prepared:
    """Check the paths (:func:`check_before_loading`), join torchrun if launched by it, read the text and
    hold out texts for the table (before any model is loaded), load the teacher (a sharded run: on rank
    0's CPU only, :func:`load_teacher_on_rank0`). ``token_store``: the recipe can train on a token store
    given as ``data`` (:func:`_prepare_store`)."""
    t0 = time.time()
    checkpoint = check_before_loading(r)
    rank, world, device = init_distributed(r.device)
    from ..packed import is_token_store

    if r.data and is_token_store(r.data):
        return _prepare_store(r, token_store, t0, checkpoint, rank, world, device)
    texts = read_texts(r.data) if r.data else pydoc_sentences()
    heldout = (default_heldout(len(texts)) if r.data else BUILTIN_HELDOUT) if r.heldout is None else r.heldout
    need = max(r.batch_size * world, 2)
    if len(texts) - heldout < need:
        what = "" if r.heldout is None else f"{heldout} held-out texts plus "
        raise RecipeError("heldout" if r.heldout is not None else "data",
                          f"the data has {len(texts)} texts: too few for {what}{need} training texts "
                          f"(one batch of batch_size x processes){'; lower heldout' if r.heldout else ''}")
    other, counts = [], {}
    if r.data:
        train, held = split_texts(texts, heldout, seed=r.seed)
    else:  # pydoc's held-out split, the package docstrings to train on, the standard library held out too
        try:
            split = builtin_split(heldout, seed=r.seed, corpus_size=r.corpus_size, progress=r.progress and rank == 0,
                                  pydoc_repeats=r.resolved_pydoc_repeats)
        except ValueError as exc:
            raise RecipeError("corpus_size", str(exc).removeprefix("corpus_size ")) from None
        train, held, other, counts = split.train, split.held, split.other, split.counts
    torch.manual_seed(r.seed)
    model, tok = _load(r, rank, world, device)
    result = RecipeResult(output=r.output, rank=rank, other_name=OTHER_NAME if other else "", train_counts=counts,
                          pydoc_repeats=r.resolved_pydoc_repeats if other else 1)
    result.rows.append(Row("teacher", EmbeddingFidelity(1.0, 1.0, 1.0, len(held), 1.0),
                           sum(p.numel() for p in model.parameters()), time.time() - t0,
                           EmbeddingFidelity(1.0, 1.0, 1.0, len(other), 1.0) if other else None))
    pre = Prepared(rank, world, device, model, tok, train, held, result, heldout, [], t0, r, checkpoint)
    pre.held_batches = pre.eval_batches(held)
    pre.other_batches = pre.eval_batches(other) if other else []
    return pre


def _prepare_store(r: Recipe, allowed: bool, t0: float, checkpoint, rank: int, world: int, device: str) -> Prepared:
    """:func:`prepare` for a token store (``lrkd-fast tokenize``): its last ``heldout`` documents are held
    out, training reads the tokens before them packed (:meth:`Prepared.train_batches`), and the
    held-out, calibration and read-out texts are documents decoded with the teacher's tokenizer."""
    from ..packed import TokenStore, store_split, store_texts

    if not allowed:
        raise RecipeError("data", f"{r.data!r} is a token store (lrkd-fast tokenize): --method lrc trains on one; "
                                  "give this method a text or .jsonl file")
    store = TokenStore(r.data)
    n = len(store)
    heldout = default_heldout(n) if r.heldout is None else r.heldout
    field_ = "heldout" if r.heldout is not None else "data"
    _check(heldout < n, field_, f"the token store has {n} documents: too few to hold out {heldout}")
    end = store_split(store, heldout)
    need = r.batch_size * world
    _check(end // r.seq_len >= need, field_,
           f"the token store's {n - heldout} training documents make {end // r.seq_len} sequences of {r.seq_len} "
           f"tokens: too few for one batch of batch_size x processes ({need})")
    torch.manual_seed(r.seed)
    model, tok = _load(r, rank, world, device)
    try:
        store.check_tokenizer(tok)
    except ValueError as exc:
        raise RecipeError("data", f"{exc}; tokenize it with the teacher's (lrkd-fast tokenize --tokenizer TEACHER)") \
            from None
    train, held = store_texts(store, tok, heldout, max(getattr(r, "fit_texts", 0), r.calib_texts))
    result = RecipeResult(output=r.output, rank=rank)
    result.rows.append(Row("teacher", EmbeddingFidelity(1.0, 1.0, 1.0, len(held), 1.0),
                           sum(p.numel() for p in model.parameters()), time.time() - t0))
    pre = Prepared(rank, world, device, model, tok, train, held, result, heldout, [], t0, r, checkpoint,
                   store=store, train_tokens=end)
    pre.held_batches = pre.eval_batches(held)
    return pre


def finish_output(r: Recipe, method: str, heldout: int, extra: Optional[dict] = None,
                  history: Optional[dict] = None) -> None:
    """After a successful save: write what the student was distilled from (``RUN_FILE``, read by
    ``lrkd-fast eval``; with the training ``history``, its steps and per-step losses) and remove the final
    resume checkpoint unless ``keep_checkpoints``."""
    run = {"format": 1, "method": method, "teacher": r.teacher, "data": r.data, "heldout": heldout, "seed": r.seed,
           "seq_len": r.seq_len, **(extra or {}), "recipe": asdict(r)}
    if history:
        run["training"] = {"steps": len(history.get("step", [])), "loss": list(history.get("loss", [])),
                           "seconds": history.get("seconds"), "stopped_early": history.get("stopped_early")}
    with open(os.path.join(r.output, RUN_FILE), "w") as f:
        json.dump(run, f, indent=1, default=str)
    if r.keep_checkpoints:
        return
    ckpt = os.path.join(r.output, "checkpoints")
    last = os.path.join(ckpt, "last.pt")
    if os.path.exists(last):
        from ..sharding import remove_checkpoint

        remove_checkpoint(last)  # with a sharded run's shard folders
    if os.path.isdir(ckpt) and not os.listdir(ckpt):
        shutil.rmtree(ckpt)


def read_run_file(path: str) -> dict:
    """The ``RUN_FILE`` of a saved student ({} when it was not saved by a recipe)."""
    full = os.path.join(path, RUN_FILE)
    if not os.path.exists(full):
        return {}
    with open(full) as f:
        return json.load(f)


def keep_better(result: RecipeResult, start: Row, end: Row, restore, save_worse: bool) -> None:
    """When ``end`` is worse than ``start`` (held-out mean cosine): say so in the table and, unless
    ``save_worse``, call ``restore()`` so the start is what gets saved."""
    result.saved = "distilled"
    if end.fidelity.mean_cosine >= start.fidelity.mean_cosine:
        return
    end.label += ", worse than start"
    if save_worse:
        result.notes.append(f"distillation ended worse than it started (held-out mean cos "
                            f"{end.fidelity.mean_cosine:.4f} < {start.fidelity.mean_cosine:.4f}); the distilled "
                            "student was saved anyway (save_worse / --save-worse)")
        return
    restore()
    result.saved = "start"
    result.notes.append(f"distillation ended worse than it started (held-out mean cos "
                        f"{end.fidelity.mean_cosine:.4f} < {start.fidelity.mean_cosine:.4f}): the start was saved "
                        "instead (save_worse / --save-worse keeps the distilled one); more steps or data usually help")
