"""Trace estimators against exact traces (dense Hessians, closed forms) and their standard errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import ALL_CASES, QuadraticModel, assert_untouched, dense_hessian, quadratic_loss, snapshot, tanh_mlp_case
from lightning_hessian import Objective, TraceEstimate, hutchinson_trace, slope_fit_trace


@pytest.mark.parametrize("make_case", ALL_CASES)
@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_and_trace_of_square_within_three_standard_errors(make_case, method: str) -> None:
    case = make_case()
    h = dense_hessian(case)
    exact, exact_sq = float(h.trace()), float((h * h).sum())
    obj = Objective(case.model, case.loss_fn, case.batches, hvp="cached")
    est = hutchinson_trace(obj, n=99, method=method, seed=1)
    assert est.n_hvp == 99 and est.method == method
    assert 0 < est.stderr < abs(exact)
    assert abs(est.value - exact) <= 3 * est.stderr
    assert abs(est.trace_sq - exact_sq) <= 3 * est.trace_sq_stderr
    assert est.mean_curvature(obj.num_params) == pytest.approx(est.value / h.shape[0])


def test_hutch_plus_plus_is_exact_when_the_budget_covers_the_rank() -> None:
    """A rank-10 Hessian is captured by the sketch: no variance left."""
    vals = np.zeros(300)
    vals[:10] = np.linspace(1.0, 5.0, 10)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    est = hutchinson_trace(obj, n=36, method="hutch++")
    assert est.value == pytest.approx(vals.sum(), rel=1e-8)
    assert est.trace_sq == pytest.approx((vals**2).sum(), rel=1e-8)
    assert est.stderr < 1e-8


def test_hutch_plus_plus_beats_hutchinson_when_few_eigenvalues_dominate() -> None:
    vals = np.concatenate([np.full(5, 50.0), np.random.default_rng(0).uniform(-0.1, 0.1, 995)])
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    errs = {m: [] for m in ("hutch++", "hutchinson")}
    for seed in range(5):
        for m in errs:
            errs[m].append(abs(hutchinson_trace(obj, n=30, method=m, seed=seed).value - vals.sum()))
    assert np.mean(errs["hutch++"]) < 0.2 * np.mean(errs["hutchinson"])


def test_hutchinson_is_unbiased_over_seeds() -> None:
    """The mean of many independent estimates converges to the closed-form trace."""
    vals = np.random.default_rng(1).uniform(-1.0, 2.0, 200)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    ests = [hutchinson_trace(obj, n=10, method="hutchinson", seed=s) for s in range(60)]
    values = np.array([e.value for e in ests])
    assert abs(values.mean() - vals.sum()) <= 4 * values.std(ddof=1) / np.sqrt(len(values))


def test_slope_fit_on_a_smooth_tanh_network_within_three_standard_errors() -> None:
    case = tanh_mlp_case()
    exact = float(dense_hessian(case).trace())
    obj = Objective(case.model, case.loss_fn, case.batches)
    est = slope_fit_trace(obj, n_directions=60, seed=2)
    assert est.n_hvp == 0 and obj.n_hvp == 0  # forward passes only
    assert abs(est.value - exact) <= 3 * est.stderr
    assert 1e-3 < est.radius < 10
    # n_directions * (n_points - 1) fit points, the centre, and the radius search.
    assert est.n_loss >= 60 * 4 + 1


def test_slope_fit_is_exact_on_a_quadratic_for_any_radius() -> None:
    vals = np.random.default_rng(2).uniform(-1.0, 2.0, 150)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    for radius in (0.01, 1.0, 5.0):
        est = slope_fit_trace(obj, n_directions=400, radius=radius, seed=0)
        # Each direction's curvature is exact (float64 quadratic); the spread is the Gaussian variance 2 tr(H^2).
        assert abs(est.value - vals.sum()) <= 3 * est.stderr
        assert est.stderr == pytest.approx(np.sqrt(2 * (vals**2).sum() / 400), rel=0.25)


def test_estimators_leave_the_model_untouched() -> None:
    case = ALL_CASES[1]()
    case.model.train()
    before = snapshot(case.model)
    obj = Objective(case.model, case.loss_fn, case.batches)
    hutchinson_trace(obj, n=9)
    slope_fit_trace(obj, n_directions=3)
    assert_untouched(before, case.model)


def test_probes_are_streamed_not_held() -> None:
    """Peak extra memory is the sketch (n/3 vectors), not all n probes: checked via the objective's inputs."""
    vals = np.linspace(-1, 2, 500)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    seen: list[int] = []
    original = obj.hvp

    def recording_hvp(v: torch.Tensor) -> torch.Tensor:
        seen.append(id(v))
        return original(v)

    obj.hvp = recording_hvp  # type: ignore[method-assign]
    est = hutchinson_trace(obj, n=30, method="hutchinson")
    assert est.n_samples == 30 and len(seen) == 30


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda o: hutchinson_trace(o, n=2), "n must be an integer >= 3"),
        (lambda o: hutchinson_trace(o, method="xtrace"), "method must be 'hutch\\+\\+' or 'hutchinson'"),
        (lambda o: slope_fit_trace(o, n_points=4), "n_points must be an odd integer >= 3"),
        (lambda o: slope_fit_trace(o, radius=-1.0), "radius must be a positive finite number"),
        (lambda o: slope_fit_trace(o, n_directions=1), "n_directions must be an integer >= 2"),
    ],
)
def test_bad_arguments_are_refused(call, message: str) -> None:
    obj = Objective(QuadraticModel(np.ones(20)), quadratic_loss, [None])
    with pytest.raises(ValueError, match=message):
        call(obj)


def test_estimate_is_deterministic_for_a_seed() -> None:
    obj = Objective(QuadraticModel(np.linspace(-1, 1, 100)), quadratic_loss, [None])
    h1, h2 = hutchinson_trace(obj, seed=3), hutchinson_trace(obj, seed=3)
    assert (h1.value, h1.stderr, h1.trace_sq) == (h2.value, h2.stderr, h2.trace_sq)
    assert hutchinson_trace(obj, seed=4).value != h1.value
    a, b = slope_fit_trace(obj, seed=4), slope_fit_trace(obj, seed=4)
    assert (a.value, a.stderr, a.radius) == (b.value, b.stderr, b.radius)
    assert isinstance(a, TraceEstimate)


# --- deflating the Krylov space of a Lanczos run at the same step (issue 8: reuse across instruments) ---


def _lanczos_space(obj: Objective, which: str = "top", seed: int = 0, max_basis: int | None = None):
    from lightning_hessian import extremal_eigenpairs

    kept: list = []
    extremal_eigenpairs(obj, tol=3e-3, which=which, seed=seed, krylov_out=kept, max_basis=max_basis)  # type: ignore[arg-type]
    assert len(kept) == 1
    return kept[0]


@pytest.mark.parametrize("max_basis", [None, 8])  # 8: thick-restarted (arrowhead projected matrix)
def test_krylov_space_parts_of_the_trace_are_exact(max_basis: int | None) -> None:
    """tr(V'HV) = tr(T) and ||HV||_F^2 = ||T||_F^2 + beta^2, against the dense matrix, with no product spent."""
    vals = np.concatenate([np.random.default_rng(3).uniform(-0.5, 1.0, 195), [4.0, 5.0, 6.0, 7.0, 8.0]])
    model = QuadraticModel(vals)
    obj = Objective(model, quadratic_loss, [None])
    space = _lanczos_space(obj, which="both", max_basis=max_basis)
    v = space.vectors()
    a = model.a.to(v.dtype)
    assert float((v @ v.T - torch.eye(space.dim, dtype=v.dtype)).abs().max()) < 1e-10
    spent = obj.n_hvp
    assert space.trace() == pytest.approx(float(torch.trace(v @ a @ v.T)), rel=1e-10)
    assert space.trace_sq() == pytest.approx(float(((a @ v.T) ** 2).sum()), rel=1e-10)
    assert obj.n_hvp == spent
    probe = torch.randn(200, dtype=v.dtype)
    assert float((v @ space.project_out(probe)).abs().max()) < 1e-12


def test_deflated_estimate_is_exact_when_the_space_is_everything() -> None:
    """A Krylov space that spans the whole parameter space leaves nothing random: the trace is exact."""
    vals = np.random.default_rng(4).uniform(-1.0, 2.0, 40)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    kept: list = []
    from lightning_hessian.spectrum import lanczos

    out = lanczos(obj.hvp, torch.randn(40, dtype=torch.float64), k=1, tol=1e-14, max_matvec=40, keep_basis=True)
    assert out.krylov is not None and out.krylov.dim == 40
    kept.append(out.krylov)
    est = hutchinson_trace(obj, n=9, method="hutchinson", deflate=kept[0])
    assert est.value == pytest.approx(vals.sum(), rel=1e-8, abs=1e-8)
    assert est.trace_sq == pytest.approx((vals**2).sum(), rel=1e-8)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_deflated_estimate_is_unbiased_over_seeds(method: str) -> None:
    vals = np.concatenate([np.random.default_rng(5).uniform(-1.0, 2.0, 295), [9.0, 10.0, 12.0, 15.0, 20.0]])
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    space = _lanczos_space(obj)
    values = np.array([hutchinson_trace(obj, n=9, method=method, seed=s, deflate=space).value for s in range(60)])
    assert abs(values.mean() - vals.sum()) <= 4 * values.std(ddof=1) / np.sqrt(len(values))


def test_deflating_the_lanczos_space_beats_hutch_plus_plus_alone_when_outliers_dominate() -> None:
    """Outliers the Lanczos run has found cost the trace nothing: at equal products the error drops."""
    gen = np.random.default_rng(6)
    vals = np.concatenate([gen.uniform(-0.2, 0.5, 990), np.linspace(20.0, 60.0, 10)])
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    alone, deflated = [], []
    for seed in range(8):
        space = _lanczos_space(obj, which="both", seed=seed)
        alone.append(hutchinson_trace(obj, n=30, method="hutch++", seed=seed).value - vals.sum())
        deflated.append(hutchinson_trace(obj, n=30, method="hutchinson", seed=seed, deflate=space).value - vals.sum())
    assert np.sqrt(np.mean(np.square(deflated))) < 0.5 * np.sqrt(np.mean(np.square(alone)))


def test_deflate_of_another_size_is_refused() -> None:
    small = Objective(QuadraticModel(np.linspace(0.1, 1.0, 30)), quadratic_loss, [None])
    big = Objective(QuadraticModel(np.linspace(0.1, 1.0, 50)), quadratic_loss, [None])
    with pytest.raises(ValueError, match="deflate holds vectors of 30 entries but the objective has 50"):
        hutchinson_trace(big, n=9, deflate=_lanczos_space(small))


def test_trace_instrument_deflates_the_lanczos_space_of_its_step() -> None:
    """With Eigenvalues at the same step the Trace uses its Krylov space; alone, or reuse_lanczos=False, it does not."""
    from lightning_hessian.instruments import Eigenvalues, Trace, run_instruments

    case = tanh_mlp_case()
    exact = float(dense_hessian(case).trace())

    def run(instruments):
        obj = Objective(case.model, case.loss_fn, case.batches)
        result = run_instruments(obj, instruments)
        return result, result.outputs["trace"].artifacts[0].data["trace_estimate"]

    both, used = run([Eigenvalues(lambda_min_every=1), Trace()])
    alone, used_alone = run([Trace()])
    off, used_off = run([Eigenvalues(lambda_min_every=1), Trace(reuse_lanczos=False)])
    assert used["lanczos_space_dim"] >= 20 and used["n_hvp"] == 30  # a both-ends run: at least 20 vectors
    assert used["sketch"] == 0  # a space of at least n_hvp // 3 vectors replaces Hutch++'s sketch
    assert used_alone["lanczos_space_dim"] == 0 and used_off["lanczos_space_dim"] == 0
    assert used_alone["sketch"] == 10 and used_off["sketch"] == 10
    assert abs(both.metrics["trace"] - exact) <= 4 * both.metrics["trace_stderr"]
    assert off.metrics["trace"] == alone.metrics["trace"]  # reuse off: the same estimator, bit for bit
    assert both.metrics["trace_stderr"] < alone.metrics["trace_stderr"]


def test_sketch_rule_and_bad_sketches() -> None:
    """A small Krylov space is topped up by Hutch++'s sketch, a large one replaces it; bad sizes are refused."""
    vals = np.concatenate([np.random.default_rng(7).uniform(-0.5, 1.0, 295), [9.0, 10.0, 12.0, 15.0, 20.0]])
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    small = _lanczos_space(obj)  # top only: a few vectors
    large = _lanczos_space(obj, which="both")  # 20 or more
    assert small.dim < 10 <= large.dim
    assert hutchinson_trace(obj, n=30, deflate=small).n_sketch == 10
    est = hutchinson_trace(obj, n=30, deflate=large)
    assert est.n_sketch == 0 and est.n_deflated == large.dim and est.n_samples == 30
    assert hutchinson_trace(obj, n=30, deflate=large, sketch=5).n_sketch == 5
    with pytest.raises(ValueError, match="sketch must be an integer in"):
        hutchinson_trace(obj, n=30, sketch=16)
    with pytest.raises(ValueError, match="takes no sketch"):
        hutchinson_trace(obj, n=30, method="hutchinson", sketch=3)
    with pytest.raises(ValueError, match="needs sketch >= 1 without a deflation space"):
        hutchinson_trace(obj, n=30, sketch=0)


def test_the_basis_is_not_held_past_the_trace() -> None:
    """A short run keeps only the rows it used, and the step's context lets go of the basis once the trace is done."""
    from lightning_hessian.instruments import Eigenvalues, StepContext, Trace, run_instruments

    vals = np.concatenate([np.random.default_rng(8).uniform(-0.5, 1.0, 295), [9.0, 10.0, 12.0, 15.0, 20.0]])
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    space = _lanczos_space(obj, max_basis=100)
    assert space.basis._rows.shape[0] == space.dim < 20  # not the 101 rows allocated for the run
    ctx = StepContext(obj)
    run_instruments(obj, [Eigenvalues(lambda_min=False), Trace()], context=ctx)
    assert "krylov" not in ctx.shared and "keep_krylov" not in ctx.shared
