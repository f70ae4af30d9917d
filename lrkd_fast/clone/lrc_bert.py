"""The Low-Rank Clone student class for BERT teachers (``LRCBertModel``), as importable code and as
the source written next to exported weights."""
from __future__ import annotations

import types

__all__ = ["LRC_BERT_SOURCE", "lrc_bert_class"]

# BertModel sets head size = hidden_size // heads; LRC keeps the teacher's head size, so the BERT
# student needs attention that reads config.head_dim. The same source is written next to exported
# weights (auto_map) so AutoModel.from_pretrained(path, trust_remote_code=True) loads it.
LRC_BERT_SOURCE = '''"""BertModel whose self-attention keeps its own head size (config.head_dim), as written by lrkd_fast's
Low-Rank Clone export: hidden_size can then be smaller than heads * head_dim."""
from torch import nn
from transformers import BertModel


class LRCBertModel(BertModel):
    def __init__(self, config, *args, **kwargs):
        hd = getattr(config, "head_dim", None)
        if hd and not hasattr(config, "embedding_size"):
            config.embedding_size = config.hidden_size  # BertSelfAttention skips its divisibility check then
        super().__init__(config, *args, **kwargs)
        if not hd:
            return
        for layer in self.encoder.layer:
            sa = layer.attention.self
            sa.attention_head_size = hd
            sa.all_head_size = sa.num_attention_heads * hd
            if hasattr(sa, "scaling"):
                sa.scaling = hd ** -0.5
            sa.query = nn.Linear(config.hidden_size, sa.all_head_size)
            sa.key = nn.Linear(config.hidden_size, sa.all_head_size)
            sa.value = nn.Linear(config.hidden_size, sa.all_head_size)
            layer.attention.output.dense = nn.Linear(sa.all_head_size, config.hidden_size)
'''

_LRC_BERT_CLASS = None


def lrc_bert_class():
    """The LRCBertModel class (built once from :data:`LRC_BERT_SOURCE`)."""
    global _LRC_BERT_CLASS
    if _LRC_BERT_CLASS is None:
        mod = types.ModuleType("lrkd_fast.clone._lrc_bert")
        exec(compile(LRC_BERT_SOURCE, "<lrc_bert>", "exec"), mod.__dict__)
        _LRC_BERT_CLASS = mod.LRCBertModel
    return _LRC_BERT_CLASS
