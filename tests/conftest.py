"""Test setup: without a GPU, run the Triton kernels through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so this happens at conftest import time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers as T  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Float dtypes the Triton path is checked in here. The interpreter's tl.dot is exact for fp32/fp16;
# bf16 is covered on the GPU (the kernels upcast bf16 dot operands when interpreted).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Relative tolerances (max |a-b| / max |ref|) per dtype; one place for every op's tests.
RTOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close_rel(actual, expected, dtype=torch.float32, what="value"):
    """Relative max error against the reference, with the tolerance of ``dtype``."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = e.abs().max().clamp_min(1e-12)
    err = ((a - e).abs().max() / scale).item()
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3g} > {RTOL[dtype]:.3g} ({dtype})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def eager_backend():
    """For whole-model runs on CPU: the interpreted Triton kernels are exact but far too slow for a
    full model, and they are compared with eager op by op in the op tests."""
    import lrkd_fast

    with lrkd_fast.set_backend("eager"):
        yield


# ------------------------------------------------------------------------------------ tiny models
# Shared by the tests of several modules: tiny Hugging Face models built from configs (random weights).

VOCAB = 96


def tiny(family):
    common = dict(vocab_size=VOCAB)
    if family == "llama":
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        return T.LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        return T.Qwen2ForCausalLM(cfg)
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **common)
        return T.GPT2LMHeadModel(cfg)
    if family == "bert":
        cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **common)
        return T.BertModel(cfg)
    raise KeyError(family)


def calib_batches(n=4, seq=12, seed=0):
    """One batch of random ids, the first half of the rows padded at the end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, seq - 3:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def output_error(model, ref_model, batches):
    """Relative squared error of ``model``'s first output against ``ref_model``'s over unmasked tokens."""
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            t, s = ref_model(**b)[0], model(**b)[0]
            m = b["attention_mask"].unsqueeze(-1)
            num, den = num + ((s - t) ** 2 * m).sum().item(), den + (t ** 2 * m).sum().item()
    return num / den


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A saved tiny BERT (2 blocks, hidden 32) with the packaged MiniLM's tokenizer: a teacher folder
    the recipes and the command line load in well under a second."""
    from lrkd_fast.data import packaged_minilm_path

    path = tmp_path_factory.mktemp("tiny-teacher")
    tok = T.AutoTokenizer.from_pretrained(packaged_minilm_path())
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=128)
    T.BertModel(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def small_text_file(tmp_path_factory):
    """300 lines of real text (the size of a small user data set)."""
    from lrkd_fast.data import pydoc_sentences

    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(pydoc_sentences()[:300]) + "\n", encoding="utf-8")
    return str(path)
