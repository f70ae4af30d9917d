"""Model families for Low-Rank Clone, described as data.

One :class:`Family` per architecture names the modules the generic code in ``model.py`` needs:
the input-side linears (q, k, v, gate, up: student weight W_T @ P), the output-side linears (o,
down: P^T @ W_T, biases b_T @ P), the norms (trainable in the student), modules used unchanged
(Qwen3's per-head q_norm/k_norm live in head_dim space, which LRC keeps), embeddings, the final
norm and the LM head. Nothing else is hard-coded anywhere: a parameter of the teacher that no rule
below names is an error, so an unexpected variant fails loudly instead of training wrongly.

Adding a family is adding an entry to :data:`FAMILIES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Family", "FAMILIES", "CLONE_SITES", "family_for", "supported_model_types"]

# order of the clone terms of one layer (sites a family lacks are skipped; BERT has no gate)
CLONE_SITES = ("q", "k", "v", "gate", "up", "o", "down")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple
    causal: bool
    base: str  # attribute of a task model (…ForCausalLM) holding the base model; "" = none
    layers: str  # ModuleList of blocks, relative to the base model
    in_sites: dict  # site -> module path inside a block; student weight = W_T @ P_site
    out_sites: dict  # site -> module path inside a block; student weight = P_site^T @ W_T
    layer_norms: tuple  # norm modules inside a block (student-trainable, width d_S)
    norm_type: str  # "rms" (weight only) or "layernorm" (weight and bias)
    embeddings: tuple  # embedding modules relative to the base; student E_S = E_T @ P_emb
    final_norm: Optional[str] = None  # relative to the base (pre-norm decoders)
    embed_norm: Optional[str] = None  # relative to the base (BERT's embeddings.LayerNorm)
    head: Optional[str] = None  # relative to the task model; student W_S = W_head @ P_emb
    passthrough: tuple = ()  # modules inside a block used exactly as the teacher's (frozen)
    both_sides: tuple = ()  # top-level linears d_T -> d_T (BERT pooler): P_emb^T W P_emb, b @ P_emb
    head_dim_explicit: bool = True  # the HF config has a head_dim field the student sets
    attn_out: str = "o"  # the out site that is the attention output (its clone term follows attn_clone)
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def site_module(self, site: str) -> Optional[str]:
        return self.in_sites.get(site) or self.out_sites.get(site)

    @property
    def sites(self) -> tuple:
        return tuple(s for s in CLONE_SITES if self.site_module(s) is not None)


_DECODER = dict(
    causal=True, base="model", layers="layers",
    in_sites={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj"},
    out_sites={"o": "self_attn.o_proj", "down": "mlp.down_proj"},
    layer_norms=("input_layernorm", "post_attention_layernorm"), norm_type="rms",
    embeddings=("embed_tokens",), final_norm="norm", head="lm_head",
)

FAMILIES: dict[str, Family] = {
    "llama": Family(name="llama", model_types=("llama",), **_DECODER),
    "mistral": Family(name="mistral", model_types=("mistral",), **_DECODER),
    "qwen2": Family(name="qwen2", model_types=("qwen2",), notes="q/k/v biases (width d_m) are used unchanged",
                    **_DECODER),
    "qwen3": Family(name="qwen3", model_types=("qwen3",), passthrough=("self_attn.q_norm", "self_attn.k_norm"),
                    notes="q_norm/k_norm act per head (head_dim), which LRC keeps: used unchanged", **_DECODER),
    "bert": Family(
        name="bert", model_types=("bert",), causal=False, base="bert", layers="encoder.layer",
        in_sites={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                  "up": "intermediate.dense"},
        out_sites={"o": "attention.output.dense", "down": "output.dense"},
        layer_norms=("attention.output.LayerNorm", "output.LayerNorm"), norm_type="layernorm",
        embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings",
                    "embeddings.token_type_embeddings"),
        embed_norm="embeddings.LayerNorm", both_sides=("pooler.dense",), head_dim_explicit=False,
        notes="BertModel derives head size from hidden_size / heads: the student is an LRCBertModel "
              "(a BertModel whose attention reads config.head_dim), exported with its modeling file"),
}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_for(config_or_model) -> Family:
    """The family of a Hugging Face config or model; ValueError naming the supported ones otherwise."""
    config = getattr(config_or_model, "config", config_or_model)
    mt = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    raise ValueError(f"Low-Rank Clone does not support model_type {mt!r}; supported: "
                     f"{', '.join(supported_model_types())}")
