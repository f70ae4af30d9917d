"""Low-Rank Clone (Hao et al. 2025): a width-d_S student whose weights are functions of the frozen
teacher's weights and trainable projections (arXiv:2505.12781).

How it is built
---------------
* The student is a real Hugging Face model of the teacher's family (config copied, hidden_size = d_S,
  head_dim written explicitly, heads / FFN width unchanged), constructed on the ``meta`` device: it
  holds no memory and nothing in it trains. Its buffers (rotary tables, BERT position ids) are the
  teacher's own tensors (they do not depend on the hidden size).
* What trains (``LowRankClone.parameters()``): one projection (d_T, d_S) per weight matrix per
  layer (``share_qkv`` / ``share_gate_up`` tie q=k=v and gate=up as in the paper's ablation), the
  embedding/head projection P_emb, and the student's norms (init 1, LayerNorm bias 0).
* A "plan" maps every student parameter to a rule (family data, ``families.py``): input-side
  ``W_T @ P``, output-side ``P^T @ W_T`` and bias ``b_T @ P``, embeddings ``E_T @ P_emb``, head
  ``W_head @ P_emb``, trainable norm, or the teacher tensor unchanged (q/k/v biases, Qwen3 q/k_norm).
  The teacher is never copied.

Co-training forward
-------------------
Teacher and student advance block by block. The inputs each HF model gives its blocks (attention
mask in whatever form the installed transformers builds it, rotary cos/sin, position ids) are
captured by running each model's own forward up to its first block (a pre-hook stops it there), so
no private mask/rotary helper is called and the loop works across transformers versions. Then per
block: the teacher block under no_grad (forward hooks keep its q/k/v/gate/up outputs and its
attention / FFN block outputs), the student block via ``torch.func.functional_call`` with that
block's freshly formed weights (optionally under gradient checkpointing), and the block's clone
terms go through ONE fused ``clone_loss`` call, after which the teacher activations are dropped.

Association order for input-side sites (``association="auto"``): forming W_S = W_T P costs
2 d_m d_T d_S flops and then 2 M d_S d_m per application, the factorized (x P^T) W_T^T costs
2 M d_S d_T + 2 M d_T d_m (M tokens). "auto" takes the cheaper per site and step (formed unless
the step has few tokens, roughly M < d_S d_m / (d_T + d_m - d_S)); the factorized order is applied by
a pre-hook that maps the block input through P and feeds the teacher weight to the same module.

The attention-output clone term (``attn_clone``)
-----------------------------------------------
LRC keeps the teacher's heads and head_dim, so the student's attention result a_S (the per-head
attention output, heads concatenated: the input of its o_proj, width heads * head_dim, in the
teacher's head layout) has the teacher's shape, and the student's o_proj is P_o^T W_o:
o_S = a_S W_o^T P_o (+ b_o P_o where the family has an o_proj bias).

* ``"student"`` (the paper's form): E(o_S, o_T P_o), compared in the student width d_S; the
  gradient reaches P_o through both sides.
* ``"teacher"`` (the authors' code's form): E(o_S', o_T) with o_S' = a_S W_o^T (+ b_o), the
  student's attention result passed through the TEACHER's o_proj, compared in the teacher width
  d_T before the down projection; o_S' does not involve P_o, so no gradient reaches P_o from this
  term (P_o still trains through everything downstream). The student's o_proj then runs in that
  order, o_S = o_S' P_o (a forward hook), so o_S' costs no extra matmul.

Loss:  kd_weight * KL_T(p_T || p_S) [batchmean, no T^2] + lm_weight * CE + alpha * sum_layers clone
(causal LMs). Encoders (BERT) have no LM head: the output term is 1 - cos(mean_pool(h_S),
mean_pool(h_T) @ P_emb) per text, averaged, weighted by kd_weight. Padding (attention_mask 0) rows
are left out of every term.

Layout: this file is one class (about 640 lines with this docstring) whose plan, forward and export
share all of its state; the BERT student class (``lrc_bert.py``), the pca init (``pca.py``) and the
trainer (``trainer.py``) sit beside it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..model_utils import capture_inputs, first_tensor
from ..ops import clone_loss, kd_loss
from .families import family_for
from .lrc_bert import LRC_BERT_SOURCE, lrc_bert_class
from .pca import norm_through, principal_subspace

__all__ = ["ATTN_CLONES", "DEFAULT_ATTN_CLONE", "INITS", "LRC_BERT_SOURCE", "CloneOutput", "LRCLoss", "LowRankClone", "lrc_bert_class"]

INITS = ("random", "pca", "identity")
ATTN_CLONES = ("student", "teacher")
DEFAULT_ATTN_CLONE = "teacher"  # chosen by measurement: benchmarks/results/lrc_attn_clone

# ----------------------------------------------------------------------------- helpers

def _block_inputs(first_block: nn.Module, call):
    """(hidden, extra args, kwargs) the model's own forward passes to its first block."""
    args, kwargs = capture_inputs(first_block, call)
    if args:
        return args[0], tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def _get(model: nn.Module, path: str):
    return model.get_submodule(path) if path else model


@dataclass(frozen=True)
class LRCLoss:
    """The weights of the Low-Rank Clone loss (module docstring): ``alpha`` on the clone terms,
    ``temperature`` of the KL, ``kd_weight`` on the KL (encoders: on the embedding cosine term),
    ``lm_weight`` on the next-token cross-entropy. The defaults are the paper's."""

    alpha: float = 0.2
    temperature: float = 40.0
    kd_weight: float = 1.0
    lm_weight: float = 1.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{f.name} must be a finite number >= 0, got {v!r}")
        if self.temperature == 0:
            raise ValueError("temperature must be > 0, got 0")


@dataclass
class CloneOutput:
    loss: torch.Tensor
    parts: dict  # floats: loss, kd, lm (or embed), clone, clone_<site> (mean over layers)


# ----------------------------------------------------------------------------- the clone

class LowRankClone(nn.Module):
    """A Low-Rank Clone student of a frozen Hugging Face teacher; see the module docstring.

    Build with :meth:`from_teacher`. ``forward(input_ids, attention_mask=None, ...)`` returns a
    :class:`CloneOutput` (loss with gradients into the projections and norms, and float parts);
    :meth:`export_student` returns the plain HF student.
    """

    def __init__(self, teacher: nn.Module, student_hidden_size: int, *, init: str = "random",
                 init_std: float = 0.02, share_qkv: bool = False, share_gate_up: bool = False,
                 loss: Optional[LRCLoss] = None, clone_weights: Optional[dict] = None,
                 gradient_checkpointing: bool = False, association: str = "auto", calibration=None,
                 separate_parts: bool = False, attn_clone: str = DEFAULT_ATTN_CLONE, tie_head_projection: bool = True,
                 **loss_fields):
        super().__init__()
        if loss is not None and not isinstance(loss, LRCLoss):
            raise TypeError(f"loss must be an LRCLoss, got {type(loss).__name__}")
        try:  # alpha=..., temperature=... override single fields of ``loss``
            loss = dataclasses.replace(loss or LRCLoss(), **loss_fields)
        except TypeError:
            unknown = sorted(set(loss_fields) - {f.name for f in dataclasses.fields(LRCLoss)})
            raise TypeError(f"LowRankClone got unexpected keyword arguments {unknown}") from None
        fam = family_for(teacher)
        if fam.base and hasattr(teacher, fam.base) and not fam.causal:
            teacher = getattr(teacher, fam.base)  # BERT task model: clone its encoder
        tcfg = teacher.config
        d_T = tcfg.hidden_size
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not isinstance(student_hidden_size, int) or student_hidden_size < 1:
            raise ValueError(f"student_hidden_size must be a positive int, got {student_hidden_size!r}")
        if init == "identity":
            if student_hidden_size != d_T:
                raise ValueError(f"init='identity' needs student_hidden_size == teacher hidden size {d_T}")
        elif student_hidden_size >= d_T:
            raise ValueError(f"student_hidden_size ({student_hidden_size}) must be smaller than the teacher's "
                             f"hidden size ({d_T})")
        if association not in ("auto", "formed", "factorized"):
            raise ValueError(f"association must be 'auto', 'formed' or 'factorized', got {association!r}")
        if attn_clone not in ATTN_CLONES:
            raise ValueError(f"attn_clone must be one of {ATTN_CLONES}, got {attn_clone!r}")
        if not isinstance(tie_head_projection, bool):
            raise TypeError(f"tie_head_projection must be a bool, got {type(tie_head_projection).__name__}")
        if not tie_head_projection and fam.head is None:
            raise ValueError(f"tie_head_projection=False needs a family with an LM head; {fam.name} has none")
        layer_types = getattr(tcfg, "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            # the block inputs are captured once (at block 0) and reused: one mask for every block
            raise NotImplementedError(f"teachers with mixed attention layer types ({sorted(set(layer_types))}) "
                                      f"are not supported yet")
        heads = tcfg.num_attention_heads
        head_dim = getattr(tcfg, "head_dim", None) or d_T // heads
        if fam.causal and getattr(tcfg, "head_dim", None) is None and d_T % heads:
            raise ValueError(f"teacher hidden size {d_T} is not divisible by its {heads} heads")
        if not fam.causal and d_T % heads:
            raise ValueError(f"BERT teacher hidden size {d_T} is not divisible by its {heads} heads")
        if fam.norm_type == "layernorm" and student_hidden_size < 2:
            raise ValueError("student_hidden_size must be >= 2 for LayerNorm families")
        self.family, self.d_T, self.d_S, self.head_dim = fam, d_T, student_hidden_size, head_dim
        self.loss = loss
        self.clone_weights = dict(clone_weights or {})
        self.gradient_checkpointing, self.association = gradient_checkpointing, association
        self.share_qkv, self.share_gate_up, self.separate_parts = share_qkv, share_gate_up, separate_parts
        self.attn_clone, self.tie_head_projection = attn_clone, tie_head_projection
        self.head_key = "emb" if tie_head_projection else "head"  # projection of the LM head
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never in state_dict / parameters

        # ---- student skeleton on meta, buffers borrowed from the teacher
        scfg = copy.deepcopy(tcfg)
        scfg.hidden_size = student_hidden_size
        scfg.head_dim = head_dim
        if not tie_head_projection:  # E_T P_emb and W_head P_head differ: the student cannot tie them
            scfg.tie_word_embeddings = False
        self.student_class = type(teacher) if fam.causal else lrc_bert_class()
        with torch.device("meta"):
            student = self.student_class(scfg)
        tbufs = dict(teacher.named_buffers())
        for name, buf in list(student.named_buffers()):
            tb = tbufs.get(name)
            if tb is None or tb.shape != buf.shape:
                raise RuntimeError(f"student buffer {name!r} has no same-shaped teacher buffer")
            mod_name, _, attr = name.rpartition(".")
            _get(student, mod_name)._buffers[attr] = tb
        for p in student.parameters():
            p.requires_grad_(False)
        student.eval()
        object.__setattr__(self, "student", student)
        self.config = scfg

        # ---- plan: one rule per student parameter
        # plain attributes, not submodules: the clone's own parameters are projections and norms only
        tbase = _get(teacher, fam.base) if fam.base and hasattr(teacher, fam.base) else teacher
        sbase = _get(student, fam.base) if fam.base and hasattr(student, fam.base) else student
        for k, v in dict(tbase=tbase, sbase=sbase, t_layers=_get(tbase, fam.layers),
                         s_layers=_get(sbase, fam.layers)).items():
            object.__setattr__(self, k, v)
        self.base_prefix = fam.base + "." if (fam.base and hasattr(teacher, fam.base)) else ""
        self.n_layers = len(self.t_layers)
        self.proj = nn.ParameterDict()
        self.norms = nn.ParameterDict()
        self._owners: dict = {}  # (kind, key) -> the FSDP unit holding that parameter (lrkd_fast.sharding)
        tparams = dict(teacher.named_parameters(remove_duplicate=False))
        dev, dt = next(teacher.parameters()).device, next(teacher.parameters()).dtype
        self.plan: dict[str, tuple] = {}
        self.layer_plans: list[dict] = [dict() for _ in range(self.n_layers)]
        self.top_plan: dict[str, tuple] = {}
        self._proj_key("emb", dev, dt)
        for name, sp in student.named_parameters(remove_duplicate=False):
            if name not in tparams:
                raise RuntimeError(f"student parameter {name!r} has no teacher counterpart")
            rule = self._classify(name, sp, dev, dt)
            self.plan[name] = rule
            m = re.match(rf"^{re.escape(self.base_prefix + fam.layers)}\.(\d+)\.(.+)$", name)
            if m:
                self.layer_plans[int(m.group(1))][m.group(2)] = rule
            else:
                self.top_plan[name] = rule
        self._init(init, init_std, calibration)

        # ---- hooks: teacher and student activations at the clone sites
        self._acts_t: dict = {}
        self._acts_s: dict = {}
        self._capture = False
        self._factorized: dict = {}  # id(student module) -> projection key, for the current step
        self._factorized_out: dict = {}  # the same for the attention output run in the teacher width
        self._acts_wide: dict = {}  # attn_clone="teacher": o_S' (teacher width) of the current block
        self._hooks = []
        self._run_block = None  # how forward runs a block: None = block_step (lrkd_fast.sharding: its FSDP unit)
        self._block_context = None
        for i in range(self.n_layers):
            for site in fam.sites:
                path = fam.site_module(site)
                tm, sm = self.t_layers[i].get_submodule(path), self.s_layers[i].get_submodule(path)
                if site == fam.attn_out:  # before _catch, so that it catches o_S (width d_S) either way
                    self._hooks.append(sm.register_forward_hook(self._wide_out_hook(site)))
                self._hooks.append(tm.register_forward_hook(self._catch("_acts_t", site)))
                self._hooks.append(sm.register_forward_hook(self._catch("_acts_s", site)))
                if site in fam.in_sites:
                    self._hooks.append(sm.register_forward_pre_hook(self._factor_hook))

    @classmethod
    def from_teacher(cls, teacher: nn.Module, student_hidden_size: int, init: str = "random", **kw) -> "LowRankClone":
        """Build the clone of ``teacher`` (frozen, not copied) with hidden size ``student_hidden_size``.

        init: "random" (N(0, init_std), the paper's), "pca" (data-informed: every projection starts from
        the top-d_S principal directions of the teacher's hidden states on ``calibration`` batches, and the
        norms from the teacher's norms seen through those directions), or
        "identity" (d_S == d_T, every projection the identity, norms copied: the student equals the
        teacher; for tests).
        attn_clone: the attention-output clone term. "student" (the paper's form) compares E(o_S, o_T P_o)
        in the student width; "teacher" (the authors' code's form) compares the student's attention
        result passed through the teacher's o_proj with o_T in the teacher width, so no gradient
        reaches P_o from that term (module docstring). Default "teacher": better held-out fidelity on the
        MiniLM default run, equal on a tiny Llama (benchmarks/results/lrc_attn_clone).
        tie_head_projection: True (the paper's and the authors' default): the LM head's projection is
        P_emb (W_head_S = W_head P_emb); False: a projection of its own, P_head, initialized as every
        other projection (the exported student then has untied embeddings and head).
        Other keywords: see the class signature.
        """
        return cls(teacher, student_hidden_size, init=init, **kw)

    # ------------------------------------------------------------------ plan
    def _proj_key(self, key, dev, dt):
        if key not in self.proj:
            self.proj[key] = nn.Parameter(torch.empty(self.d_T, self.d_S, device=dev, dtype=dt))
        return key

    def _site_key(self, layer: int, site: str, dev, dt) -> str:
        return self._proj_key(self.plan_key(layer, site), dev, dt)

    def _classify(self, name: str, sp, dev, dt) -> tuple:
        fam = self.family
        layer_prefix = self.base_prefix + fam.layers
        m = re.match(rf"^{re.escape(layer_prefix)}\.(\d+)\.(.+)$", name)
        if m:
            i, rel = int(m.group(1)), m.group(2)
            for site, mod in fam.in_sites.items():
                if rel == mod + ".weight":
                    return ("in", name, self._site_key(i, site, dev, dt))
                if rel == mod + ".bias":
                    return ("pass", name)
            for site, mod in fam.out_sites.items():
                if rel == mod + ".weight":
                    return ("out", name, self._site_key(i, site, dev, dt))
                if rel == mod + ".bias":
                    return ("out_bias", name, self._site_key(i, site, dev, dt))
            for mod in fam.layer_norms:
                if rel.startswith(mod + "."):
                    return self._norm_rule(name, dev, dt)
            for mod in fam.passthrough:
                if rel.startswith(mod + "."):
                    return ("pass", name)
        else:
            rel = name[len(self.base_prefix):] if name.startswith(self.base_prefix) else None
            for mod in fam.embeddings:
                if rel == mod + ".weight":
                    return ("emb", name, "emb")
            if fam.head and name == fam.head + ".weight":
                # tie_head_projection: P_emb, as in the reference code's default; else P_head
                return ("emb", name, self._proj_key(self.head_key, dev, dt))
            for mod in (fam.final_norm, fam.embed_norm):
                if mod and rel is not None and rel.startswith(mod + "."):
                    return self._norm_rule(name, dev, dt)
            for mod in fam.both_sides:
                if rel == mod + ".weight":
                    return ("both", name, "emb")
                if rel == mod + ".bias":
                    return ("out_bias", name, "emb")
        raise ValueError(f"{fam.name} family description does not cover parameter {name!r}")

    def _norm_rule(self, name, dev, dt):
        key = name.replace(".", "__")
        is_bias = name.endswith(".bias")
        self.norms[key] = nn.Parameter((torch.zeros if is_bias else torch.ones)(self.d_S, device=dev, dtype=dt))
        return ("norm", name, key)

    @torch.no_grad()
    def _init(self, init: str, std: float, calibration):
        tparams = dict(self.teacher.named_parameters(remove_duplicate=False))
        if init == "identity":
            for p in self.proj.values():
                p.copy_(torch.eye(self.d_T, dtype=p.dtype, device=p.device))
            for rule in self.plan.values():
                if rule[0] == "norm":
                    self.norms[rule[2]].copy_(tparams[rule[1]])
            return
        if init == "random":
            for p in self.proj.values():
                p.normal_(0.0, std)
            return
        if not calibration:
            raise ValueError("init='pca' needs calibration batches (a non-empty list of tokenized batch dicts)")
        U, frac = self._principal(calibration)
        for (kind, key), value in self.pca_values(U, frac, tparams).items():
            target = getattr(self, kind)[key]
            target.copy_(value.to(target.dtype))

    def pca_values(self, U: torch.Tensor, frac: float, tparams: dict) -> dict:
        """{(kind, key): value} of the pca init (:mod:`.pca`) from the principal directions ``U`` carrying
        the fraction ``frac`` of the energy: U for every projection ("proj"), every norm ("norms") seen
        through U. ``tparams``: the teacher's parameters by name (whole tensors)."""
        out = {("proj", key): U for key in self._proj_keys()}
        for rule in self.plan.values():
            if rule[0] == "norm":
                out[("norms", rule[2])] = norm_through(tparams[rule[1]], U, frac, rule[1].endswith(".bias"))
        return out

    def _proj_keys(self) -> list:
        """Every projection's key, in the plan's order (the same before and after sharding)."""
        keys = ["emb"] + [r[2] for r in self.plan.values() if r[0] in ("in", "out", "out_bias", "both", "emb")]
        return list(dict.fromkeys(keys))

    @torch.no_grad()
    def principal_directions(self, batches) -> torch.Tensor:
        """(d_T, d_S): top-d_S eigenvectors of the second moment of the teacher's hidden states
        (every layer's input and the last output, real tokens only) over ``batches``."""
        return self._principal(batches)[0]

    def _principal(self, batches) -> tuple:
        """(principal_directions, fraction of the second moment's trace those directions carry)."""
        p = self._param("proj", "emb")
        return principal_subspace(self.tbase, batches, self.d_S, p.device, p.dtype)

    # ------------------------------------------------------------------ weights
    def _weight(self, rule, tparams) -> torch.Tensor:
        kind = rule[0]
        W = tparams[rule[1]]
        if kind == "pass":
            return W
        if kind == "norm":
            return self._param("norms", rule[2])
        P = self._param("proj", rule[2])
        if kind in ("in", "emb"):
            return W @ P
        if kind == "out":
            return P.t() @ W
        if kind == "out_bias":
            return W @ P
        if kind == "both":
            return P.t() @ W @ P
        raise AssertionError(kind)

    def layer_weights(self, i: int, tokens: Optional[int] = None) -> dict:
        """Block i's student weights (names relative to the block), formed from teacher weights and
        projections. With ``tokens`` (a training forward): input-side sites run factorized instead when
        that is cheaper for ``tokens``, and under ``attn_clone="teacher"`` the attention output module
        gets the teacher's o_proj weight (and bias), its forward hook mapping the result through P_o."""
        tparams = self._tparams_layer(i)
        wide = self.s_layers[i].get_submodule(self.family.site_module(self.family.attn_out)) \
            if self.attn_clone == "teacher" and tokens is not None else None
        out = {}
        for rel, rule in self.layer_plans[i].items():
            mod_path = rel.rsplit(".", 1)[0]
            if rule[0] == "in" and tokens is not None and self._use_factorized(tparams[rule[1]].shape[0], tokens):
                mod = self.s_layers[i].get_submodule(mod_path)
                self._factorized[id(mod)] = rule[2]
                out[rel] = tparams[rule[1]]  # the teacher weight; the pre-hook maps the input through P
                continue
            if wide is not None and rule[0] in ("out", "out_bias") and self.s_layers[i].get_submodule(mod_path) is wide:
                self._factorized_out[id(wide)] = rule[2]
                out[rel] = tparams[rule[1]]  # the teacher's o_proj: the module computes o_S' = a_S W_o^T + b_o
                continue
            out[rel] = self._weight(rule, tparams)
        return out

    def _tparams_layer(self, i):
        pre = f"{self.base_prefix}{self.family.layers}.{i}."
        return {pre + n: p for n, p in self.t_layers[i].named_parameters()}

    def _use_factorized(self, d_m: int, tokens: int) -> bool:
        if self.association != "auto":
            return self.association == "factorized"
        formed = 2 * d_m * self.d_T * self.d_S + 2 * tokens * self.d_S * d_m
        factor = 2 * tokens * self.d_S * self.d_T + 2 * tokens * self.d_T * d_m
        return factor < formed

    def student_state_dict(self, part=None) -> dict:
        """Every student weight (full names), formed from the current projections; with ``part`` only
        block ``part``'s (an int) or those outside the blocks ("top"), whose teacher weights and
        projections are all in that block's (that FSDP unit's) parameters."""
        tparams = dict(self.teacher.named_parameters(remove_duplicate=False))
        rules = self.plan if part is None else self.top_plan if part == "top" else \
            {r[1]: r for r in self.layer_plans[part].values()}
        return {name: self._weight(rule, tparams) for name, rule in rules.items()}

    def _param(self, kind: str, key: str) -> torch.Tensor:
        """Projection (kind "proj") or norm ("norms") ``key``: the clone's own parameter, or, once
        :mod:`lrkd_fast.sharding` has moved it into an FSDP unit, the tensor that unit holds now (the
        gathered one inside the unit's forward and backward)."""
        owner = self._owners.get((kind, key))
        return getattr(self if owner is None else owner, kind)[key]

    # ------------------------------------------------------------------ hooks
    def _catch(self, store, site):
        def fn(module, args, out):
            if self._capture:
                getattr(self, store)[site] = first_tensor(out)
        return fn

    def _factor_hook(self, module, args):
        key = self._factorized.get(id(module))
        if key is None:
            return None
        return (F.linear(args[0], self._param("proj", key)),) + tuple(args[1:])

    def _wide_out_hook(self, site):
        def fn(module, args, out):
            key = self._factorized_out.get(id(module))
            if key is None:
                return None
            if self._capture:
                self._acts_wide[site] = out  # o_S', teacher width: this form's clone term
            return out @ self._param("proj", key)  # o_S = o_S' P_o, the student's attention output
        return fn

    def train(self, mode: bool = True):
        # teacher and student modules stay in eval mode: LRC trains without dropout
        self.training = mode
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                **unused) -> CloneOutput:
        fam = self.family
        B, L = input_ids.shape
        # a 4-D attention mask (packed documents, lrkd_fast.packed) goes to both models as it is; every token counts
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else torch.ones_like(input_ids)
        tparams = dict(self.teacher.named_parameters(remove_duplicate=False))
        P_emb = self._param("proj", "emb")
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        if position_ids is not None:
            extra["position_ids"] = position_ids
        if fam.causal:
            extra["use_cache"] = False
        # inputs of the first block, built by each model's own forward
        with torch.no_grad():
            hT, t_args, t_kw = _block_inputs(self.t_layers[0], lambda: self.tbase(
                input_ids=input_ids, attention_mask=attention_mask, **extra))
        word = tparams[self.base_prefix + fam.embeddings[0] + ".weight"]
        emb_S = F.embedding(input_ids, word) @ P_emb  # gather rows, then project
        pre = {n[len(self.base_prefix):]: self._weight(r, tparams) for n, r in self.top_plan.items()
               if r[1] != self.base_prefix + fam.embeddings[0] + ".weight" and n.startswith(self.base_prefix)
               and not (fam.head and n == fam.head + ".weight") and r[0] != "both"}
        hS, s_args, s_kw = _block_inputs(self.s_layers[0], lambda: functional_call(
            self.sbase, pre, (), dict(inputs_embeds=emb_S, attention_mask=attention_mask, **extra), strict=False))

        flat_mask = mask.reshape(-1)
        sites = fam.sites
        w = [float(self.clone_weights.get(s, 1.0)) for s in sites]
        clone_total = hT.new_zeros((), dtype=torch.float32)
        term_sums = torch.zeros(len(sites), dtype=torch.float32, device=hT.device)
        self._factorized.clear()
        self._factorized_out.clear()
        self._block_context = (t_args, t_kw, s_args, s_kw, flat_mask, w, B * L)
        run_block = self._run_block or self.block_step  # lrkd_fast.sharding runs each block as an FSDP unit
        try:
            for i in range(self.n_layers):
                hT, hS, clone_total, term_sums = run_block(i, hT, hS, clone_total, term_sums)
        finally:
            self._block_context = None
        parts = {}
        loss = self.loss.alpha * clone_total
        if fam.causal:
            hT = self.tbase.get_submodule(fam.final_norm)(hT)
            norm_w = {n.rsplit(".", 1)[1]: self._param("norms", r[2]) for n, r in self.top_plan.items()
                      if r[0] == "norm" and n.startswith(self.base_prefix + fam.final_norm + ".")}
            hS = functional_call(self.sbase.get_submodule(fam.final_norm), norm_w, (hS,))
            keep = flat_mask.bool()
            labels = torch.full_like(input_ids, -100)
            labels[:, :-1] = torch.where(mask[:, 1:].bool(), input_ids[:, 1:], -100)
            hs, ht, lab = hS.reshape(-1, self.d_S)[keep], hT.reshape(-1, self.d_T)[keep], labels.reshape(-1)[keep]
            W_head = tparams[fam.head + ".weight"]
            W_S = W_head @ self._param("proj", self.head_key)
            common = dict(teacher_hidden=ht, teacher_weight=W_head, temperature=self.loss.temperature,
                          reduction="batchmean", batch_size=B, ce_reduction="mean", kl_on_ignored=True)
            if self.separate_parts:
                kd = kd_loss(hs, W_S, None, ce_weight=0.0, **common)
                lm = kd_loss(hs, W_S, lab, kl_weight=0.0, **common)
                loss = loss + self.loss.kd_weight * kd + self.loss.lm_weight * lm
                parts.update(kd=kd.item(), lm=lm.item())
            else:
                out = kd_loss(hs, W_S, lab, kl_weight=self.loss.kd_weight, ce_weight=self.loss.lm_weight, **common)
                loss = loss + out
                parts["kd+lm"] = out.item()
        else:
            m = mask.unsqueeze(-1).to(hS.dtype)
            pool_s = (hS * m).sum(1) / m.sum(1).clamp_min(1)
            pool_t = ((hT * m).sum(1) / m.sum(1).clamp_min(1)) @ P_emb
            emb = (1 - F.cosine_similarity(pool_s.float(), pool_t.float(), dim=-1)).mean()
            loss = loss + self.loss.kd_weight * emb
            parts["embed"] = emb.item()
        parts["clone"] = clone_total.item()
        for s, v in zip(sites, (term_sums / self.n_layers).tolist()):
            parts[f"clone_{s}"] = v
        parts = {"loss": loss.item(), **parts}
        return CloneOutput(loss, parts)

    def block_step(self, i: int, hT: torch.Tensor, hS: torch.Tensor, clone_total: torch.Tensor,
                   term_sums: torch.Tensor) -> tuple:
        """Block ``i`` of the co-training forward (called by :meth:`forward`, in order, for every block):
        the teacher block, the student block with its freshly formed weights, and the block's clone terms.
        Returns (hT, hS, clone_total, term_sums) after the block. Every weight and projection of the block
        is read inside this call, so it can run as one FSDP unit (:mod:`lrkd_fast.sharding`)."""
        t_args, t_kw, s_args, s_kw, flat_mask, w, tokens = self._block_context
        fam, sites = self.family, self.family.sites
        weights = self.layer_weights(i, tokens=tokens)
        self._capture = True
        try:
            with torch.no_grad():
                hT = first_tensor(self.t_layers[i](hT, *t_args, **t_kw))
            acts_t, self._acts_t = self._acts_t, {}
            layer = self.s_layers[i]
            run = lambda h, _w=weights, _l=layer: first_tensor(functional_call(_l, _w, (h,) + s_args, s_kw))
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hS = torch.utils.checkpoint.checkpoint(run, hS, use_reentrant=False)
            else:
                hS = run(hS)
            acts_s, self._acts_s = self._acts_s, {}
            acts_wide, self._acts_wide = self._acts_wide, {}
        finally:
            self._capture = False
        pairs = []
        for s in sites:
            if s in acts_wide:  # attn_clone="teacher": E(o_S', o_T) in the teacher width, no P
                pairs.append((acts_wide[s], acts_t[s]))
            elif s in fam.out_sites:
                pairs.append((acts_s[s], acts_t[s], self._param("proj", self.plan_key(i, s))))
            else:
                pairs.append((acts_s[s], acts_t[s]))
        lc, terms = clone_loss(pairs, alpha=1.0, mask=flat_mask, weights=w, return_terms=True)
        del pairs, acts_t, acts_s, acts_wide  # teacher activations of this block are released here
        return hT, hS, clone_total + lc, term_sums + terms

    def plan_key(self, i: int, site: str) -> str:
        key = site
        if self.share_qkv and site in ("q", "k", "v"):
            key = "qkv"
        if self.share_gate_up and site in ("gate", "up") and "gate" in self.family.in_sites:
            key = "gateup"
        return f"layer{i}_{key}"

    # ------------------------------------------------------------------ student forward / export
    def student_forward(self, **inputs):
        """The student model's own forward with the current weights (functional_call, no export)."""
        self._factorized.clear()
        self._factorized_out.clear()
        return functional_call(self.student, self.student_state_dict(), (), inputs, strict=False, tie_weights=False)

    @torch.no_grad()
    def export_student(self, state: Optional[dict] = None) -> nn.Module:
        """A plain Hugging Face model of the teacher's family (BERT: LRCBertModel) with the current
        weights materialized; hidden_size d_S, head_dim written explicitly. ``state``: the student's
        weights when already formed (a sharded run: :meth:`~lrkd_fast.sharding.ShardedTraining.student_state_dict`)."""
        p = next(self.teacher.parameters())
        cfg = copy.deepcopy(self.config)
        if not self.family.causal:
            cfg.auto_map = {"AutoModel": "modeling_lrc_bert.LRCBertModel"}
            cfg.architectures = ["LRCBertModel"]
        with torch.device(p.device):
            model = self.student_class(cfg).to(p.dtype)  # in the teacher's dtype before the weights go in: exact
        state = {k: v.detach().clone() for k, v in (self.student_state_dict() if state is None else state).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in dict(model.named_buffers())]
        if missing or unexpected:
            raise RuntimeError(f"export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.to(p.dtype).eval()

    def save_student(self, path: str, tokenizer=None, model: Optional[nn.Module] = None) -> nn.Module:
        """export_student() (or ``model``, an exported student) + save_pretrained (+ the tokenizer; BERT:
        its modeling file for auto_map)."""
        model = self.export_student() if model is None else model
        model.save_pretrained(path)
        if not self.family.causal:
            with open(os.path.join(path, "modeling_lrc_bert.py"), "w") as f:
                f.write(LRC_BERT_SOURCE)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return model

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
