"""WhitenedAdamW against torch's AdamW (identity bases, and the reparametrized problem it stands for);
the whitening basis; the Distiller's optimizer="whitened"."""
import copy

import pytest
import torch
import transformers

from lrkd_fast import LowRankConfig, swap_linear_layers
from lrkd_fast.distillation import DistillConfig, Distiller
from lrkd_fast.layers import LowRankLinear
from lrkd_fast.optim import WhitenedAdamW, whitening_basis
from lrkd_fast.swap.init import collect_input_grams


def _steps(opt, params, grad_fn, n):
    for i in range(n):
        opt.zero_grad()
        for p, g in zip(params, grad_fn(i, params)):
            p.grad = g
        opt.step()


def test_identity_bases_take_torch_adamw_steps():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True),
         torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    grads = [[torch.randn(p.shape, dtype=torch.float64, generator=g) for p in a] for _ in range(6)]
    mine = WhitenedAdamW(a, {a[0]: torch.eye(6, dtype=torch.float64)}, lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=0.01, weight_decay=0.1)
    _steps(mine, a, lambda i, _: grads[i], 6)
    _steps(ref, b, lambda i, _: grads[i], 6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_a_basis_is_adamw_on_the_reparametrized_factor():
    # minimizing f(U) with steps in p = M p' is AdamW on f(M U') over U'
    g = torch.Generator().manual_seed(1)
    d, r = 5, 2
    x = torch.randn(40, d, dtype=torch.float64, generator=g) @ torch.randn(d, d, dtype=torch.float64, generator=g)
    y = torch.randn(40, 3, dtype=torch.float64, generator=g)
    V = torch.randn(r, 3, dtype=torch.float64, generator=g)
    M = torch.randn(d, d, dtype=torch.float64, generator=g) + 3 * torch.eye(d, dtype=torch.float64)
    U = torch.randn(d, r, dtype=torch.float64, generator=g).requires_grad_(True)
    U0 = U.detach().clone()
    Up = torch.linalg.solve(M, U0).requires_grad_(True)
    loss = lambda u: ((x @ u @ V - y) ** 2).mean()  # noqa: E731
    mine = WhitenedAdamW([U], {U: M}, lr=0.05)
    ref = torch.optim.AdamW([Up], lr=0.05, weight_decay=0.0)
    _steps(mine, [U], lambda i, ps: torch.autograd.grad(loss(ps[0]), ps[0]), 8)
    _steps(ref, [Up], lambda i, ps: torch.autograd.grad(loss(M @ ps[0]), ps[0]), 8)
    torch.testing.assert_close(U, M @ Up, rtol=0, atol=1e-12)
    assert loss(U) < loss(U0)


def test_whitening_basis_whitens_the_damped_gram_to_its_scale():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, dtype=torch.float64, generator=g) @ torch.randn(6, 6, dtype=torch.float64, generator=g)
    gram = x.t() @ x / 200
    M = whitening_basis(gram, damping=1e-3)
    c2 = gram.diagonal().mean()
    damped = gram + 1e-3 * c2 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(M.t() @ damped @ M, c2 * torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("gram, damping, msg", [
    (torch.zeros(3, 4), 1e-2, "square"), (torch.zeros(0, 0), 1e-2, "non-empty"),
    (torch.full((2, 2), float("nan")), 1e-2, "NaN"), (torch.zeros(3, 3), 1e-2, "saw no input"),
    (torch.eye(3), 0.0, "damping must be > 0"), (-5 * torch.eye(2), 1e-2, "no positive diagonal"),
    (torch.tensor([[1.0, 5.0], [5.0, 1.0]]), 1e-2, "not positive semi-definite")])
def test_whitening_basis_refuses_bad_grams(gram, damping, msg):
    with pytest.raises(ValueError, match=msg):
        whitening_basis(gram, damping, name="layer")


def test_whitened_adamw_checks_its_arguments():
    p, q = torch.zeros(3, 2, requires_grad=True), torch.zeros(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"must be \(3, 3\)"):
        WhitenedAdamW([p], {p: torch.eye(2)})
    with pytest.raises(ValueError, match="not among params"):
        WhitenedAdamW([p], {q: torch.eye(3)})
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
            WhitenedAdamW([p], lr=bad)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        WhitenedAdamW([p], weight_decay=float("nan"))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        DistillConfig(optimizer="sgd")
    for field, value in (("whiten_batches", 0), ("whiten_damping", 0.0), ("whiten_max_features", 0)):
        with pytest.raises(ValueError, match=field):
            DistillConfig(**{field: value})


def _tiny():
    torch.manual_seed(0)
    teacher = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=64)).double().eval()
    student = copy.deepcopy(teacher)
    swap_linear_layers(student, LowRankConfig(rank=0.5, target_modules=r"encoder\..*"), progress=False)
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(4):
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[1, 6:] = 0
        batches.append({"input_ids": torch.randint(0, 100, (4, 10), generator=g), "attention_mask": mask})
    return teacher, student, batches


def test_distiller_bases_come_from_the_teachers_inputs_and_the_limit():
    teacher, student, batches = _tiny()
    d = Distiller(student, teacher, DistillConfig(optimizer="whitened", whiten_max_features=32, progress=False))
    bases = d.whitening_bases(batches)
    lowrank = {n: m for n, m in student.named_modules() if isinstance(m, LowRankLinear)}
    small = {n: m for n, m in lowrank.items() if m.in_features <= 32}
    assert 0 < len(small) < len(lowrank)  # the 64-input FFN outputs are left to plain steps
    grams = collect_input_grams(teacher, {n: teacher.get_submodule(n) for n in small}, batches, progress=False)
    assert {id(p) for p in bases} == {id(m.U) for m in small.values()}
    for n, m in small.items():
        torch.testing.assert_close(bases[m.U], whitening_basis(grams[n], 1e-2), rtol=0, atol=0)
    d.close()


def _run(student, teacher, batches, resume=None, **kw):
    d = Distiller(copy.deepcopy(student) if resume is None else student, teacher,
                  DistillConfig(steps=4, lr=1e-2, warmup=0.0, progress=False, **kw))
    try:
        return d.train(batches, resume_from=resume)["loss"], d.trainable_state()
    finally:
        d.close()


def test_whitened_run_with_no_layer_whitened_matches_adamw_and_resumes(tmp_path):
    teacher, student, batches = _tiny()
    adamw = _run(student, teacher, batches, optimizer="adamw")
    none_whitened = _run(student, teacher, batches, optimizer="whitened", whiten_max_features=1)
    assert none_whitened[0] == pytest.approx(adamw[0], rel=1e-10)
    for k, v in adamw[1].items():
        torch.testing.assert_close(none_whitened[1][k], v, rtol=0, atol=1e-10)
    # whitened for real: other steps than AdamW's, and a resumed run takes the same steps as an unbroken one
    unbroken = _run(student, teacher, batches, optimizer="whitened", whiten_batches=2,
                    checkpoint_dir=str(tmp_path), checkpoint_every=2)
    u = next(k for k in adamw[1] if k.endswith(".U"))
    assert (unbroken[1][u] - adamw[1][u]).abs().max() > 1e-4
    resumed = _run(copy.deepcopy(student), teacher, batches, resume=str(tmp_path / "step-2.pt"), optimizer="whitened",
                   whiten_batches=2)
    assert resumed[0] == unbroken[0]
    for k, v in unbroken[1].items():
        torch.testing.assert_close(resumed[1][k], v, rtol=0, atol=0)
