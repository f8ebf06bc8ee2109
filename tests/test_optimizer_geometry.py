"""Optimizer geometry: preconditioners read from optimizer state, stability thresholds, preconditioned sharpness.

Ground truth is independent of the code under test: preconditioners are recomputed by hand from
the optimizer's state here, the Hessian is the dense float64 one, thresholds are checked against
the real optimizers' dynamics on 1-D quadratics, and the next update against a real ``step()``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from helpers import Case, dense_hessian, tanh_mlp_case
from lightning_hessian import Objective
from lightning_hessian.optimizer_geometry import (
    GeometryUnavailableError,
    next_update,
    read_preconditioner,
    stability_threshold,
)
from lightning_hessian.stability import preconditioned_sharpness

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
MakeFromParams = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _train(case: Case, optimizers: list[torch.optim.Optimizer], steps: int = 5) -> None:
    total = sum(b[0].shape[0] for b in case.batches)
    for _ in range(steps):
        for opt in optimizers:
            opt.zero_grad()
        loss = sum(case.loss_fn(case.model, b) * (b[0].shape[0] / total) for b in case.batches)
        assert isinstance(loss, Tensor)
        loss.backward()
        for opt in optimizers:
            opt.step()


def _frozen(optimizers: list[torch.optim.Optimizer]) -> list[Any]:
    """Everything an analysis must leave untouched in the optimizers, cloned."""
    out = []
    for opt in optimizers:
        state = {
            id(p): {k: (v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)) for k, v in s.items()}
            for p, s in opt.state.items()
        }
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        out.append((state, copy.deepcopy(groups), [[id(p) for p in g["params"]] for g in opt.param_groups]))
    return out


def _assert_bit_identical(before: list[Any], optimizers: list[torch.optim.Optimizer]) -> None:
    for (state, groups, ids), opt in zip(before, optimizers):
        assert set(state) == {id(p) for p in opt.state}, "optimizer.state gained or lost entries"
        for p, s in opt.state.items():
            assert set(s) == set(state[id(p)])
            for k, v in s.items():
                if isinstance(v, Tensor):
                    assert v.dtype == state[id(p)][k].dtype and torch.equal(v, state[id(p)][k]), k
                else:
                    assert v == state[id(p)][k], k
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
        assert [[id(p) for p in g["params"]] for g in opt.param_groups] == ids


def _by_hand(case: Case, optimizers: list[torch.optim.Optimizer]) -> tuple[Tensor, Tensor]:
    """``(D, k)`` per coordinate, recomputed from the state with the optimizers' own formulas."""
    d_parts, k_parts = [], []
    owner = {id(p): (opt, g) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    for p in case.model.parameters():
        opt, g = owner[id(p)]
        st, lr = opt.state.get(p, {}), float(g["lr"])
        if isinstance(opt, torch.optim.Adam):  # AdamW is an Adam
            b1, b2 = g["betas"]
            t = float(st["step"])
            v = st["max_exp_avg_sq"] if g["amsgrad"] else st["exp_avg_sq"]
            precond = (v.double() / (1 - b2**t)).sqrt() + g["eps"]
            d, k = lr / (1 - b1**t) / precond, (2 + 2 * b1) / (1 - b1)
        elif isinstance(opt, torch.optim.RMSprop):
            sq = st["square_avg"].double()
            if g["centered"]:
                sq = sq - st["grad_avg"].double() ** 2
            d, k = lr / (sq.sqrt() + g["eps"]), 2 + 2 * g["momentum"]
        elif isinstance(opt, torch.optim.Adagrad):
            t = float(st["step"])
            d, k = lr / (1 + (t - 1) * g["lr_decay"]) / (st["sum"].double().sqrt() + g["eps"]), 2.0
        else:
            b, tau = g["momentum"], g["dampening"]
            k = 2.0 if b == 0 else ((2 + 2 * b) / (1 + 2 * b) if g["nesterov"] else (2 + 2 * b) / (1 - tau))
            d = torch.full_like(p, lr, dtype=torch.float64)
        d_parts.append(d.reshape(-1))
        k_parts.append(torch.full((p.numel(),), k, dtype=torch.float64))
    return torch.cat(d_parts), torch.cat(k_parts)


def _dense_ratio(case: Case, d: Tensor, k: Tensor) -> float:
    root = (d / k).sqrt()
    h = dense_hessian(case)
    return float(torch.linalg.eigvalsh(root[:, None] * h * root[None, :]).max())


def _two_groups(model: nn.Module, lrs: tuple[float, float]) -> list[dict[str, Any]]:
    params = list(model.parameters())
    return [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]


OPTIMIZERS: dict[str, MakeOptimizer] = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    "adamw_two_groups": lambda m: torch.optim.AdamW(_two_groups(m, (1e-2, 1e-3)), betas=(0.8, 0.99), weight_decay=0.1),
    "adam_amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True),
    "adam_tensor_lr": lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(2e-3), foreach=False),
    "rmsprop_centered_two_groups": lambda m: torch.optim.RMSprop(
        _two_groups(m, (1e-3, 3e-4)), centered=True, momentum=0.5
    ),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05, lr_decay=0.1),
    "sgd_momentum_two_groups": lambda m: torch.optim.SGD(_two_groups(m, (0.05, 0.2)), momentum=0.9),
    "sgd_nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.8, nesterov=True),
    "sgd_dampening": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.5),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_preconditioned_sharpness_matches_dense_hessian(name: str) -> None:
    case = tanh_mlp_case()
    opt = OPTIMIZERS[name](case.model)
    _train(case, [opt])
    before = _frozen([opt])
    d, k = _by_hand(case, [opt])
    objective = Objective(case.model, case.loss_fn, case.batches)

    pre = read_preconditioner(objective, opt)
    assert pre.ok and pre.message == ""
    torch.testing.assert_close(pre.step_scale.double(), d, rtol=1e-5, atol=0)
    result = preconditioned_sharpness(objective, opt, tol=1e-5, max_hvp=300)

    expected = _dense_ratio(case, d, k)
    assert result.converged
    assert result.ratio == pytest.approx(expected, rel=1e-3)
    ref = pre.reference
    assert result.threshold == pytest.approx(ref.threshold_constant / ref.lr)
    assert result.value == pytest.approx(result.ratio * result.threshold)
    assert result.mixed == name.endswith("two_groups")
    assert result.n_hvp > 0 and result.error_bound <= 1e-5 * abs(result.value) + 1e-12
    _assert_bit_identical(before, [opt])


def test_single_group_value_is_lambda_max_of_preconditioned_hessian() -> None:
    """With one group the reported value is Cohen et al.'s lambda_max(P_t^{-1/2} H P_t^{-1/2}), threshold 38/lr."""
    case = tanh_mlp_case(seed=1)
    lr, beta1 = 2e-3, 0.9
    opt = torch.optim.Adam(case.model.parameters(), lr=lr, betas=(beta1, 0.999))
    _train(case, [opt], steps=4)
    precond = []
    for p in case.model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        precond.append((1 - beta1**t) * ((st["exp_avg_sq"].double() / (1 - 0.999**t)).sqrt() + 1e-8).reshape(-1))
    root = 1 / torch.cat(precond).sqrt()
    dense = float(torch.linalg.eigvalsh(root[:, None] * dense_hessian(case) * root[None, :]).max())
    result = preconditioned_sharpness(Objective(case.model, case.loss_fn, case.batches), opt, tol=1e-5, max_hvp=300)
    assert result.threshold == pytest.approx(38 / lr)
    assert result.value == pytest.approx(dense, rel=1e-3)
    assert result.rule == "adam" and not result.mixed


def test_sgd_value_is_lambda_max() -> None:
    case = tanh_mlp_case()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.3)
    result = preconditioned_sharpness(Objective(case.model, case.loss_fn, case.batches), opt, tol=1e-5, max_hvp=300)
    assert result.value == pytest.approx(float(torch.linalg.eigvalsh(dense_hessian(case)).max()), rel=1e-3)
    assert result.threshold == pytest.approx(2 / 0.3)


def test_two_optimizers_and_untracked_parameters() -> None:
    """Parameters split over SGD and Adam give one ratio; a parameter no optimizer holds drops out (D = 0)."""
    case = tanh_mlp_case()
    params = list(case.model.parameters())
    sgd = torch.optim.SGD(params[:2], lr=0.05, momentum=0.9)
    adam = torch.optim.Adam(params[2:5], lr=1e-3)
    _train(case, [sgd, adam])
    before = _frozen([sgd, adam])
    objective = Objective(case.model, case.loss_fn, case.batches)
    pre = read_preconditioner(objective, [sgd, adam])
    assert pre.untracked == ("4.bias",)
    assert {g.rule for g in pre.groups} == {"heavy_ball", "adam"}
    result = preconditioned_sharpness(objective, pre, tol=1e-5, max_hvp=300)

    owner = {id(p): (o, g) for o in (sgd, adam) for g in o.param_groups for p in g["params"]}
    parts_d, parts_k = [], []
    for p in params:
        if id(p) not in owner:
            parts_d.append(torch.zeros(p.numel(), dtype=torch.float64))
            parts_k.append(torch.ones(p.numel(), dtype=torch.float64))
            continue
        if owner[id(p)][0] is sgd:
            parts_d.append(torch.full((p.numel(),), 0.05, dtype=torch.float64))
            parts_k.append(torch.full((p.numel(),), 3.8, dtype=torch.float64))
        else:
            st = adam.state[p]
            t = float(st["step"])
            pre_p = (st["exp_avg_sq"].double() / (1 - 0.999**t)).sqrt() + 1e-8
            parts_d.append((1e-3 / (1 - 0.9**t) / pre_p).reshape(-1))
            parts_k.append(torch.full((p.numel(),), 38.0, dtype=torch.float64))
    assert result.ratio == pytest.approx(_dense_ratio(case, torch.cat(parts_d), torch.cat(parts_k)), rel=1e-3)
    assert result.mixed
    _assert_bit_identical(before, [sgd, adam])


def test_parameter_subset_follows_objective_order() -> None:
    case = tanh_mlp_case()
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-3)
    _train(case, [opt])
    objective = Objective(case.model, case.loss_fn, case.batches, params=["4.*", "0.weight"])
    pre = read_preconditioner(objective, opt)
    d, _ = _by_hand(case, [opt])
    sizes = [p.numel() for p in case.model.parameters()]
    pieces = list(d.split(sizes))
    expected = torch.cat([pieces[0], pieces[4], pieces[5]])  # named_parameters() order: 0.weight, 4.weight, 4.bias
    torch.testing.assert_close(pre.step_scale.double(), expected, rtol=1e-5, atol=0)


def test_warm_start_reuses_the_previous_vector() -> None:
    case = tanh_mlp_case()
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-3)
    _train(case, [opt])
    objective = Objective(case.model, case.loss_fn, case.batches)
    cold = preconditioned_sharpness(objective, opt, tol=1e-4, max_hvp=300)
    warm = preconditioned_sharpness(objective, opt, tol=1e-4, max_hvp=300, init=cold)
    assert warm.converged and warm.value == pytest.approx(cold.value, rel=1e-3)
    assert warm.n_hvp < cold.n_hvp


def test_unsupported_optimizer_says_so() -> None:
    case = tanh_mlp_case()
    opt = torch.optim.Adamax(case.model.parameters())
    _train(case, [opt], steps=1)
    before = _frozen([opt])
    objective = Objective(case.model, case.loss_fn, case.batches)
    pre = read_preconditioner(objective, opt)
    assert pre.status == "unsupported" and not pre.ok
    assert "Adamax is not supported" in pre.message and "RMSprop" in pre.message
    with pytest.raises(GeometryUnavailableError, match="unsupported"):
        preconditioned_sharpness(objective, opt)
    with pytest.raises(ValueError, match="Adamax"):
        stability_threshold(opt)
    assert next_update(objective, opt, objective.grad()).status == "unsupported"
    _assert_bit_identical(before, [opt])


def test_maximize_is_unsupported() -> None:
    case = tanh_mlp_case()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1, maximize=True)
    pre = read_preconditioner(Objective(case.model, case.loss_fn, case.batches), opt)
    assert pre.status == "unsupported" and "maximize" in pre.message


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.Adam(m.parameters()),
        lambda m: torch.optim.RMSprop(m.parameters()),
        lambda m: torch.optim.Adagrad(m.parameters()),  # creates its state eagerly, with step 0
    ],
)
def test_no_state_before_the_first_step(make: MakeOptimizer) -> None:
    case = tanh_mlp_case()
    opt = make(case.model)
    before = _frozen([opt])
    objective = Objective(case.model, case.loss_fn, case.batches)
    pre = read_preconditioner(objective, opt)
    assert pre.status == "no_state" and "first step" in pre.message
    assert len(pre.without_state) == 6
    with pytest.raises(GeometryUnavailableError, match="no_state"):
        preconditioned_sharpness(objective, opt)
    _assert_bit_identical(before, [opt])


def test_zero_learning_rate_is_degenerate() -> None:
    case = tanh_mlp_case()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.0)
    with pytest.raises(GeometryUnavailableError, match="degenerate"):
        preconditioned_sharpness(Objective(case.model, case.loss_fn, case.batches), opt)


def test_sgd_needs_no_state() -> None:
    case = tanh_mlp_case()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.9)
    pre = read_preconditioner(Objective(case.model, case.loss_fn, case.batches), opt)
    assert pre.ok and len(opt.state) == 0


def test_parameter_in_two_optimizers_is_an_error() -> None:
    case = tanh_mlp_case()
    a = torch.optim.SGD(case.model.parameters(), lr=0.1)
    b = torch.optim.SGD(list(case.model.parameters())[:1], lr=0.1)
    with pytest.raises(ValueError, match="two parameter groups"):
        read_preconditioner(Objective(case.model, case.loss_fn, case.batches), [a, b])


def test_wrapper_with_optimizer_attribute_is_unwrapped() -> None:
    class Wrapper:
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    case = tanh_mlp_case()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    assert read_preconditioner(Objective(case.model, case.loss_fn, case.batches), Wrapper(opt)).ok
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        read_preconditioner(Objective(case.model, case.loss_fn, case.batches), object())


# ----------------------------------------------------------------------------- thresholds


def test_thresholds_closed_forms() -> None:
    w = [nn.Parameter(torch.zeros(3))]
    assert stability_threshold(torch.optim.SGD(w, lr=0.1)) == pytest.approx(20.0)
    assert stability_threshold(torch.optim.SGD(w, lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    assert stability_threshold(torch.optim.SGD(w, lr=0.1, momentum=0.9, nesterov=True)) == pytest.approx(
        3.8 / (2.8 * 0.1)
    )
    assert stability_threshold(torch.optim.SGD(w, lr=0.1, momentum=0.9, dampening=0.9)) == pytest.approx(380.0)
    assert stability_threshold(torch.optim.Adam(w, lr=1e-3)) == pytest.approx(38e3)
    assert stability_threshold(torch.optim.AdamW(w, lr=1e-3, betas=(0.0, 0.99))) == pytest.approx(2e3)
    assert stability_threshold(torch.optim.RMSprop(w, lr=1e-2)) == pytest.approx(200.0)
    assert stability_threshold(torch.optim.RMSprop(w, lr=1e-2, momentum=0.5)) == pytest.approx(300.0)
    assert stability_threshold(torch.optim.Adagrad(w, lr=0.5)) == pytest.approx(4.0)
    two = torch.optim.SGD([{"params": w, "lr": 0.1}, {"params": [nn.Parameter(torch.zeros(9))], "lr": 1.0}])
    assert stability_threshold(two) == pytest.approx(2.0)  # the group with more entries
    assert stability_threshold(two, group=0) == pytest.approx(20.0)


def _final_size(make: MakeFromParams, curvature: float, steps: int) -> float:
    x = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = make([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * x**2).sum().backward()
        opt.step()
    return abs(float(x.detach()))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.7, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5),
    ],
)
def test_threshold_is_where_real_sgd_turns_unstable(make: MakeFromParams) -> None:
    """On L = lambda x^2 / 2, torch's own SGD converges 5 % below the threshold and diverges 5 % above."""
    threshold = stability_threshold(make([nn.Parameter(torch.zeros(1))]))
    assert _final_size(make, 0.95 * threshold, 1200) < 1e-3
    assert _final_size(make, 1.05 * threshold, 1200) > 1e3


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9, 0.99])
def test_adam_threshold_is_the_edge_of_its_linearised_recurrence(beta1: float) -> None:
    """Frozen preconditioner, x <- x - lr m, m <- beta1 m + (1 - beta1) lambda x: spectral radius 1 at the threshold."""
    lr = 1e-3
    threshold = stability_threshold(torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=lr, betas=(beta1, 0.999)))

    def radius(lam: float) -> float:
        # state (x_t, m_{t-1}): m_t = beta1 m_{t-1} + (1 - beta1) lam x_t; x_{t+1} = x_t - lr m_t
        a = np.array([[1 - lr * (1 - beta1) * lam, -lr * beta1], [(1 - beta1) * lam, beta1]])
        return float(np.abs(np.linalg.eigvals(a)).max())

    assert radius(0.999 * threshold) < 1 < radius(1.001 * threshold)
    assert math.isclose(radius(threshold), 1.0, rel_tol=1e-9)


# ----------------------------------------------------------------------------- the next update


UPDATES: dict[str, MakeOptimizer] = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=3e-3, weight_decay=0.01),
    "adamw_amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, amsgrad=True, weight_decay=0.1),
    "rmsprop_centered_momentum": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, centered=True, momentum=0.9),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, weight_decay=0.01),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05, lr_decay=0.1, initial_accumulator_value=0.1),
    "sgd_nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
    "sgd_dampening_two_groups": lambda m: torch.optim.SGD(_two_groups(m, (0.05, 0.2)), momentum=0.9, dampening=0.3),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
}


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("name", list(UPDATES))
def test_next_update_matches_a_real_step(name: str, steps: int) -> None:
    case = tanh_mlp_case()
    opt = UPDATES[name](case.model)
    _train(case, [opt], steps=steps)
    objective = Objective(case.model, case.loss_fn, case.batches)
    g = objective.grad()
    before = _frozen([opt])
    predicted = next_update(objective, opt, g)
    _assert_bit_identical(before, [opt])
    assert predicted.status == "ok" and predicted.displacement is not None

    model2 = copy.deepcopy(case.model)
    opt2 = UPDATES[name](model2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
    theta = objective.parameters()
    for p, gp in zip(model2.parameters(), objective.split(g)):
        p.grad = gp.clone()
    opt2.step()
    actual = torch.cat([p.detach().reshape(-1) for p in model2.parameters()]) - theta
    torch.testing.assert_close(predicted.displacement, actual, rtol=1e-4, atol=1e-7)
    assert predicted.reference_lr == pytest.approx(float(opt.param_groups[-1]["lr"]))
