"""Optimizer-geometry instruments (OptimizerCurvature, StepCurvature, HessianDiagonal) against dense float64 Hessians.

Ground truth is independent of the code under test: preconditioners are recomputed by hand from
the optimizer state, the next update is a real ``step()`` on copies, losses are exact float64
evaluations, and Hessians are dense (``torch.func.hessian``).
"""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from helpers import Case, assert_untouched, compute_dense_hessian, dense_hessian, snapshot
from lightning_hessian import HessianMonitor, Objective
from lightning_hessian.instruments import (
    Eigenvalues,
    HessianDiagonal,
    OptimizerCurvature,
    StepCurvature,
    run_instruments,
)
from lightning_hessian.optim import TrustRegion
from lightning_models import TanhModule, probe_loader, probe_loss, train_loader, trainer_kwargs
from test_optimizer_geometry import _assert_bit_identical, _frozen


def _ce(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _small_case(seed: int = 0) -> Case:
    """A 5-8-3 tanh net (75 parameters, two modules): dense Hessians in milliseconds."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    return Case(f"small_tanh_{seed}", model, _ce, [(x[:40], y[:40]), (x[40:], y[40:])])


def _train(case: Case, opt: torch.optim.Optimizer, steps: int = 6) -> None:
    total = sum(b[0].shape[0] for b in case.batches)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(case.loss_fn(case.model, b) * (b[0].shape[0] / total) for b in case.batches)
        assert isinstance(loss, Tensor)
        loss.backward()
        opt.step()


def _adam_scale(params: list[Tensor], state: dict[Tensor, Any], lr: float, betas: tuple[float, float]) -> Tensor:
    """``D = lr / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)`` per coordinate, by hand."""
    b1, b2 = betas
    parts = []
    for p in params:
        st = state[p]
        t = float(st["step"])
        precond = (st["exp_avg_sq"].double() / (1 - b2**t)).sqrt() + 1e-8
        parts.append((lr / (1 - b1**t) / precond).reshape(-1))
    return torch.cat(parts)


def _top(h: Tensor, scale: Tensor) -> float:
    root = scale.sqrt()
    return float(torch.linalg.eigvalsh(root[:, None] * h * root[None, :]).max())


def _two_groups(model: nn.Module, lrs: tuple[float, float]) -> list[dict[str, Any]]:
    params = list(model.parameters())
    return [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]


# ---------------------------------------------------------------------------------------- OptimizerCurvature
def _by_hand(case: Case, name: str, opt: torch.optim.Optimizer) -> tuple[Tensor, Tensor, float]:
    """``(D, k, threshold of the reference group)`` recomputed from the optimizer's state."""
    params = list(case.model.parameters())
    sizes = [p.numel() for p in params]
    if name == "adam":
        return (
            _adam_scale(params, opt.state, 3e-3, (0.9, 0.999)),
            torch.full((sum(sizes),), 38.0, dtype=torch.float64),
            38 / 3e-3,
        )
    if name == "adamw_two_groups":  # betas (0.8, 0.99): k = 3.6 / 0.2 = 18; group 1 (48 of 75 entries) is the reference
        d1 = _adam_scale(params[:2], opt.state, 1e-2, (0.8, 0.99))
        d2 = _adam_scale(params[2:], opt.state, 1e-3, (0.8, 0.99))
        return torch.cat([d1, d2]), torch.full((sum(sizes),), 18.0, dtype=torch.float64), 18 / 1e-2
    if name == "sgd_momentum_two_groups":  # heavy ball 0.9: k = 3.8; group 1 (48 of 75 entries) is the reference
        d = torch.cat([torch.full((sizes[0] + sizes[1],), 0.05), torch.full((sizes[2] + sizes[3],), 0.2)])
        return d.double(), torch.full((sum(sizes),), 3.8, dtype=torch.float64), 3.8 / 0.05
    if name == "rmsprop_centered":
        parts = []
        for p in params:
            st = opt.state[p]
            sq = st["square_avg"].double() - st["grad_avg"].double() ** 2
            parts.append((1e-3 / (sq.sqrt() + 1e-8)).reshape(-1))
        return torch.cat(parts), torch.full((sum(sizes),), 2.0, dtype=torch.float64), 2 / 1e-3
    raise AssertionError(name)


OPTIMIZERS = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    "adamw_two_groups": lambda m: torch.optim.AdamW(_two_groups(m, (1e-2, 1e-3)), betas=(0.8, 0.99), weight_decay=0.1),
    "sgd_momentum_two_groups": lambda m: torch.optim.SGD(_two_groups(m, (0.05, 0.2)), momentum=0.9),
    "rmsprop_centered": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, centered=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_curvature_matches_dense_preconditioned_hessian(name: str) -> None:
    case = _small_case()
    opt = OPTIMIZERS[name](case.model)
    _train(case, opt)
    before_opt, before_model = _frozen([opt]), snapshot(case.model)
    objective = Objective(case.model, case.loss_fn, case.batches)

    result = run_instruments(objective, [OptimizerCurvature(tol=1e-5, max_hvp=300)], optimizers=[opt])

    d, k, threshold = _by_hand(case, name, opt)
    expected_ratio = _top(dense_hessian(case), d / k)
    m = result.metrics
    assert m["preconditioned_lambda_max_converged"] == 1.0
    assert m["stability_ratio"] == pytest.approx(expected_ratio, rel=1e-3)
    assert m["stability_threshold"] == pytest.approx(threshold, rel=1e-9)
    assert m["preconditioned_lambda_max"] == pytest.approx(expected_ratio * threshold, rel=1e-3)
    assert 0 <= m["preconditioned_lambda_max_residual"] <= 1e-2 * m["preconditioned_lambda_max"]
    record = result.outputs["optimizer_curvature"].artifacts[0]
    assert record.kind == "record" and record.data["optimizer_curvature"]["mixed_groups"] == name.endswith("groups")
    json.dumps(record.data)
    _assert_bit_identical(before_opt, [opt])  # no state entry created, changed or shared
    assert_untouched(before_model, case.model)


def test_single_adam_value_is_lambda_max_of_preconditioned_hessian_against_38_over_lr() -> None:
    """Cohen et al.'s lambda_max(P^{-1/2} H P^{-1/2}), P = (1 - b1^t)(sqrt(v_hat) + eps), and 38/lr."""
    case = _small_case(seed=1)
    opt = torch.optim.Adam(case.model.parameters(), lr=2e-3)
    _train(case, opt, steps=4)
    objective = Objective(case.model, case.loss_fn, case.batches)
    m = run_instruments(objective, [OptimizerCurvature(tol=1e-5, max_hvp=300)], optimizers=[opt]).metrics
    precond = torch.cat(
        [
            ((1 - 0.9**4) * ((opt.state[p]["exp_avg_sq"].double() / (1 - 0.999**4)).sqrt() + 1e-8)).reshape(-1)
            for p in case.model.parameters()
        ]
    )
    assert m["preconditioned_lambda_max"] == pytest.approx(_top(dense_hessian(case), 1 / precond), rel=1e-3)
    assert m["stability_threshold"] == pytest.approx(38 / 2e-3)
    assert m["stability_ratio"] == pytest.approx(m["preconditioned_lambda_max"] / m["stability_threshold"])


def test_lightning_optimizer_wrappers_are_unwrapped() -> None:
    case = _small_case()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    wrapper = type("Wrapper", (), {"optimizer": opt, "param_groups": opt.param_groups})()
    objective = Objective(case.model, case.loss_fn, case.batches)
    m = run_instruments(objective, [OptimizerCurvature(tol=1e-5, max_hvp=300)], optimizers=[wrapper]).metrics
    assert m["preconditioned_lambda_max"] == pytest.approx(
        float(torch.linalg.eigvalsh(dense_hessian(case)).max()), rel=1e-3
    )
    assert m["stability_threshold"] == pytest.approx(2 / 0.1)


def test_warm_start_reduces_hvps_on_the_second_call() -> None:
    case = _small_case()
    opt = torch.optim.Adam(case.model.parameters(), lr=3e-3)
    _train(case, opt)
    objective = Objective(case.model, case.loss_fn, case.batches)
    instrument = OptimizerCurvature(tol=1e-5, max_hvp=300)
    first = run_instruments(objective, [instrument], optimizers=[opt])
    second = run_instruments(objective, [instrument], optimizers=[opt])
    assert (
        first.metrics["preconditioned_lambda_max_converged"]
        == second.metrics["preconditioned_lambda_max_converged"]
        == 1
    )
    assert second.metrics["stability_ratio"] == pytest.approx(first.metrics["stability_ratio"], rel=1e-4)
    first_record, second_record = (
        r.outputs["optimizer_curvature"].artifacts[0].data["optimizer_curvature"] for r in (first, second)
    )
    assert second_record["n_hvp"] < first_record["n_hvp"]
    assert second.metrics["hvp_count"] == second_record["n_hvp"]  # the symmetry check ran once, at the first call
    assert not first_record["warm_started"] and second_record["warm_started"]

    cold = OptimizerCurvature(tol=1e-5, max_hvp=300, warm_start=False)
    run_instruments(objective, [cold], optimizers=[opt])
    again = run_instruments(objective, [cold], optimizers=[opt])
    assert again.metrics["hvp_count"] == first_record["n_hvp"]  # same seed, same start: same cost


def test_state_dict_round_trip_through_weights_only_load() -> None:
    case = _small_case()
    opt = torch.optim.Adam(case.model.parameters(), lr=3e-3)
    _train(case, opt)
    objective = Objective(case.model, case.loss_fn, case.batches)
    instrument = OptimizerCurvature(tol=1e-5, max_hvp=300)
    assert instrument.state_dict() == {"warm_start": None, "warm_start_params": None}
    cold = run_instruments(objective, [instrument], optimizers=[opt])

    buffer = io.BytesIO()
    torch.save(instrument.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["warm_start"].device.type == "cpu" and state["warm_start"].shape == (objective.num_params,)
    assert state["warm_start_params"] == list(objective.param_names)

    restored = OptimizerCurvature(tol=1e-5, max_hvp=300)
    restored.load_state_dict(state)
    warm = run_instruments(objective, [restored], optimizers=[opt])
    n_hvp = [r.outputs["optimizer_curvature"].artifacts[0].data["optimizer_curvature"]["n_hvp"] for r in (cold, warm)]
    assert n_hvp[1] < n_hvp[0]
    assert warm.metrics["stability_ratio"] == pytest.approx(cold.metrics["stability_ratio"], rel=1e-4)

    restored.reset()
    assert restored.state_dict() == {"warm_start": None, "warm_start_params": None}
    other = Objective(case.model, case.loss_fn, case.batches, params=["2.*"])  # other parameters: start cold
    restored.load_state_dict(state)
    assert restored._start(other, restored.geometry(_context(other, opt))) is None


def _context(objective: Objective, opt: torch.optim.Optimizer) -> Any:
    from lightning_hessian.instruments import StepContext

    return StepContext(objective, optimizers=[opt])


def _optimizer_warnings(caught: list[warnings.WarningMessage], owner: str) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith(owner)]


def test_unsupported_optimizer_warns_once_and_yields_no_metrics() -> None:
    case = _small_case()
    opt = torch.optim.Adamax(case.model.parameters(), lr=1e-3)
    _train(case, opt, steps=2)
    before = _frozen([opt])
    objective = Objective(case.model, case.loss_fn, case.batches)
    instruments = [OptimizerCurvature(), StepCurvature()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run_instruments(objective, instruments, optimizers=[opt])
        second = run_instruments(objective, instruments, optimizers=[opt])
    for out in (first, second):
        assert not any(k in out.metrics for k in ("stability_ratio", "preconditioned_lambda_max", "critical_lr"))
        assert out.metrics["hvp_count"] == 0
    (message,) = _optimizer_warnings(caught, "OptimizerCurvature")
    assert "Adamax is not supported" in message and "Adam, AdamW" in message
    (step_message,) = _optimizer_warnings(caught, "StepCurvature")
    assert "Adamax" in step_message and "direction='gradient'" in step_message
    _assert_bit_identical(before, [opt])

    instruments[0].reset()  # a new fit says it again
    with pytest.warns(UserWarning, match="Adamax is not supported"):
        run_instruments(objective, instruments[:1], optimizers=[opt])

    along_gradient = run_instruments(objective, [StepCurvature(direction="gradient")], optimizers=[opt]).metrics
    h, g = dense_hessian(case), objective.grad().double()
    assert along_gradient["gradient_curvature"] == pytest.approx(float(g @ h @ g / (g @ g)), rel=1e-4)


def test_no_state_yet_and_no_optimizer_warn_once_each() -> None:
    case = _small_case()
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-3)
    objective = Objective(case.model, case.loss_fn, case.batches)
    instrument = OptimizerCurvature()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert "stability_ratio" not in run_instruments(objective, [instrument], optimizers=[opt]).metrics
            assert "stability_ratio" not in run_instruments(objective, [instrument]).metrics
    messages = _optimizer_warnings(caught, "OptimizerCurvature")
    assert len(messages) == 2
    assert "no_state" in messages[0] and "no optimizer" in messages[1]
    assert opt.state == {}  # reading did not create state entries
    _train(case, opt, steps=1)  # after the first step it measures
    assert "stability_ratio" in run_instruments(objective, [instrument], optimizers=[opt]).metrics


def test_learning_rate_zero_is_skipped_with_a_message() -> None:
    case = _small_case()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.0)
    objective = Objective(case.model, case.loss_fn, case.batches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run_instruments(objective, [OptimizerCurvature(), StepCurvature()], optimizers=[opt]).metrics
    assert "stability_ratio" not in metrics and "critical_lr" not in metrics
    (message,) = _optimizer_warnings(caught, "OptimizerCurvature")
    assert "degenerate" in message and "learning rate 0" in message
    (message,) = _optimizer_warnings(caught, "StepCurvature")
    assert "learning rate" in message and "is 0" in message


def test_trust_region_norm_is_the_preconditioner() -> None:
    """TrustRegion: the top eigenvalue of M^{-1/2} H M^{-1/2}, M = sqrt(v) + eps from its state; no threshold."""
    case = _small_case()
    opt = TrustRegion(case.model.parameters(), "rms", radius=1e-2)
    total = sum(b[0].shape[0] for b in case.batches)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = sum(case.loss_fn(case.model, b) * (b[0].shape[0] / total) for b in case.batches)
        assert isinstance(loss, Tensor)
        loss.backward()
        return loss

    objective = Objective(case.model, case.loss_fn, case.batches)
    instrument = OptimizerCurvature(tol=1e-5, max_hvp=300)
    with pytest.warns(UserWarning, match="TrustRegion has not taken a step"):
        assert "preconditioned_lambda_max" not in run_instruments(objective, [instrument], optimizers=[opt]).metrics
    for _ in range(3):
        opt.step(closure)
    before = _frozen([opt])
    m = run_instruments(objective, [instrument], optimizers=[opt]).metrics
    metric = torch.cat(
        [(opt.state[p]["second_moment"].double().sqrt() + 1e-8).reshape(-1) for p in case.model.parameters()]
    )
    assert m["preconditioned_lambda_max"] == pytest.approx(_top(dense_hessian(case), 1 / metric), rel=1e-3)
    assert m["preconditioned_lambda_max_converged"] == 1.0
    assert "stability_ratio" not in m and "stability_threshold" not in m
    _assert_bit_identical(before, [opt])

    uniform = TrustRegion(case.model.parameters(), "uniform")  # the sphere: M = I, the plain lambda_max
    m = run_instruments(objective, [OptimizerCurvature(tol=1e-5, max_hvp=300)], optimizers=[uniform]).metrics
    assert m["preconditioned_lambda_max"] == pytest.approx(
        float(torch.linalg.eigvalsh(dense_hessian(case)).max()), rel=1e-3
    )


def test_options_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="tol"):
        OptimizerCurvature(tol=0)
    with pytest.raises(ValueError, match="max_hvp"):
        OptimizerCurvature(max_hvp=1)
    with pytest.raises(ValueError, match="warm_start"):
        OptimizerCurvature(warm_start=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction"):
        StepCurvature(direction="newton")
    with pytest.raises(ValueError, match="n_hvp"):
        HessianDiagonal(n_hvp=1)
    with pytest.raises(ValueError, match="n_columns"):
        HessianDiagonal(n_columns=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_steps"):
        StepCurvature(every_n_steps=0)


# ---------------------------------------------------------------------------------------- StepCurvature
def _exact_loss(case: Case, theta: Tensor) -> float:
    model = copy.deepcopy(case.model).double().eval()
    with torch.no_grad():
        for p, piece in zip(model.parameters(), theta.double().split([p.numel() for p in model.parameters()])):
            p.copy_(piece.view_as(p))
        total = sum(b[0].shape[0] for b in case.batches)
        return float(sum(case.loss_fn(model, (b[0].double(), b[1])) * b[0].shape[0] / total for b in case.batches))


@pytest.mark.parametrize("name", ["adam", "sgd_momentum_two_groups"])
def test_step_curvature_matches_dense_hessian_and_a_real_step(name: str) -> None:
    case = _small_case()
    opt = OPTIMIZERS[name](case.model)
    _train(case, opt)
    objective = Objective(case.model, case.loss_fn, case.batches)
    before_opt, before_model = _frozen([opt]), snapshot(case.model)
    g = objective.grad()

    result = run_instruments(objective, [StepCurvature()], optimizers=[opt])

    model, twin = copy.deepcopy((case.model, opt))  # a real step on copies, with the probe gradient
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for p, gp in zip(model.parameters(), g.split([p.numel() for p in model.parameters()])):
        p.grad = gp.view_as(p).clone()
    twin.step()
    lr = 3e-3 if name == "adam" else 0.05  # the reference group's (the one holding most parameters)
    step = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta
    d, gd, h = (-step / lr).double(), g.double(), dense_hessian(case)
    d_hd = float(d @ h @ d)
    predicted = -lr * float(gd @ d) + 0.5 * lr**2 * d_hd
    actual = _exact_loss(case, theta.double() - lr * d) - _exact_loss(case, theta.double())
    m = result.metrics
    assert m["gradient_curvature"] == pytest.approx(float(gd @ h @ gd / (gd @ gd)), rel=1e-4)
    assert m["direction_curvature"] == pytest.approx(d_hd / float(d @ d), rel=1e-3)
    assert m["critical_lr"] == pytest.approx(2 * float(gd @ d) / d_hd, rel=1e-3)
    assert m["predicted_loss_change"] == pytest.approx(predicted, rel=1e-3)
    assert m["actual_loss_change"] == pytest.approx(actual, rel=2e-2, abs=2e-6)
    assert m["model_fidelity"] == pytest.approx(actual / predicted, rel=2e-2, abs=1e-3)
    assert m["hvp_count"] - objective.n_hvp_check == 2
    _assert_bit_identical(before_opt, [opt])
    assert_untouched(before_model, case.model)


def test_step_curvature_along_the_gradient_needs_no_optimizer() -> None:
    case = _small_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    m = run_instruments(objective, [StepCurvature(direction="gradient")]).metrics
    g, h = objective.grad().double(), dense_hessian(case)
    assert m["gradient_curvature"] == pytest.approx(float(g @ h @ g / (g @ g)), rel=1e-4)
    assert m["direction_curvature"] == pytest.approx(m["gradient_curvature"], rel=1e-9)
    assert m["critical_lr"] == pytest.approx(2 / m["gradient_curvature"], rel=1e-6)
    assert "model_fidelity" not in m and m["loss_evaluations"] == 0  # no learning rate: no fidelity probe
    assert m["hvp_count"] - objective.n_hvp_check == 1
    with pytest.warns(UserWarning, match="needs the optimizer"):
        assert "critical_lr" not in run_instruments(objective, [StepCurvature()]).metrics


# ---------------------------------------------------------------------------------------- HessianDiagonal
def _dense_share(h: Tensor, cols: slice = slice(None)) -> float:
    block = h[:, cols].abs()
    return float(torch.diagonal(h)[cols].abs().sum() / block.sum())


def test_hessian_diagonal_share_matches_dense_hessian() -> None:
    case = _small_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    h = dense_hessian(case)
    exact = run_instruments(objective, [HessianDiagonal(n_hvp=20, n_columns=200)])  # every column: exact
    assert exact.metrics["diagonal_share"] == pytest.approx(_dense_share(h), rel=1e-5)
    assert exact.metrics["diagonal_share_stderr"] == pytest.approx(0.0, abs=1e-12)
    assert exact.metrics["diagonal_share_columns"] == objective.num_params
    blocks = {b["name"]: b for b in exact.outputs["hessian_diagonal"].artifacts[0].data["hessian_diagonal"]["blocks"]}
    assert set(blocks) == {"0", "2"}
    assert blocks["0"]["share"] == pytest.approx(_dense_share(h, slice(0, 48)), rel=1e-5)
    assert blocks["2"]["share"] == pytest.approx(_dense_share(h, slice(48, 75)), rel=1e-5)

    sampled = run_instruments(objective, [HessianDiagonal(n_hvp=200, n_columns=24)])
    m = sampled.metrics
    assert (
        m["diagonal_share_stderr"] > 0 and abs(m["diagonal_share"] - _dense_share(h)) < 4 * m["diagonal_share_stderr"]
    )
    assert m["hvp_count"] == 200 + 24  # one HVP per sample and per column (the symmetry check ran at the first call)
    record = sampled.outputs["hessian_diagonal"].artifacts[0]
    assert record.kind == "record"
    summary = record.data["hessian_diagonal"]
    assert len(json.dumps(summary)) < 2000  # a summary, not a parameter-sized vector
    diag = torch.diagonal(h)
    assert abs(summary["trace"] - float(diag.sum())) < 4 * summary["trace_stderr"]
    for name, cols in (("0", slice(0, 48)), ("2", slice(48, 75))):
        block = next(b for b in summary["blocks"] if b["name"] == name)
        assert block["numel"] == cols.stop - cols.start
        assert abs(block["trace"] - float(diag[cols].sum())) < 4 * block["trace_stderr"]
        assert block["mean_diagonal"] == pytest.approx(block["trace"] / block["numel"])
    assert sum(b["trace"] for b in summary["blocks"]) == pytest.approx(summary["trace"], rel=1e-9)


# ---------------------------------------------------------------------------------------- in a Lightning fit
class AdamModule(TanhModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Recorder(pl.Callback):
    """Weights and Adam's state after each optimizer step (and before the first), by global step."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[dict[str, Tensor], list[dict[str, Tensor]]]] = {}

    def _record(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        state = [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else {} for p in module.parameters()]
        self.at[int(trainer.global_step)] = (weights, state)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._record(trainer, pl_module)


def _dense_ratio_at(weights: dict[str, Tensor], state: list[dict[str, Tensor]]) -> float:
    module = TanhModule()
    module.load_state_dict(weights)
    case = Case("fit", module, probe_loss, list(probe_loader()))
    params = list(module.parameters())
    d = _adam_scale(params, dict(zip(params, state)), 1e-2, (0.9, 0.999))
    return _top(compute_dense_hessian(case), d / 38.0)


def test_in_a_lightning_fit_the_logged_ratio_is_dense_and_training_is_bit_identical(tmp_path: Path) -> None:
    def fit(callbacks: list[Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        pl.seed_everything(3, verbose=False)
        module = AdamModule()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=callbacks)
        trainer.fit(module, train_loader())
        weights = {k: v.clone() for k, v in module.state_dict().items()}
        return weights, copy.deepcopy(trainer.optimizers[0].state_dict())

    weights_without, opt_without = fit([])
    monitor = HessianMonitor(
        instruments=[OptimizerCurvature(), StepCurvature(), HessianDiagonal()],
        every_n_steps=2,
        budget=None,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
    )
    recorder = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights_with, opt_with = fit([monitor, recorder])

    # training untouched, the optimizer state included
    assert weights_without.keys() == weights_with.keys()
    for key, value in weights_without.items():
        assert torch.equal(value, weights_with[key]), f"{key} differs with the monitor"
    assert opt_without["param_groups"] == opt_with["param_groups"]
    assert opt_without["state"].keys() == opt_with["state"].keys()
    for index, entry in opt_without["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, opt_with["state"][index][key]), f"optimizer state {index}/{key} differs"

    # before the first step Adam has no preconditioner: said once, nothing logged for it at step 0
    (message,) = _optimizer_warnings(caught, "OptimizerCurvature")
    assert "no_state" in message
    measured = [h for h in monitor.history if "stability_ratio" in h]
    assert [int(h["step"]) for h in measured][:3] == [2, 4, 6] and len(measured) >= 5
    for entry in measured[:3] + measured[-1:]:
        weights, state = recorder.at[int(entry["step"])]
        assert entry["preconditioned_lambda_max_converged"] == 1.0
        assert entry["stability_ratio"] == pytest.approx(_dense_ratio_at(weights, state), rel=2e-3)
        assert entry["stability_threshold"] == pytest.approx(38 / 1e-2)
    for entry in monitor.history:
        assert math.isfinite(entry["critical_lr"]) and math.isfinite(entry["model_fidelity"])
        assert 0 < entry["diagonal_share"] <= 1 and entry["diagonal_share_stderr"] > 0
    assert "stability_ratio" not in monitor.history[0]  # step 0, before Adam's first step

    # the diagonal's per-block summary is in the run's JSONL records
    (jsonl,) = list(Path(tmp_path).glob("**/*.jsonl"))
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == len(monitor.history)
    assert all({b["name"] for b in r["hessian_diagonal"]["blocks"]} == {"net.0", "net.2", "net.4"} for r in records)
    assert all("optimizer_curvature" in r for r in records[1:])


def test_hessian_diagonal_raises_the_columns_to_two_per_tensor_on_deep_models() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.Tanh()) for _ in range(20)])  # 40 tensors
    x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
    objective = Objective(model, _ce, [(x, y)])
    instrument = HessianDiagonal(n_hvp=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            m = run_instruments(objective, [instrument]).metrics
            assert m["diagonal_share_columns"] == 80 and 0 < m["diagonal_share"] <= 1
    (message,) = _optimizer_warnings(caught, "HessianDiagonal")
    assert "n_columns=64 is raised to 80" in message


def test_hessian_diagonal_reuses_the_trace_products_of_the_same_step() -> None:
    from lightning_hessian.instruments import Trace

    case = _small_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    objective.hvp(torch.ones(objective.num_params))  # the one-off symmetry check, out of the counts below
    h = dense_hessian(case)
    alone = run_instruments(objective, [HessianDiagonal(n_hvp=30, n_columns=24)])
    both = run_instruments(objective, [HessianDiagonal(n_hvp=30, n_columns=24), Trace(n_hvp=30)])
    record = both.outputs["hessian_diagonal"].artifacts[0].data["hessian_diagonal"]
    assert record["reused_trace_products"] == 10  # Hutch++'s sketch: a third of its 30 products, Rademacher
    assert record["n_samples"] == 30
    # 10 fewer products than the two instruments alone: the diagonal drew only 20 new probes.
    assert both.metrics["hvp_count"] == alone.metrics["hvp_count"] + 30 - 10
    diag = torch.diagonal(h)
    assert abs(record["trace"] - float(diag.sum())) < 4 * record["trace_stderr"]
    assert both.metrics["trace"] == pytest.approx(run_instruments(objective, [Trace(n_hvp=30)]).metrics["trace"])


def test_eigenvalues_and_step_curvature_share_one_gradient() -> None:
    """The gradient-guided Lanczos start and the step curvature take the probe gradient once per step."""
    case = _small_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    result = run_instruments(objective, [Eigenvalues(lambda_min=False), StepCurvature(direction="gradient")])
    h = dense_hessian(case)
    assert objective.n_grad == 1
    assert result.metrics["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-3)
    g = objective.grad().double()
    assert result.metrics["gradient_curvature"] == pytest.approx(float(g @ h @ g / (g @ g)), rel=1e-4)
    alone = Objective(case.model, case.loss_fn, case.batches)
    run_instruments(alone, [Eigenvalues(lambda_min=False, gradient_start=False)])  # a random start: no gradient
    assert alone.n_grad == 0


def test_warm_starts_add_the_gradient_once_a_warm_run_no_longer_beats_a_guided_one() -> None:
    case = _small_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    eig = Eigenvalues(lambda_min=False)
    first = run_instruments(objective, [eig]).metrics["lanczos_hvp_count"]
    assert objective.n_grad == 1  # the cold run is guided
    second = run_instruments(objective, [eig]).metrics["lanczos_hvp_count"]
    assert objective.n_grad == 1  # the warm run is not
    assert eig._top_counts == {"guided": first, "warm": second}
    assert second < first  # at the same parameters the warm start pays: it stays unguided
    eig._top_counts = {"guided": 6, "warm": 7}  # as on the CIFAR ResNet 440 steps apart
    run_instruments(objective, [eig])
    assert objective.n_grad == 2  # warm start plus the gradient
    eig._top_counts = {"guided": 6, "warm": 2}
    run_instruments(objective, [eig])
    assert objective.n_grad == 2
    resumed = Eigenvalues(lambda_min=False)
    resumed.load_state_dict({**eig.state_dict(), "top_counts": {"guided": 6, "warm": 7}})
    assert resumed._warm_needs_guide() and not Eigenvalues()._warm_needs_guide()


def test_eigenvalues_expected_cost_is_one_more_than_the_measured_count_of_its_last_run_of_the_same_kind() -> None:
    """Priors before a kind has run (6 cold, 6 first warm, 30 both ends), then one product more than
    the last run of that kind made (the margin that keeps the budget when a run takes one more); the
    run just ended reports its own count (a cold run's one-offs as one more)."""
    case = _small_case()
    objective = Objective(case.model, case.loss_fn, case.batches)
    eig, cold = Eigenvalues(lambda_min_every=3), Eigenvalues(warm_start=False)
    assert eig.expected_hvps() == 6.0 and cold.expected_hvps() == 6.0 and eig.last_run_hvps() is None
    counts = []
    for i in range(5):  # runs 0, 1 top only (cold, warm), 2 both ends, 3 warm top, 4 warm top
        counts.append(run_instruments(objective, [eig]).metrics["lanczos_hvp_count"])
        assert eig.last_run_hvps() == counts[-1] + (1.0 if i == 0 else 0.0)
        run_instruments(objective, [cold])
        assert cold.expected_hvps() in (6.0, 30.0)
        if i == 0:
            assert eig.expected_hvps() == 6.0  # the first warm run: the prior, not the cold run's count
        elif i == 1:
            assert eig.expected_hvps() == 30.0  # both ends next, none measured yet
        elif i == 4:
            assert eig.expected_hvps() == counts[2] + 1  # both ends next: the last both-ends run's count, plus one
        else:
            assert eig.expected_hvps() == counts[i if i != 2 else 1] + 1  # warm top next: the last warm top-only run
    assert counts[2] > counts[1]  # the both-ends run is the dear one: the test tells the kinds apart
    resumed = Eigenvalues(lambda_min_every=3)
    resumed.load_state_dict(eig.state_dict())
    assert resumed.expected_hvps() == counts[2] + 1  # the measured counts travel in the checkpoint
