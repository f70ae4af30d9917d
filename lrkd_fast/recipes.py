"""End-to-end recipes behind ``lrkd-fast distill``: load, swap, distill, evaluate, save.

Kept apart from the CLI so the same run can be driven from Python::

    from lrkd_fast.recipes import SwapRecipe, run_swap_recipe
    result = run_swap_recipe(SwapRecipe(minutes=2))
    print(result.table())
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .data import TextBatches, packaged_minilm_path, pydoc_sentences, read_texts, split_texts
from .distillation import DistillConfig, Distiller
from .evaluate import EmbeddingFidelity, embedding_fidelity, sentence_embeddings
from .swap import ALLOCATIONS, LowRankConfig, save_lowrank, swap_linear_layers

__all__ = ["SwapRecipe", "RecipeResult", "run_swap_recipe", "load_teacher", "init_distributed"]


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


@dataclass
class SwapRecipe:
    teacher: Optional[str] = None  # path or hub name available offline; None = packaged all-MiniLM-L6-v2
    data: Optional[str] = None  # text or jsonl file; None = CPython's pydoc topics
    keep: Optional[float] = 0.5  # fraction of each swapped layer's parameters (ignored when rank is set)
    rank: Optional[int] = None
    target_modules: Union[str, list, None] = None  # None: the encoder/decoder blocks' linears
    init: str = "whitened"
    # None: "sensitivity" for a whitened init at a --keep fraction (the keep then sets the total budget,
    # spread by measured sensitivity: 0.956 vs 0.945 held-out cosine after ~9 min on MiniLM), else "uniform"
    allocation: Optional[str] = None
    calib_texts: int = 1024  # 1024 vs 256: 0.842 vs 0.830 start cosine on MiniLM
    heldout: int = 512
    # an upper bound: with a time budget the schedule follows the clock (800-1100 steps in 4 min on 2 CPU cores)
    steps: int = 10000
    # with ~75 s of loading, calibration, sensitivity and evaluation the whole run takes ~4 min 45 s on 2 CPU cores
    minutes: Optional[float] = 3.5
    # MiniLM, sensitivity ranks, held-out cosine: 3.5 min 0.9530 (3e-4) vs 0.9511 (7e-4); 8.6 min 0.9586 (3e-4),
    # 0.9575 (5e-4), 0.9556 (7e-4); min cosine higher at 3e-4 in both (uniform ranks, 4 min: 7e-4 > 1e-3)
    lr: float = 3e-4
    batch_size: int = 16  # more, smaller steps beat fewer large ones in a short budget (measured)
    train_norms: bool = True  # LayerNorm / RMSNorm weights and biases of the student train too
    train_bias: bool = True
    seq_len: int = 128
    teacher_cache: bool = True  # reuse the teacher's targets for texts seen before (~1.3x the steps on CPU)
    # clone every block's output but the last one's, which the pooled-embedding loss covers: on MiniLM
    # (4 min, 2 CPU cores) 0.935 held-out cosine vs 0.932 with every block; dropping two blocks: 0.933
    clone_modules: Union[str, list, None] = "inner"
    output: str = "runs/lowrank-student"
    device: Optional[str] = None
    seed: int = 0
    resume: Optional[str] = None
    checkpoint_every: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be None or one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation == "sensitivity" and self.init != "whitened":
            raise ValueError(f"allocation='sensitivity' needs init='whitened', got init={self.init!r}")


@dataclass
class RecipeResult:
    rows: list = field(default_factory=list)  # (label, EmbeddingFidelity, params, seconds)
    output: str = ""
    rank: int = 0  # process rank under torchrun (only rank 0 saves and prints)
    history: dict = field(default_factory=dict)
    swap_report: object = None

    def table(self) -> str:
        head = ["model", "mean cos", "min cos", "NN agree", "params", "time s"]
        body = [[lab, f"{f.mean_cosine:.4f}", f"{f.min_cosine:.4f}", f"{f.nn_agreement:.3f}", f"{p:,}", f"{s:.1f}"]
                for lab, f, p, s in self.rows]
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def load_teacher(name_or_path: Optional[str], device: str):
    """(model, tokenizer) from a local path or an offline-cached hub name; the packaged MiniLM by default."""
    import transformers

    path = name_or_path or packaged_minilm_path()
    if name_or_path and not os.path.exists(name_or_path) and os.environ.get("HF_HUB_OFFLINE") != "0":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast with a clear message
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load teacher {path!r}: {exc}") from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = transformers.AutoModelForCausalLM if ("CausalLM" in arch or "LMHead" in arch) else transformers.AutoModel
    model = cls.from_pretrained(path).to(device).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


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


def prepare(teacher: Optional[str], data: Optional[str], heldout: int, batch_size: int, device: Optional[str],
            seed: int, output: str) -> Prepared:
    """Join torchrun if launched by it, load the teacher and the text, hold out ``heldout`` texts."""
    rank, world, device = init_distributed(device)
    torch.manual_seed(seed)
    model, tok = load_teacher(teacher, device)
    texts = read_texts(data) if data else pydoc_sentences()
    if len(texts) < heldout + max(batch_size * world, 2):
        raise ValueError(f"data has {len(texts)} texts: too few for {heldout} held-out texts plus training "
                         f"(lower --heldout or give more data)")
    train, held = split_texts(texts, heldout, seed=seed)
    result = RecipeResult(output=output, rank=rank)
    result.rows.append(("teacher", EmbeddingFidelity(1.0, 1.0, 1.0, len(held)),
                        sum(p.numel() for p in model.parameters()), 0.0))
    return Prepared(rank, world, device, model, tok, train, held, result)


def _default_targets(model) -> str:
    from .swap import find_blocks

    blocks = find_blocks(model)
    if not blocks:
        return "all-linear"
    prefix = blocks[0].rsplit(".", 1)[0]
    return rf"{prefix.replace('.', chr(92) + '.')}\..*"


def run_swap_recipe(r: SwapRecipe) -> RecipeResult:
    t_start = time.time()
    pre = prepare(r.teacher, r.data, r.heldout, r.batch_size, r.device, r.seed, r.output)
    rank, world, device, teacher, tok = pre.rank, pre.world, pre.device, pre.teacher, pre.tok
    train, held, result = pre.train, pre.held, pre.result
    held_batches = list(TextBatches(held, tok, 64, r.seq_len, shuffle=False, device=device))
    t_emb = sentence_embeddings(teacher, held_batches)

    student = copy.deepcopy(teacher)
    allocation = r.allocation or ("sensitivity" if r.init == "whitened" and r.rank is None else "uniform")
    cfg = LowRankConfig(rank=r.rank if r.rank is not None else float(r.keep), allocation=allocation,
                        target_modules=r.target_modules or _default_targets(teacher), init=r.init)
    t0 = time.time()
    calib = list(TextBatches(train[:r.calib_texts], tok, 32, r.seq_len, shuffle=False, device=device))
    report = swap_linear_layers(student, cfg, calibration=calib, progress=r.progress and rank == 0)
    result.swap_report = report
    s_params = sum(p.numel() for p in student.parameters())
    fid0 = embedding_fidelity(sentence_embeddings(student, held_batches), t_emb)
    how = r.init if allocation == "uniform" else f"{r.init}, {allocation} ranks"
    result.rows.append((f"low-rank start ({how})", fid0, s_params, time.time() - t0))

    dcfg = DistillConfig(steps=r.steps, max_minutes=r.minutes, lr=r.lr, seed=r.seed, train_norms=r.train_norms,
                         train_bias=r.train_bias, teacher_cache=r.teacher_cache, clone_modules=r.clone_modules,
                         progress=r.progress and rank == 0,
                         checkpoint_dir=os.path.join(r.output, "checkpoints"), checkpoint_every=r.checkpoint_every)
    data = TextBatches(train, tok, r.batch_size, r.seq_len, seed=r.seed, device=device, rank=rank, world_size=world)
    t1 = time.time()
    d = Distiller(student, teacher, dcfg)
    try:
        result.history = d.train(data, resume_from=r.resume)
    finally:
        d.close()
    fid1 = embedding_fidelity(sentence_embeddings(student, held_batches), t_emb)
    result.rows.append((f"distilled ({len(result.history['step'])} steps)", fid1, s_params, time.time() - t1))
    if rank == 0:
        save_lowrank(student, r.output)
        tok.save_pretrained(r.output)
    result.rows.append(("saved student, total wall time", fid1, s_params, time.time() - t_start))
    return result
