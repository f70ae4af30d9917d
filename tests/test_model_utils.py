"""Model internals on tiny Hugging Face models: blocks, hooks, early stops, output unpacking."""
import pytest
import torch
from torch import nn

from lrkd_fast.model_utils import (ModuleNotReached, OutputCatcher, StopForward, as_model_inputs, capture_inputs,
                                   find_blocks, first_tensor, is_causal_lm, last_hidden_state, run_model,
                                   set_module, token_rows)
from tests.conftest import VOCAB, tiny


def test_find_blocks_and_causal_lm_detection():
    assert find_blocks(tiny("llama")) == ["model.layers.0", "model.layers.1"]
    assert find_blocks(tiny("bert")) == ["encoder.layer.0", "encoder.layer.1"]
    assert find_blocks(tiny("gpt2")) == ["transformer.h.0", "transformer.h.1"]
    assert find_blocks(nn.Sequential(nn.Linear(2, 2))) == []
    assert is_causal_lm(tiny("llama")) and is_causal_lm(tiny("gpt2"))
    assert not is_causal_lm(tiny("bert")) and not is_causal_lm(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        find_blocks("llama")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_catchers_and_captured_inputs_match_the_hidden_states(family):
    model = tiny(family).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True)
    blocks = find_blocks(model)
    catcher = OutputCatcher(model, blocks, detach=True)
    with torch.no_grad():
        model(input_ids=ids)
    acts = catcher.pop()
    catcher.remove()
    assert catcher.pop() == {} and not catcher.handles
    # hidden_states[i + 1] is block i's output (the last one after the final norm in Llama)
    torch.testing.assert_close(acts[blocks[0]], ref.hidden_states[1], rtol=0, atol=0)
    # the first block's input is the embedding output, hidden_states[0]; nothing after it runs
    ran = []
    hook = model.get_submodule(blocks[1]).register_forward_hook(lambda *a: ran.append(1))
    with torch.no_grad():
        args, kwargs = capture_inputs(model.get_submodule(blocks[0]), lambda: model(input_ids=ids))
    hook.remove()
    hidden = args[0] if args else kwargs["hidden_states"]
    torch.testing.assert_close(hidden, ref.hidden_states[0], rtol=0, atol=0)
    assert ran == []
    with pytest.raises(ModuleNotReached):
        capture_inputs(model.get_submodule(blocks[0]), lambda: None)
    with pytest.raises(ValueError, match="module 'nope' not found"):
        OutputCatcher(model, ["nope"])


def test_output_unpacking_batches_and_early_stops():
    model = tiny("bert").eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        lm = tiny("llama").eval()(input_ids=ids, output_hidden_states=True)
    assert last_hidden_state(out) is out.last_hidden_state
    assert last_hidden_state(lm) is lm.hidden_states[-1]  # causal LM outputs have no last_hidden_state
    t = torch.ones(2)
    assert first_tensor(t) is t and first_tensor((t, None)) is t and first_tensor(out) is out.last_hidden_state
    with pytest.raises(TypeError, match="cannot find an activation tensor"):
        first_tensor({"a": t})
    assert as_model_inputs(ids) == {"input_ids": ids}
    with pytest.raises(TypeError, match="a batch must be"):
        as_model_inputs([1, 2])

    def stop(module, args):
        raise StopForward

    h = model.encoder.layer[0].register_forward_pre_hook(stop)
    assert run_model(model, ids) is None  # stopped, no error
    h.remove()
    assert run_model(model, ids).last_hidden_state.shape == (2, 5, 32)
    assert run_model(model, ids, forward=lambda m, b: "custom") == "custom"


def test_set_module_and_token_rows():
    model = tiny("bert")
    new = nn.Identity()
    set_module(model, "encoder.layer.0.output.dense", new)
    assert model.encoder.layer[0].output.dense is new
    x = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = token_rows(x, mask)
    assert rows.dtype == torch.float32 and rows.tolist() == [x[0, 0].tolist(), x[0, 1].tolist(), x[1, 0].tolist()]
    assert token_rows(x, None).shape == (6, 4)
