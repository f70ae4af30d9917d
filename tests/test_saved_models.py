"""Saved low-rank models: re-saves into the same folder, tied heads, plain transformers refusing a
low-rank folder, and hand-edited or damaged layout files."""
import json
import os

import pytest
import torch
import transformers as T

from lrkd_fast import LowRankConfig, LowRankLinear, load_lowrank, save_lowrank, swap_linear_layers
from lrkd_fast.model_utils import set_module
from lrkd_fast.recipes import export_merged
from lrkd_fast.swap import LAYOUT_FILE
from lrkd_fast.swap.io import MODEL_TYPE_KEY, read_layout
from tests.conftest import VOCAB, tiny

pytestmark = pytest.mark.usefixtures("eager_backend")


def _swapped(family="bert", seed=0, **cfg):
    torch.manual_seed(seed)
    model = tiny(family).eval()
    swap_linear_layers(model, LowRankConfig(**{"rank": 4, **cfg}))
    return model


def _out(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def _weight_files(path):
    return sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".index.json", ".bin")))


def _lowrank_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


# ------------------------------------------------------------------------------------ re-saving into one folder

@pytest.mark.parametrize("first_sharded", [True, False], ids=["sharded-then-single", "single-then-sharded"])
def test_resave_in_the_other_layout_leaves_only_the_new_model(tmp_path, first_sharded):
    path = str(tmp_path / "student")
    first, second = _swapped(seed=1), _swapped(seed=2)
    shard = dict(max_shard_size="20KB")
    save_lowrank(first, path, **(shard if first_sharded else {}))
    assert ("model.safetensors.index.json" in _weight_files(path)) == first_sharded
    save_lowrank(second, path, **({} if first_sharded else shard))
    files = _weight_files(path)
    if first_sharded:
        assert files == ["model.safetensors"]
    else:
        assert "model.safetensors" not in files and "model.safetensors.index.json" in files and len(files) > 2
    assert not [f for f in os.listdir(path) if f.startswith(".")]  # no staging folder left behind

    ids = torch.randint(0, VOCAB, (2, 9))
    again = load_lowrank(path)
    assert torch.equal(_out(again, ids), _out(second, ids))
    assert not torch.equal(_out(again, ids), _out(first, ids))
    for (n, p), (n2, p2) in zip(again.state_dict().items(), second.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    # transformers itself reads the same files: the dense parameters are the second model's
    plain = T.BertModel.from_pretrained(path)
    lowrank = _lowrank_names(second)
    dense = {n: p for n, p in second.state_dict().items() if n.rsplit(".", 1)[0] not in lowrank}
    assert len(dense) > 10
    got = plain.state_dict()
    for n, p in dense.items():
        assert torch.equal(got[n], p), n


def test_resave_keeps_other_files_of_the_folder(tmp_path):
    path = tmp_path / "student"
    save_lowrank(_swapped(seed=1), str(path), max_shard_size="20KB")
    (path / "notes.txt").write_text("mine")
    save_lowrank(_swapped(seed=2), str(path))
    assert (path / "notes.txt").read_text() == "mine"


def test_save_refuses_options_it_cannot_reload(tmp_path):
    with pytest.raises(ValueError, match="variant="):
        save_lowrank(_swapped(), str(tmp_path / "a"), variant="fp16")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_lowrank(_swapped(), str(tmp_path / "file"))


# ------------------------------------------------------------------------------------ tied output heads

def test_swapping_a_tied_head_is_refused_with_the_tie_named():
    model = tiny("gpt2")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match=r"'lm_head'.*transformer\.wte\.weight.*tie_word_embeddings=True"):
        swap_linear_layers(model, LowRankConfig(rank=4, target_modules="lm_head"))
    assert isinstance(model.lm_head, torch.nn.Linear)  # nothing was swapped


def test_saving_a_low_rank_head_the_config_ties_is_refused(tmp_path):
    model = tiny("gpt2")
    set_module(model, "lm_head", LowRankLinear.from_linear(model.lm_head, 4))
    with pytest.raises(ValueError, match="'lm_head'.*tie_word_embeddings=True"):
        save_lowrank(model, str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_untied_head_swaps_and_round_trips_bit_exactly(tmp_path):
    torch.manual_seed(0)
    model = tiny("gpt2").eval()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    report = swap_linear_layers(model, LowRankConfig(rank=4, target_modules=r"lm_head|.*mlp\.c_fc"))
    assert [l.name for l in report.layers] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "lm_head"]
    save_lowrank(model, str(tmp_path / "s"))
    again = load_lowrank(str(tmp_path / "s"))
    assert isinstance(again.lm_head, LowRankLinear) and not again.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------------------ plain transformers refuses

@pytest.mark.parametrize("family,auto", [("bert", T.AutoModel), ("gpt2", T.AutoModelForCausalLM),
                                         ("llama", T.AutoModelForCausalLM)])
def test_plain_from_pretrained_refuses_a_low_rank_folder_and_says_what_to_do(tmp_path, family, auto):
    model = _swapped(family)
    path = str(tmp_path / "s")
    save_lowrank(model, path)
    for cls in (auto, T.AutoModel, T.AutoConfig):
        with pytest.raises(ValueError, match=r"lrkd_fast\.load_lowrank\(path\).*lrkd-fast export PATH --merged OUT"):
            cls.from_pretrained(path)
    # lrkd_fast still loads it, bit for bit, with the model's own config
    again = load_lowrank(path)
    assert type(again) is type(model) and again.config.model_type == model.config.model_type
    assert not hasattr(again.config, MODEL_TYPE_KEY)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(_out(again, ids), _out(model, ids))
    # the merged export is a plain model again
    merged = export_merged(path, str(tmp_path / "merged"))
    plain = auto.from_pretrained(merged).eval()
    torch.testing.assert_close(_out(plain, ids), _out(model, ids), rtol=1e-4, atol=1e-5)


def test_folder_saved_before_the_config_was_marked_still_loads(tmp_path):
    model = _swapped()
    path = tmp_path / "s"
    save_lowrank(model, str(path))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = config.pop(MODEL_TYPE_KEY)
    (path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(_out(load_lowrank(str(path)), ids), _out(model, ids))


# ------------------------------------------------------------------------------------ damaged layout files

def _edit(spec):
    def fn(data):
        data = dict(data)
        data["layers"] = {n: dict(s) for n, s in data["layers"].items()}
        first = next(iter(data["layers"]))
        return spec(data, data["layers"][first]) or data
    return fn


LAYOUT_EDITS = {
    "not-json": ("{'format': 1,", r"is not valid JSON"),
    "a-list": ("[1, 2]", r"must hold a JSON object.*got a JSON list"),
    "no-format": (_edit(lambda d, s: d.pop("format") and None), r"has no 'format' field"),
    "format-2": (_edit(lambda d, s: d.update(format=2)), r"unknown format 2"),
    "no-layers": (_edit(lambda d, s: d.pop("layers") and None), r"has no 'layers' field"),
    "empty-layers": (_edit(lambda d, s: d.update(layers={})), r"'layers' must be a non-empty object"),
    "no-rank": (_edit(lambda d, s: s.pop("rank") and None), r"layers\['encoder\.layer\.0\.attention\.self\.query'\] has no 'rank' field"),
    "kind-conv2d": (_edit(lambda d, s: s.update(kind="conv2d")), r"\.kind: unknown kind 'conv2d'"),
    "rank-text": (_edit(lambda d, s: s.update(rank="4")), r"\.rank must be a positive integer, got '4'"),
    "rank-too-big": (_edit(lambda d, s: s.update(rank=10_000)), r"\.rank 10000 exceeds min"),
    "bias-int": (_edit(lambda d, s: s.update(bias=1)), r"\.bias must be true or false"),
    "unknown-module": (_edit(lambda d, s: d["layers"].update({"encoder.nope": s})),
                       r"layers\['encoder.nope'\] is not a module of BertModel"),
}


@pytest.mark.parametrize("case", list(LAYOUT_EDITS))
def test_damaged_layout_file_names_the_file_and_the_field(tmp_path, case):
    path = tmp_path / "s"
    save_lowrank(_swapped(), str(path))
    layout = path / LAYOUT_FILE
    edit, message = LAYOUT_EDITS[case]
    layout.write_text(edit if isinstance(edit, str) else json.dumps(edit(json.loads(layout.read_text()))))
    with pytest.raises(ValueError, match=message) as info:
        load_lowrank(str(path))
    assert str(layout) in str(info.value)


def test_layout_reads_back_what_was_saved(tmp_path):
    model = _swapped("gpt2")
    save_lowrank(model, str(tmp_path))
    layers = read_layout(str(tmp_path))
    assert set(layers) == _lowrank_names(model)
    assert {s["kind"] for s in layers.values()} == {"conv1d"}


def test_unknown_dense_kind_is_refused_when_merging():
    layer = LowRankLinear(6, 5, 2)
    layer.dense_kind = "conv2d"
    with pytest.raises(ValueError, match="dense_kind must be one of"):
        layer.to_dense()
