"""Rank allocation under a parameter budget: the greedy rule against brute force, and its errors."""

import itertools

import pytest
import torch

from lrkd_fast.allocation import allocate_ranks


def _alloc(spectra, budget, costs=None, weights=None, lo=1, hi=None):
    names = list(spectra)
    spectra = {n: torch.tensor(v, dtype=torch.float64) for n, v in spectra.items()}
    return allocate_ranks(spectra, costs or {n: 1 for n in names}, budget, weights or {n: 1.0 for n in names},
                          {n: lo for n in names}, {n: hi or len(spectra[n]) for n in names})


def test_hand_worked_examples():
    # equal weights: after the minimum rank 1 each, b's 4 and 3 beat a's 1
    assert _alloc({"a": [10, 1, 0.1], "b": [5, 4, 3]}, 4) == {"a": 1, "b": 3}
    # a weighted 10x: its second step (10) and b's second (4) win
    assert _alloc({"a": [10, 1, 0.1], "b": [5, 4, 3]}, 4, weights={"a": 10.0, "b": 1.0}) == {"a": 2, "b": 2}
    # b's steps cost 3 parameters: its next step is worth more per parameter (4/3 > 1) but does not fit in
    # the one parameter left after the minimum ranks; a's does
    assert _alloc({"a": [10, 1, 0.1], "b": [5, 4, 3]}, 1 + 3 + 1, costs={"a": 1, "b": 3}) == {"a": 2, "b": 1}
    # identical layers share evenly; ties go to the earlier layer
    assert _alloc({"a": [3, 2, 1], "b": [3, 2, 1]}, 5) == {"a": 3, "b": 2}


def test_greedy_matches_brute_force_with_equal_costs():
    # with one cost per step and non-increasing spectra the greedy choice is optimal: check by enumeration
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        spectra = {n: sorted(torch.rand(5, generator=g).tolist(), reverse=True) for n in "abc"}
        weights = {n: float(w) for n, w in zip("abc", torch.rand(3, generator=g) * 3)}
        budget = 3 + trial % 10
        got = _alloc(spectra, budget, weights=weights)
        assert sum(got.values()) == budget
        best = max(
            (sum(weights[n] * sum(spectra[n][:r]) for n, r in zip("abc", rs)), rs)
            for rs in itertools.product(range(1, 6), repeat=3) if sum(rs) == budget)
        kept = sum(weights[n] * sum(spectra[n][:got[n]]) for n in "abc")
        assert kept == pytest.approx(best[0], rel=1e-12), (got, best)


def test_bounds_and_budget_are_kept():
    spectra = {"a": [9, 8, 7, 6], "b": [1, 1, 1, 1]}
    got = _alloc(spectra, 100, hi=3)  # more budget than the caps allow: stop at the caps
    assert got == {"a": 3, "b": 3}
    got = _alloc(spectra, 5, costs={"a": 2, "b": 1}, lo=1)
    assert 2 * got["a"] + got["b"] <= 5 and got == {"a": 2, "b": 1}


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="empty"):
        allocate_ranks({}, {}, 10, {}, {}, {})
    with pytest.raises(ValueError, match="budget"):
        _alloc({"a": [1, 1], "b": [1, 1]}, 1)
    with pytest.raises(ValueError, match="max rank"):
        _alloc({"a": [1, 1]}, 5, hi=3)
    with pytest.raises(ValueError, match="weights"):
        _alloc({"a": [1, 1]}, 2, weights={"a": -1.0})
    with pytest.raises(ValueError, match="costs lacks"):
        allocate_ranks({"a": torch.ones(2)}, {}, 2, {"a": 1.0}, {"a": 1}, {"a": 2})


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sensitivity_replaying_earlier_blocks_measures_the_same(family):
    """Blocks before the cut layer's give their recorded outputs instead of running again: the errors,
    so the ranks, are those of running the whole model for every layer (bit for bit)."""
    import transformers as tf

    from lrkd_fast import LowRankLinear
    from lrkd_fast.allocation import sensitivity_ranks
    from lrkd_fast.model_utils import find_blocks

    torch.manual_seed(0)
    if family == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                           intermediate_size=48))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    model.eval()
    blocks = find_blocks(model)
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and any(n.startswith(b + ".") for b in blocks)}
    assert len(blocks) == 3 and len(layers) >= 18
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    ranks = {n: 8 for n in layers}

    def truncation(name, rank):
        m = layers[name]
        return torch.linalg.svdvals(m.weight.detach().double()).pow(2), lambda: LowRankLinear.from_linear(m, rank)

    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (3, 7), generator=g),
                "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])} for _ in range(2)]
    replayed = sensitivity_ranks(model, ranks, shapes, truncation, batches, progress=False)
    whole = sensitivity_ranks(model, ranks, shapes, truncation, batches, progress=False, reuse_blocks=False)
    assert replayed == whole and replayed != ranks  # the measurement moved ranks, the same way
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in layers)  # every block and layer is back
