"""Hessian diagonal (Hutchinson) and diagonal share (sampled columns) against the dense float64 Hessian."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import Tensor

from helpers import QuadraticModel, assert_untouched, dense_hessian, quadratic_loss, snapshot, tanh_mlp_case
from lightning_hessian import Objective
from lightning_hessian.diagonal import _allocate, _stratified_ratio, diagonal_share, hessian_diagonal

BLOCKS = {"0": slice(0, 216), "2": slice(216, 816), "4": slice(816, 916)}  # tanh MLP 8-24-24-4, by module


def _dense_share(h: Tensor, cols: slice = slice(None)) -> float:
    h = h.detach().abs()
    return float(torch.diagonal(h)[cols].sum() / h[:, cols].sum())


def test_diagonal_within_standard_errors_of_dense() -> None:
    case = tanh_mlp_case()
    before = snapshot(case.model)
    objective = Objective(case.model, case.loss_fn, case.batches)
    est = hessian_diagonal(objective, n=60, seed=1)
    h = dense_hessian(case)
    true = torch.diagonal(h)
    z = (est.diagonal.cpu() - true) / est.stderr.cpu()
    assert est.n_samples == 60 and est.n_hvp == 60
    assert float((z.abs() < 3).double().mean()) > 0.97  # Gaussian-like errors, std error honest
    assert 0.7 < float(z.std()) < 1.3
    assert abs(est.trace - float(true.sum())) < 3.5 * est.trace_stderr
    assert [b.name for b in est.blocks] == list(BLOCKS) and [b.numel for b in est.blocks] == [216, 600, 100]
    for block in est.blocks:
        assert abs(block.trace - float(true[BLOCKS[block.name]].sum())) < 3.5 * block.trace_stderr
    assert_untouched(before, case.model)


def test_diagonal_is_exact_for_a_diagonal_hessian() -> None:
    """Rademacher v has v_i^2 = 1, so v * (D v) = diag(D) exactly, with zero standard error."""
    model = QuadraticModel(np.ones(6))
    with torch.no_grad():
        model.a.copy_(torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, 7.0], dtype=torch.float64)))
    est = hessian_diagonal(Objective(model, quadratic_loss, [None]), n=4)
    torch.testing.assert_close(est.diagonal, torch.diagonal(model.a), rtol=0, atol=1e-14)
    assert float(est.stderr.max()) == 0.0 and est.blocks[0].name == "_root"


def test_diagonal_reuses_given_products() -> None:
    case = tanh_mlp_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    gen = torch.Generator().manual_seed(5)
    vs = [torch.randint(0, 2, (objective.num_params,), generator=gen).float() * 2 - 1 for _ in range(3)]
    products = [(v, objective.hvp(v)) for v in vs]
    spent = objective.n_hvp
    est = hessian_diagonal(objective, n=3, products=products)
    assert est.n_hvp == 0 and objective.n_hvp == spent
    torch.testing.assert_close(est.diagonal.float(), torch.stack([v * hv for v, hv in products]).mean(0))
    more = hessian_diagonal(objective, n=5, products=products)
    assert more.n_hvp == 2 and more.n_samples == 5
    with pytest.raises(ValueError, match="Rademacher"):
        hessian_diagonal(objective, n=2, products=[(vs[0] * 0.5, products[0][1])])


def test_diagonal_share_is_exact_when_every_column_is_sampled() -> None:
    case = tanh_mlp_case()
    objective = Objective(case.model, case.loss_fn, case.batches, params="4.*")
    share = diagonal_share(objective, n_columns=1000, blocks=["4.weight", "4.bias"])
    h = dense_hessian(case, ["4.weight", "4.bias"])
    assert share.n_columns == 100 and share.n_hvp == 100
    assert share.value == pytest.approx(_dense_share(h), rel=1e-5)
    assert share.stderr == 0.0
    assert [b.name for b in share.blocks] == ["4.weight", "4.bias"]
    assert share.blocks[0].value == pytest.approx(_dense_share(h, slice(0, 96)), rel=1e-5)
    assert share.blocks[1].value == pytest.approx(_dense_share(h, slice(96, 100)), rel=1e-5)
    assert share.total_mass == pytest.approx(float(h.detach().abs().sum()), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagonal_share_within_standard_errors_of_dense(seed: int) -> None:
    case = tanh_mlp_case()
    before = snapshot(case.model)
    objective = Objective(case.model, case.loss_fn, case.batches)
    share = diagonal_share(objective, n_columns=200, seed=seed)
    h = dense_hessian(case)
    assert share.n_columns == 200 and share.n_hvp == 200
    assert 0 < share.stderr < 0.2 * share.value
    assert abs(share.value - _dense_share(h)) < 4 * share.stderr
    for block in share.blocks:
        assert abs(block.value - _dense_share(h, BLOCKS[block.name])) < 4 * block.stderr
    assert sum(b.n_columns for b in share.blocks) == 200
    assert_untouched(before, case.model)


def test_diagonal_share_standard_error_is_calibrated() -> None:
    """Over many column samples (drawn from the dense Hessian, as diagonal_share draws them), z-scores are ~N(0, 1)."""
    h = dense_hessian(tanh_mlp_case()).detach().abs().numpy()
    a_all, b_all = np.diag(h), h.sum(axis=0)
    truth = a_all.sum() / b_all.sum()
    sizes = [192, 24, 576, 24, 96, 4]
    starts = np.cumsum([0, *sizes[:-1]])
    alloc = _allocate(sizes, 120)
    rng = random.Random(0)
    z = []
    for _ in range(1000):
        strata = []
        for first, size, m in zip(starts, sizes, alloc):
            idx = first + np.array(rng.sample(range(size), m))
            strata.append((size, a_all[idx], b_all[idx]))
        value, stderr, _, _ = _stratified_ratio(strata)
        z.append((value - truth) / stderr)
    scores = np.asarray(z)
    assert abs(scores.mean()) < 0.2 and 0.85 < scores.std() < 1.2
    assert (np.abs(scores) < 2).mean() > 0.9


def test_share_of_a_diagonal_hessian_is_one() -> None:
    model = QuadraticModel(np.ones(50))
    with torch.no_grad():
        model.a.copy_(torch.diag(torch.linspace(-1, 2, 50, dtype=torch.float64)))
    share = diagonal_share(Objective(model, quadratic_loss, [None]), n_columns=10)
    assert share.value == pytest.approx(1.0) and share.stderr == pytest.approx(0.0, abs=1e-12)


def test_column_allocation() -> None:
    assert _allocate([216, 600, 100], 120) == [28, 78, 14]
    assert sum(_allocate([192, 24, 576, 24, 96, 4], 120)) == 120
    assert _allocate([1, 600, 3], 10) == [1, 7, 2]
    assert sum(_allocate([5, 7, 11], 23)) == 23
    assert _allocate([5, 7], 100) == [5, 7]


def test_too_few_columns_fail_early() -> None:
    case = tanh_mlp_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    with pytest.raises(ValueError, match="at least 12"):
        diagonal_share(objective, n_columns=5)
    with pytest.raises(ValueError, match="matches no parameter"):
        diagonal_share(objective, blocks=["nothing.*"])
    with pytest.raises(ValueError, match="n must be"):
        hessian_diagonal(objective, n=1)
