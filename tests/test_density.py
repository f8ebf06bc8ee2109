"""Stochastic Lanczos quadrature against dense spectra of small models and planted spectra."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from helpers import (
    QuadraticModel,
    assert_untouched,
    bn_cnn_case,
    dense_hessian,
    quadratic_loss,
    snapshot,
    tanh_mlp_case,
)
from lightning_hessian import Objective
from lightning_hessian.density import DensityEstimate, count_outliers, negative_mass_bracket, spectral_density


def _planted(outliers: tuple[float, ...] = (7.0, 10.0), seed: int = 0) -> np.ndarray:
    """Issue 10's spectrum: N = 1200, 650 in [0.01, 2], outliers, the rest in [-0.5, -0.001]."""
    gen = np.random.default_rng(seed)
    n_neg = 1200 - 650 - len(outliers)
    return np.concatenate([gen.uniform(0.01, 2.0, 650), outliers, gen.uniform(-0.5, -0.001, n_neg)])


NAMES = ["tanh_mlp", "bn_cnn", "planted"]


@functools.cache
def _case(name: str) -> tuple[Objective, np.ndarray, torch.Tensor]:
    """(objective, sorted dense eigenvalues, dense Hessian), built once per test session."""
    if name == "planted":
        vals = _planted()
        model = QuadraticModel(vals)
        return Objective(model, quadratic_loss, [None]), np.sort(vals), model.a.clone()
    case = {"tanh_mlp": tanh_mlp_case, "bn_cnn": bn_cnn_case}[name]()
    h = dense_hessian(case)
    return Objective(case.model, case.loss_fn, case.batches), np.linalg.eigvalsh(h.numpy()), h


def _wasserstein(estimate: DensityEstimate, eigenvalues: np.ndarray) -> float:
    """1-Wasserstein distance between the SLQ distribution and the empirical spectral distribution."""
    nodes, _ = estimate.pooled()
    points = np.sort(np.concatenate([nodes, eigenvalues]))
    est = estimate.cdf(points[:-1])
    true = np.searchsorted(eigenvalues, points[:-1], side="right") / len(eigenvalues)
    return float(np.sum(np.abs(est - true) * np.diff(points)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("max_hvp", "n_starts"), [(80, 4), (200, 8)])
def test_slq_distribution_is_within_wasserstein_tolerance_of_dense_spectrum(name, max_hvp, n_starts):
    """W1 <= (b - a) / m (quadrature with m nodes) + 3 (b - a) sqrt(1 / (2 N n_starts)) (random starts).

    The second term is three standard deviations of the CDF estimate: one start's distribution
    function at t has variance at most F(1 - F) * 2 / N <= 1 / (2N), averaged over the starts.
    """
    obj, ev, _ = _case(name)
    est = spectral_density(obj, max_hvp=max_hvp, n_starts=n_starts, seed=1)
    width = ev[-1] - ev[0]
    n = len(ev)
    tol = width / est.n_steps + 3 * width * math.sqrt(1 / (2 * n * n_starts))
    assert _wasserstein(est, ev) <= tol
    assert est.n_hvp == n_starts * est.n_steps == n_starts * (max_hvp // n_starts)
    # Ritz values lie inside the spectrum (up to float32 products).
    assert ev[0] - 1e-5 * width <= est.lambda_min_ritz and est.lambda_max_ritz <= ev[-1] + 1e-5 * width


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_first_two_moments_match_traces_within_their_sampling_error(name, distribution):
    """Gauss quadrature is exact to degree 2m - 1: moment p of a start is v'H^p v / v'v, unbiased for tr(H^p)/N."""
    obj, ev, h = _case(name)
    n_starts = 12
    est = spectral_density(obj, max_hvp=12 * 10, n_starts=n_starts, distribution=distribution, seed=3)
    n = len(ev)
    h = h.double()
    for power, mat in ((1, h), (2, h @ h)):
        mean, stderr = est.moment(power)
        truth = float(torch.trace(mat)) / n
        off = float((mat**2).sum() - (torch.diagonal(mat) ** 2).sum())
        if distribution == "rademacher":
            var = 2 * off / n**2
        else:  # v'Av / v'v for v uniform on the sphere
            var = 2 * (n * float((mat**2).sum()) - float(torch.trace(mat)) ** 2) / (n**2 * (n + 2))
        assert abs(mean - truth) <= 4 * math.sqrt(var / n_starts) + 1e-9 * abs(truth)
        assert stderr > 0


@pytest.mark.parametrize("name", NAMES)
def test_negative_mass_matches_dense_fraction_of_negative_eigenvalues(name):
    obj, ev, _ = _case(name)
    est = spectral_density(obj, max_hvp=200, n_starts=8, seed=2)
    truth = float(np.mean(ev < 0))
    lower, upper = est.negative_mass_bounds
    assert lower <= est.negative_mass <= upper
    # The midpoint is within the quadrature bracket's half width plus 4 standard errors of the truth.
    assert abs(est.negative_mass - truth) <= (upper - lower) / 2 + 4 * est.negative_mass_stderr
    assert est.negative_mass_stderr > 0


def test_negative_mass_bracket_counts_the_two_nodes_next_to_zero_by_half() -> None:
    nodes = np.array([-2.0, -0.5, 0.25, 3.0])
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    assert negative_mass_bracket(nodes, weights) == pytest.approx((0.35, 0.1, 0.6))
    assert negative_mass_bracket(np.array([1.0, 2.0]), np.array([0.5, 0.5])) == pytest.approx((0.25, 0.0, 0.5))


@pytest.mark.parametrize("outliers", [(7.0, 10.0), (4.0, 5.5, 7.0, 8.5, 10.0)])
def test_outliers_above_the_bulk_are_counted_on_planted_spectra(outliers) -> None:
    vals = _planted(outliers)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    est = spectral_density(obj, max_hvp=160, n_starts=4)
    assert est.n_outliers == len(outliers)
    assert 1.9 <= est.bulk_edge <= 2.0  # the top of the bulk [0.01, 2]
    ghosts = spectral_density(obj, max_hvp=160, n_starts=4, reorthogonalize=False)
    assert ghosts.n_outliers is None  # ghost copies of converged outliers make a count meaningless


def test_a_dense_spectrum_without_outliers_has_none() -> None:
    obj = Objective(QuadraticModel(np.linspace(0.01, 2.0, 1000)), quadratic_loss, [None])
    est = spectral_density(obj, max_hvp=160, n_starts=4)
    assert est.n_outliers == 0 and math.isnan(est.bulk_edge)


def test_count_outliers_cuts_at_the_largest_gap_above_the_bulk() -> None:
    nodes = np.array([-1.0, 0.0, 1.0, 1.2, 1.3, 5.0, 6.0])
    res = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # 1.0 is the last unresolved node
    assert count_outliers(nodes, res, tol=1e-3) == (2, 1.3)


def test_three_term_recurrence_keeps_the_quadrature_moments() -> None:
    """Without reorthogonalisation (three vectors of memory) the moments and the distribution stay right."""
    obj, ev, _ = _case("planted")
    full = spectral_density(obj, max_hvp=160, n_starts=4, seed=4)
    plain = spectral_density(obj, max_hvp=160, n_starts=4, seed=4, reorthogonalize=False)
    assert full.reorthogonalized and not plain.reorthogonalized and plain.basis_bytes == 0
    for p in (1, 2, 3):
        assert plain.moment(p)[0] == pytest.approx(full.moment(p)[0], rel=1e-6)
    width = ev[-1] - ev[0]
    assert _wasserstein(plain, ev) <= width / plain.n_steps + 3 * width * math.sqrt(1 / (2 * len(ev) * 4))
    tiny = spectral_density(obj, max_hvp=160, n_starts=4, basis_memory=1000)
    assert not tiny.reorthogonalized  # the basis did not fit the memory bound


def test_basis_in_bfloat16_or_host_memory_gives_the_same_density() -> None:
    obj = _case("planted")[0]
    ref = spectral_density(obj, max_hvp=120, n_starts=3)
    for kwargs in ({"basis_dtype": torch.bfloat16}, {"basis_dtype": torch.float16}, {"basis_device": "cpu"}):
        other = spectral_density(obj, max_hvp=120, n_starts=3, **kwargs)
        assert other.moment(1)[0] == pytest.approx(ref.moment(1)[0], rel=1e-3)
        assert other.negative_mass == pytest.approx(ref.negative_mass, abs=0.02)
        assert other.n_outliers == ref.n_outliers
    half = spectral_density(obj, max_hvp=120, n_starts=3, basis_dtype=torch.bfloat16)
    assert half.basis_bytes == ref.basis_bytes // 4  # float64 model, bfloat16 basis


def test_broadened_density_is_a_probability_density() -> None:
    est = spectral_density(_case("tanh_mlp")[0], max_hvp=80, n_starts=4)
    grid, phi = est.density(n_grid=4000)
    assert np.all(phi >= 0)
    assert float(np.trapezoid(phi, grid)) == pytest.approx(1.0, abs=1e-3)
    for w in est.weights:
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    _, narrow = est.density(grid, sigma=est.default_sigma() / 4)
    assert narrow.max() > phi.max()


def test_results_are_deterministic_for_a_seed_and_leave_the_model_untouched() -> None:
    case = bn_cnn_case()
    case.model.train()
    before = snapshot(case.model)
    obj = Objective(case.model, case.loss_fn, case.batches)
    a = spectral_density(obj, max_hvp=40, n_starts=2, seed=7)
    b = spectral_density(obj, max_hvp=40, n_starts=2, seed=7)
    c = spectral_density(obj, max_hvp=40, n_starts=2, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.nodes, b.nodes))
    assert not np.array_equal(a.nodes[0], c.nodes[0])
    assert_untouched(before, case.model)


def test_arrays_round_trip_rebuilds_the_estimate() -> None:
    est = spectral_density(_case("tanh_mlp")[0], max_hvp=60, n_starts=3)
    again = DensityEstimate.from_arrays(est.to_arrays(), est.scalars())
    assert again.negative_mass == est.negative_mass and again.n_outliers == est.n_outliers
    assert all(np.array_equal(x, y) for x, y in zip(again.nodes, est.nodes))
    np.testing.assert_array_equal(again.density()[1], est.density()[1])


def test_small_operators_stop_at_an_invariant_subspace() -> None:
    vals = np.array([-1.0, 0.5, 0.5, 2.0, 3.0])
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    est = spectral_density(obj, max_hvp=40, n_starts=2)
    assert est.n_steps == 5
    assert est.n_hvp <= 10
    np.testing.assert_allclose(np.sort(est.nodes[0]), [-1.0, 0.5, 2.0, 3.0], atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_starts": 0}, "n_starts must be a positive integer"),
        ({"max_hvp": 3, "n_starts": 2}, "max_hvp must be an integer of at least"),
        ({"distribution": "uniform"}, "distribution must be"),
        ({"outlier_tol": 2.0}, "outlier_tol must be in"),
        ({"basis_memory": -1}, "basis_memory must be"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        spectral_density(_case("planted")[0], **kwargs)
