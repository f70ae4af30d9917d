"""A saved student after distillation: load it, measure it against its teacher
(``lrkd-fast eval``), export it as a plain dense Hugging Face model (``lrkd-fast export``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._table import format_table
from ..data import TextBatches, builtin_split, packaged_minilm_path, read_texts, split_texts
from ..evaluate import EmbeddingFidelity, embedding_fidelity, readout_fidelity, sentence_embeddings, throughput
from ..model_utils import is_causal_lm
from ..swap import LAYOUT_FILE, load_lowrank, merge_linear_layers
from ..swap.io import model_class_for, weights_file_size
from .base import BUILTIN_HELDOUT, OTHER_NAME, check_device, default_heldout, load_teacher, read_run_file

__all__ = ["StudentReport", "evaluate_student", "export_merged", "load_student"]


def load_student(path: str, device: Optional[str] = None):
    """A saved student: a swapped model (``save_lowrank``) or a plain / Low-Rank Clone export."""
    import transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(f"student {path!r} is not a directory")
    if os.path.exists(os.path.join(path, LAYOUT_FILE)):
        return load_lowrank(path, device=device)
    if _read_config(path).get("architectures") == ["LRCBertModel"]:
        # a Low-Rank Clone of BERT: its class ships with lrkd_fast, no remote code needed
        from ..clone.model import lrc_bert_class

        model = lrc_bert_class().from_pretrained(path)
    else:
        model = model_class_for(transformers.AutoConfig.from_pretrained(path)).from_pretrained(path)
    return model.to(device or "cpu").eval()


def _read_config(path: str) -> dict:
    import json

    full = os.path.join(path, "config.json")
    if not os.path.exists(full):
        raise FileNotFoundError(f"{full} not found: {os.path.dirname(full)!r} holds no saved model")
    with open(full) as f:
        return json.load(f)


def _file_size(model, folder: Optional[str]) -> tuple[int, bool]:
    """(bytes, measured): the weight files in ``folder``, else the parameters' bytes in memory."""
    if folder and os.path.isdir(folder):
        try:
            return weights_file_size(folder), True
        except FileNotFoundError:
            pass
    return sum(p.numel() * p.element_size() for p in model.parameters()), False


@dataclass
class StudentReport:
    """Teacher and student side by side: fidelity on ``texts``, size, and speed on this device."""
    fidelity: EmbeddingFidelity
    params: dict  # "teacher" / "student" -> parameters
    file_bytes: dict  # -> bytes of the weight files (in-memory bytes when ``file_measured`` is False)
    file_measured: dict
    speed: dict  # -> texts/s (encoders) or generated tokens/s (causal LMs)
    speed_unit: str
    texts: str  # which texts the fidelity is on
    readout: bool  # fidelity through a ridge read-out (student narrower than the teacher)
    notes: list = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)  # block -> LayerDiagnostics (teacher vs student)
    other: Optional[EmbeddingFidelity] = None  # built-in data: on the other-source held-out set
    other_name: str = ""

    def diagnostics_table(self) -> str:
        """Per-block linear CKA and Gaussian MI between teacher and student ('' when not measured)."""
        from ..diagnostics import format_diagnostics

        return format_diagnostics(self.diagnostics) if self.diagnostics else ""

    def table(self) -> str:
        f, o = self.fidelity, self.other
        extra = [f"{self.other_name} cos", "Spearman"] if o is not None else []
        head = ["model", "mean cos", "Spearman", "min cos", "NN agree", *extra, "params", "weights MB", self.speed_unit]

        def size(k):
            return f"{self.file_bytes[k] / 1e6:.1f}" + ("" if self.file_measured[k] else " (in memory)")

        ones = ["1.0000"] * len(extra)
        rows = [["teacher", "1.0000", "1.0000", "1.0000", "1.000", *ones, f"{self.params['teacher']:,}",
                 size("teacher"), f"{self.speed['teacher']:.1f}"],
                ["student", f"{f.mean_cosine:.4f}", f"{f.spearman:.4f}", f"{f.min_cosine:.4f}", f"{f.nn_agreement:.3f}",
                 *([f"{o.mean_cosine:.4f}", f"{o.spearman:.4f}"] if o is not None else []),
                 f"{self.params['student']:,}", size("student"), f"{self.speed['student']:.1f}"],
                ["student / teacher", "", "", "", "", *[""] * len(extra),
                 f"{self.params['student'] / self.params['teacher']:.1%}",
                 f"{self.file_bytes['student'] / self.file_bytes['teacher']:.1%}",
                 f"{self.speed['student'] / self.speed['teacher']:.2f}x"]]
        return format_table(head, rows)


def _texts(run: dict, data: Optional[str], max_texts: Optional[int], tok=None) -> tuple[list, list, str, list]:
    """(texts to compare on, training texts for a read-out fit, description, other-source held-out texts
    of a built-in-data run or [])."""
    from ..packed import TokenStore, is_token_store, store_texts

    run_data, other = run.get("data"), []
    if run_data and is_token_store(run_data):  # trained on a token store: its last documents were held out
        store = TokenStore(run_data)
        train, held = store_texts(store, tok, run.get("heldout") or default_heldout(len(store)),
                                  run.get("fit_texts", 512))
    elif run_data:
        source = read_texts(run_data)
        train, held = split_texts(source, run.get("heldout") or default_heldout(len(source)), seed=run.get("seed", 0))
    else:  # the built-in corpus, split as the run split it
        split = builtin_split(run.get("heldout") or BUILTIN_HELDOUT, seed=run.get("seed", 0),
                              corpus_size=(run.get("recipe") or {}).get("corpus_size"))
        train, held, other = split.train, split.held, split.other
    if data:
        texts = read_texts(data)
        what = f"{data}"
    else:
        texts = held
        what = "the held-out texts of its training run" if run else \
            "held-out texts of the built-in data (no lrkd_fast_run.json: the split may overlap its training)"
    if max_texts is not None:
        texts = texts[:max_texts]
    if len(texts) < 2:
        raise ValueError(f"need at least 2 texts to compare, got {len(texts)}")
    return texts, train, f"{len(texts)} texts: {what}", other if not data else []


def evaluate_student(path: str, teacher: Optional[str] = None, data: Optional[str] = None,
                     max_texts: Optional[int] = 512, device: Optional[str] = None, batch_size: int = 32,
                     speed_batches: int = 4, repeats: int = 3, diagnostics_texts: int = 128) -> StudentReport:
    """Compare the student saved in ``path`` with its teacher (``teacher``, else the one recorded at
    training time, else the packaged MiniLM) on ``data`` (else the run's held-out texts).

    diagnostics_texts: the first this many of those texts also give per-block linear CKA and Gaussian
    MI between teacher and student block outputs (``report.diagnostics``; 0: not measured).
    """
    if isinstance(diagnostics_texts, bool) or not isinstance(diagnostics_texts, int) or diagnostics_texts < 0:
        raise ValueError(f"diagnostics_texts must be an int >= 0, got {diagnostics_texts!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(speed_batches, bool) or not isinstance(speed_batches, int) or speed_batches < 1:
        raise ValueError(f"speed_batches must be an int >= 1, got {speed_batches!r}")
    run = read_run_file(path)
    check_device(device)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"student {path!r} is not a directory")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher_name = teacher if teacher is not None else run.get("teacher")
    t_model, tok = load_teacher(teacher_name, device)
    student = load_student(path, device)
    seq_len = run.get("seq_len", 128)
    texts, train, what, other = _texts(run, data, max_texts, tok)
    batches = list(TextBatches(texts, tok, batch_size, seq_len, shuffle=False, device=device))
    t_emb, s_emb = sentence_embeddings(t_model, batches), sentence_embeddings(student, batches)
    readout = s_emb.shape[1] != t_emb.shape[1]
    if readout:
        fit = list(TextBatches(train[:run.get("fit_texts", 512)], tok, batch_size, seq_len, shuffle=False,
                               device=device))
        s_fit, t_fit = sentence_embeddings(student, fit), sentence_embeddings(t_model, fit)

    def fidelity(s_emb, t_emb):
        return readout_fidelity(s_fit, t_fit, s_emb, t_emb) if readout else embedding_fidelity(s_emb, t_emb)

    fid = fidelity(s_emb, t_emb)
    other_fid = None
    if other:
        o_batches = list(TextBatches(other[:max_texts], tok, batch_size, seq_len, shuffle=False, device=device))
        other_fid = fidelity(sentence_embeddings(student, o_batches), sentence_embeddings(t_model, o_batches))
    causal = is_causal_lm(t_model)
    if causal:  # prompts for generate(): short and left-padded
        side, tok.padding_side = tok.padding_side, "left"
        try:
            speed_in = list(TextBatches(texts[:batch_size * speed_batches], tok, batch_size, 32, shuffle=False,
                                        device=device))
        finally:
            tok.padding_side = side
    else:
        speed_in = batches[:speed_batches]
    speed = throughput({"teacher": t_model, "student": student}, speed_in, repeats=repeats)
    t_folder = teacher_name if teacher_name and os.path.isdir(teacher_name) else \
        (packaged_minilm_path() if teacher_name is None else None)
    sizes = {"teacher": _file_size(t_model, t_folder), "student": _file_size(student, path)}
    report = StudentReport(fid, {k: sum(p.numel() for p in m.parameters()) for k, m in
                                 (("teacher", t_model), ("student", student))},
                           {k: v[0] for k, v in sizes.items()}, {k: v[1] for k, v in sizes.items()}, speed,
                           "gen tok/s" if causal else "texts/s", what, readout, other=other_fid,
                           other_name=OTHER_NAME if other_fid is not None else "")
    if readout:
        report.notes.append("the student is narrower than the teacher: fidelity through a ridge read-out fitted on "
                            "training texts")
    if diagnostics_texts:
        report.diagnostics = _block_diagnostics(t_model, student, batches[:-(-diagnostics_texts // batch_size)],
                                                report.notes)
    return report


def _block_diagnostics(teacher, student, batches, notes: list) -> dict:
    """Per-block CKA / MI when teacher and student have the same blocks; else a note says why not."""
    from ..diagnostics import representation_diagnostics
    from ..model_utils import find_blocks

    blocks = find_blocks(student)
    if not blocks or blocks != find_blocks(teacher):
        notes.append("no per-block diagnostics: teacher and student do not have the same transformer blocks")
        return {}
    try:
        return representation_diagnostics(teacher, student, batches, sites=blocks)
    except ValueError as exc:  # e.g. too few token rows for the MI's components
        notes.append(f"no per-block diagnostics: {exc}")
        return {}


def export_merged(path: str, out: str) -> str:
    """Merge the low-rank layers of the student saved in ``path`` back into dense ones and save a plain
    Hugging Face model (and the tokenizer, when there is one) to ``out``, which
    ``AutoModel*.from_pretrained(out)`` loads without lrkd_fast."""
    import transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(f"student {path!r} is not a directory")
    if not os.path.exists(os.path.join(path, LAYOUT_FILE)):
        raise ValueError(f"{path!r} has no {LAYOUT_FILE}: it is not a swapped (low-rank) student, so there is "
                         "nothing to merge (a Low-Rank Clone export is already a plain model)")
    if os.path.abspath(out) == os.path.abspath(path):
        raise ValueError("the merged model must go to another folder than the student")
    model = merge_linear_layers(load_lowrank(path))
    model.save_pretrained(out, safe_serialization=True)
    try:
        transformers.AutoTokenizer.from_pretrained(path).save_pretrained(out)
    except (OSError, ValueError):
        pass  # saved without a tokenizer
    return out
