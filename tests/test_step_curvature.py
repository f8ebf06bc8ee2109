"""Step curvature (g.Hg/g.g, d.Hd/d.d, critical learning rate, model fidelity) against dense H and exact losses."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from helpers import Case, QuadraticModel, assert_untouched, dense_hessian, quadratic_loss, snapshot, tanh_mlp_case
from lightning_hessian import Objective
from lightning_hessian.optimizer_geometry import read_preconditioner
from lightning_hessian.step_curvature import step_curvature
from test_optimizer_geometry import _assert_bit_identical, _frozen, _train


def _exact_loss(case: Case, theta: Tensor) -> float:
    """The sample-weighted probe loss at flat parameters ``theta``, in float64 on a copy of the model."""
    model = copy.deepcopy(case.model).double().eval()
    with torch.no_grad():
        for p, piece in zip(model.parameters(), theta.double().split([p.numel() for p in model.parameters()])):
            p.copy_(piece.view_as(p))
        total = sum(b[0].shape[0] for b in case.batches)
        return float(sum(case.loss_fn(model, (b[0].double(), b[1])) * b[0].shape[0] / total for b in case.batches))


def _real_step(case: Case, opt: torch.optim.Optimizer, make: Any, g: Tensor) -> Tensor:
    """The displacement of a real ``step()`` on copies of the model and optimizer, with gradient ``g``."""
    model = copy.deepcopy(case.model)
    twin = make(model)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
    sizes = [p.numel() for p in model.parameters()]
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for p, gp in zip(model.parameters(), g.split(sizes)):
        p.grad = gp.view_as(p).clone()
    twin.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before


MAKERS = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
    "rmsprop_centered": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, centered=True),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_step_curvature_along_the_update_matches_dense_hessian_and_exact_losses(name: str) -> None:
    case = tanh_mlp_case()
    make = MAKERS[name]
    opt = make(case.model)
    _train(case, [opt], steps=5)
    objective = Objective(case.model, case.loss_fn, case.batches)
    before_opt, before_model = _frozen([opt]), snapshot(case.model)

    result = step_curvature(objective, opt)

    lr = float(opt.param_groups[0]["lr"])
    g = objective.grad().double()
    h = dense_hessian(case)
    d = -_real_step(case, opt, make, objective.grad()).double() / lr
    theta = objective.parameters().double()
    g_hg, d_hd, g_d = float(g @ h @ g), float(d @ h @ d), float(g @ d)
    predicted = -lr * g_d + 0.5 * lr**2 * d_hd
    actual = _exact_loss(case, theta - lr * d) - _exact_loss(case, theta)

    assert result.direction == "update" and result.lr == pytest.approx(lr)
    assert result.gradient_curvature == pytest.approx(g_hg / float(g @ g), rel=1e-4)
    assert result.direction_curvature == pytest.approx(d_hd / float(d @ d), rel=1e-3)
    # the step size where the model's decrease returns to zero; none (inf) without positive curvature
    expected_critical = 2 * g_d / d_hd if d_hd > 0 else (math.inf if g_d > 0 else -math.inf)
    assert result.critical_lr == pytest.approx(expected_critical, rel=1e-3)
    assert result.gradient_critical_lr == pytest.approx(2 * float(g @ g) / g_hg, rel=1e-4)
    assert result.predicted_change == pytest.approx(predicted, rel=1e-3)
    assert result.actual_change == pytest.approx(actual, rel=2e-2, abs=2e-6)
    assert result.model_fidelity == pytest.approx(actual / predicted, rel=2e-2, abs=1e-3)
    assert result.n_hvp == 2 and result.n_loss == 2
    _assert_bit_identical(before_opt, [opt])
    assert_untouched(before_model, case.model)


def test_exact_on_a_quadratic() -> None:
    """For a quadratic loss the model is exact: fidelity 1, and a step of the critical lr changes nothing."""
    model = QuadraticModel(np.array([5.0, 2.0, 1.0, 0.5, -0.3]), seed=3)
    objective = Objective(model, quadratic_loss, [None])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = step_curvature(objective, opt, direction="gradient")
    assert result.model_fidelity == pytest.approx(1.0, rel=1e-9)
    a = model.a
    g = a @ (model.theta.detach() - model.c)
    assert result.gradient_curvature == pytest.approx(float(g @ a @ g / (g @ g)), rel=1e-12)
    assert result.critical_lr == result.gradient_critical_lr
    at_critical = step_curvature(objective, opt, direction="gradient", lr=result.critical_lr)
    assert at_critical.actual_change == pytest.approx(0.0, abs=1e-12 * abs(objective.loss()))
    assert result.n_hvp == 1  # d = g shares its product


def test_preconditioned_and_given_directions() -> None:
    case = tanh_mlp_case()
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-3)
    _train(case, [opt], steps=3)
    objective = Objective(case.model, case.loss_fn, case.batches)
    pre = read_preconditioner(objective, opt)
    g = objective.grad()
    d = pre.step_scale * g / 1e-3
    a = step_curvature(objective, opt, direction="preconditioned", gradient=g)
    b = step_curvature(objective, direction=d, lr=1e-3, gradient=g, loss=objective.loss())
    h = dense_hessian(case)
    dd = d.double()
    assert a.direction == "preconditioned" and b.direction == "given"
    assert a.direction_curvature == pytest.approx(float(dd @ h @ dd / (dd @ dd)), rel=1e-3)
    assert a.critical_lr == pytest.approx(b.critical_lr, rel=1e-6)
    assert a.model_fidelity == pytest.approx(b.model_fidelity, rel=1e-6)
    assert b.n_loss == 1  # the base loss was given
    assert 0 < a.cosine <= 1


def test_without_lr_the_fidelity_is_skipped() -> None:
    case = tanh_mlp_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    result = step_curvature(objective, direction="gradient")
    assert math.isnan(result.model_fidelity) and result.n_loss == 0


def test_user_errors_fail_early() -> None:
    case = tanh_mlp_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    with pytest.raises(ValueError, match="needs the optimizer"):
        step_curvature(objective)
    with pytest.raises(ValueError, match="lr must be"):
        step_curvature(objective, direction="gradient", lr=-1.0)
    with pytest.raises(ValueError, match="shape"):
        step_curvature(objective, direction=torch.zeros(3))
    with pytest.raises(ValueError, match="direction must be"):
        step_curvature(objective, direction="sideways")  # type: ignore[arg-type]
    adamax = torch.optim.Adamax(case.model.parameters())
    with pytest.raises(ValueError, match="not supported"):
        step_curvature(objective, adamax)
    assert step_curvature(objective, adamax, direction="gradient").lr == pytest.approx(2e-3)


def test_negative_curvature_and_ascent_directions() -> None:
    model = QuadraticModel(np.array([-1.0, -2.0]), seed=0)
    objective = Objective(model, quadratic_loss, [None])
    down = step_curvature(objective, direction="gradient", lr=0.1)
    assert down.critical_lr == math.inf  # concave: the model predicts a decrease at every step size
    up = step_curvature(objective, direction=-objective.grad(), lr=0.1)
    assert up.critical_lr == -math.inf and up.cosine == pytest.approx(-1.0)


def test_models_with_untracked_parameters() -> None:
    """A parameter no optimizer holds does not move: its part of the update direction is zero."""
    case = tanh_mlp_case()
    params = list(case.model.parameters())
    opt = torch.optim.SGD(params[:4], lr=0.1)
    objective = Objective(case.model, case.loss_fn, case.batches)
    result = step_curvature(objective, opt)
    g = objective.grad().double()
    d = g.clone()
    d[sum(p.numel() for p in params[:4]) :] = 0
    assert result.cosine == pytest.approx(float(g @ d / (g.norm() * d.norm())), rel=1e-5)
