"""Extremal eigenpairs against dense float64 spectra and planted closed-form spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import ALL_CASES, QuadraticModel, assert_untouched, dense_hessian, quadratic_loss, snapshot
from lightning_hessian import EigenResult, Objective, extremal_eigenpairs
from lightning_hessian.spectrum import lanczos


def _dense_spectrum(case) -> np.ndarray:
    return torch.linalg.eigvalsh(dense_hessian(case)).numpy()


@pytest.mark.parametrize("make_case", ALL_CASES)
def test_lambda_max_and_lambda_min_match_dense_hessian(make_case) -> None:
    case = make_case()
    ev = _dense_spectrum(case)
    assert ev[0] < 0 < ev[-1], "test models must have a saddle (negative curvature)"
    obj = Objective(case.model, case.loss_fn, case.batches)
    result = extremal_eigenpairs(obj, max_hvp=300)
    assert result.converged
    width = ev[-1] - ev[0]
    assert result.lambda_max == pytest.approx(ev[-1], rel=1e-4)
    assert abs(result.lambda_min - ev[0]) <= 1e-3 * width
    # Evidence: residuals bound the error, vectors are unit eigenvectors of the dense Hessian.
    h = dense_hessian(case)
    y = result.eigenvectors[0].double()
    assert float(y.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float((h @ y - ev[-1] * y).norm()) <= 1e-3 * abs(ev[-1])
    assert result.residuals[0] <= 1e-4 * abs(result.lambda_max)
    assert result.negative_ratio == pytest.approx(-ev[0] / ev[-1], rel=1e-2)


@pytest.mark.parametrize("make_case", ALL_CASES)
def test_cold_lambda_max_within_25_hvps_and_warm_within_10(make_case) -> None:
    case = make_case()
    obj = Objective(case.model, case.loss_fn, case.batches)
    cold = extremal_eigenpairs(obj, which="top")
    assert cold.converged_max and cold.n_hvp <= 25
    assert cold.lambda_max == pytest.approx(_dense_spectrum(case)[-1], rel=1e-4)
    # One small optimizer step, as between two measurements during training.
    grads = obj.grad()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(case.model.parameters()) - 0.05 * grads, case.model.parameters()
        )
    warm = extremal_eigenpairs(obj, which="top", init=cold)
    assert warm.converged_max and warm.n_hvp <= 10
    assert warm.lambda_max == pytest.approx(_dense_spectrum(case)[-1], rel=1e-4)
    both_warm = extremal_eigenpairs(obj, init=extremal_eigenpairs(obj), seed=1)
    assert both_warm.n_hvp_top is not None and both_warm.n_hvp_top <= 10


def _planted(n: int, seed: int = 0) -> np.ndarray:
    gen = np.random.default_rng(seed)
    vals = np.concatenate([gen.uniform(-1.0, -0.01, n // 2), gen.uniform(0.01, 2.0, n - n // 2)])
    vals[0], vals[-1] = -1.5, 4.0
    return vals


def test_quadratic_saddle_with_half_the_spectrum_negative() -> None:
    """N = 1200, 600 negative eigenvalues: both ends recovered to the closed form."""
    vals = _planted(1200)
    model = QuadraticModel(vals)
    obj = Objective(model, quadratic_loss, [None])
    result = extremal_eigenpairs(obj, k=3, max_hvp=400)
    assert result.converged
    top3 = np.sort(vals)[::-1][:3]
    np.testing.assert_allclose(result.eigenvalues, top3, rtol=1e-4)
    assert abs(result.lambda_min - vals.min()) <= 1e-3 * (vals.max() - vals.min())
    assert result.lambda_min < 0  # a negative Ritz value certifies negative curvature
    assert result.eigenvalues == tuple(sorted(result.eigenvalues, reverse=True))


def test_positive_definite_hessian_reports_smallest_positive_eigenvalue() -> None:
    vals = np.linspace(0.5, 3.0, 400)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    result = extremal_eigenpairs(obj, max_hvp=300)
    assert result.converged
    assert result.lambda_min == pytest.approx(0.5, abs=1e-3 * 2.5)
    assert result.negative_ratio == 0.0


def test_thick_restart_with_small_basis_still_converges() -> None:
    vals = _planted(1000, seed=3)
    obj = Objective(QuadraticModel(vals, seed=3), quadratic_loss, [None])
    result = extremal_eigenpairs(obj, max_hvp=600, max_basis=24)
    assert result.converged
    assert result.lambda_max == pytest.approx(vals.max(), rel=1e-4)
    assert abs(result.lambda_min - vals.min()) <= 1e-3 * (vals.max() - vals.min())


def test_budget_exhaustion_is_reported_not_hidden() -> None:
    vals = _planted(1000)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    result = extremal_eigenpairs(obj, max_hvp=8)
    assert result.n_hvp == 8
    assert not result.converged
    assert not result.converged_min
    assert result.residual_min > 1e-4 * (vals.max() - vals.min())


def test_results_are_deterministic_for_a_seed() -> None:
    vals = _planted(500)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    a, b = extremal_eigenpairs(obj, seed=5), extremal_eigenpairs(obj, seed=5)
    assert a.lambda_max == b.lambda_max and a.lambda_min == b.lambda_min and a.n_hvp == b.n_hvp
    assert torch.equal(a.eigenvectors, b.eigenvectors)


def test_arpack_reference_solver_agrees() -> None:
    vals = _planted(600)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    ours = extremal_eigenpairs(obj, max_hvp=400)
    ref = extremal_eigenpairs(obj, solver="arpack", max_hvp=3000)
    assert ref.converged
    assert ref.lambda_max == pytest.approx(vals.max(), rel=1e-4)
    assert ref.lambda_min == pytest.approx(vals.min(), rel=1e-4)
    assert ours.n_hvp < ref.n_hvp


def test_warm_start_from_an_exact_eigenvector_still_finds_both_ends() -> None:
    """An invariant start space (exact breakdown) must not end the search at the wrong values."""
    vals = _planted(300)
    model = QuadraticModel(vals)
    obj = Objective(model, quadratic_loss, [None])
    first = extremal_eigenpairs(obj)
    a = model.a
    second_vec = torch.linalg.eigh(a).eigenvectors[:, 5]  # an interior eigenvector
    result = extremal_eigenpairs(obj, init=second_vec, max_hvp=300)
    assert result.lambda_max == pytest.approx(first.lambda_max, rel=1e-4)
    assert result.lambda_min == pytest.approx(first.lambda_min, rel=1e-3)


def test_no_side_effects_on_the_model() -> None:
    case = ALL_CASES[1]()
    case.model.train()
    before = snapshot(case.model)
    obj = Objective(case.model, case.loss_fn, case.batches)
    extremal_eigenpairs(obj)
    extremal_eigenpairs(obj, solver="arpack")
    assert_untouched(before, case.model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"tol": 0.0}, "tol must be positive"),
        ({"max_hvp": 1}, "max_hvp must be an integer of at least"),
        ({"which": "bottom"}, "which must be 'both' or 'top'"),
        ({"solver": "lobpcg"}, "solver must be 'lanczos' or 'arpack'"),
        ({"max_basis": 3}, "max_basis must be an integer of at least"),
        ({"init": torch.ones(3)}, "init has 3 entries"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message: str) -> None:
    obj = Objective(QuadraticModel(_planted(50)), quadratic_loss, [None])
    with pytest.raises(ValueError, match=message):
        extremal_eigenpairs(obj, **kwargs)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=40, max_value=250),
    seed=st.integers(min_value=0, max_value=10_000),
    neg_fraction=st.floats(min_value=0.0, max_value=1.0),
)
# A cluster at the top: lambda_2 = 0.993226 and lambda_3 = 0.992892. With the Ritz-gap refinement the
# second value was declared converged at lambda_3 (bound 8.5e-9 against its true error 3.3e-4).
@example(n=186, seed=598, neg_fraction=0.0)
def test_lanczos_on_planted_spectra(n: int, seed: int, neg_fraction: float) -> None:
    """Property: whatever the spectrum, converged values are the extreme eigenvalues, within their bounds."""
    gen = np.random.default_rng(seed)
    vals = gen.uniform(0.01, 1.0, n) * np.where(gen.uniform(size=n) < neg_fraction, -1.0, 1.0)
    q, _ = np.linalg.qr(gen.standard_normal((n, n)))
    a = torch.tensor((q * vals) @ q.T)
    a = (a + a.T) / 2
    v0 = torch.tensor(gen.standard_normal(n))
    out = lanczos(lambda v: a @ v, v0, k=2, tol=1e-8, max_matvec=n + 5)
    true = np.sort(vals)
    # Cauchy interlacing: Ritz values lie inside the spectrum.
    assert out.ritz[0] >= true[0] - 1e-9 and out.ritz[-1] <= true[-1] + 1e-9
    # The certificate: some eigenvalue lies within each reported bound (the residual theorem).
    nearest = np.abs(true[None, :] - np.asarray(out.top_values)[:, None]).min(axis=1)
    assert np.all(nearest <= np.asarray(out.top_bounds) * (1 + 1e-6) + 1e-12)
    if out.converged_top:
        np.testing.assert_allclose(out.top_values, true[::-1][:2], atol=1e-7 * np.abs(true).max() + 1e-12)
    if out.converged_min:
        assert abs(out.min_value - true[0]) <= 1e-7 * (true[-1] - true[0]) + 1e-12
    assert out.converged_top and out.converged_min  # a full Krylov space always converges


def test_result_is_a_frozen_record_with_evidence() -> None:
    obj = Objective(QuadraticModel(_planted(80)), quadratic_loss, [None])
    result = extremal_eigenpairs(obj, k=2)
    assert isinstance(result, EigenResult)
    assert result.eigenvectors.shape == (2, 80) and result.vector_min is not None
    assert len(result.residuals) == 2 and result.n_hvp > 0 and result.seconds >= 0
    with pytest.raises(AttributeError):
        result.lambda_max = 0.0  # type: ignore[misc]


def test_lanczos_detects_a_non_symmetric_operator_and_restarts_on_finite_differences() -> None:
    """A once-differentiable op makes double backward silently wrong; the objective's symmetry check catches it."""
    from helpers import tanh_mlp_case
    from lightning_hessian import HvpFallbackWarning
    from test_objective import _CustomTanh

    case = tanh_mlp_case()
    exact = np.linalg.eigvalsh(dense_hessian(case).numpy())
    case.model[1] = _CustomTanh()
    case.model[3] = _CustomTanh()
    obj = Objective(case.model, case.loss_fn, case.batches)
    with pytest.warns(HvpFallbackWarning, match="not symmetric"):
        result = extremal_eigenpairs(obj, which="top")
    assert obj.active_engine == "finite_difference"
    assert obj.n_hvp_check == 4  # hvp="auto" checks symmetry on 4 random vectors (Lanczos's own pair missed some)
    assert result.lambda_max == pytest.approx(exact[-1], rel=1e-2)


def test_error_bounds_hold_and_unconverged_values_say_so() -> None:
    """A bound certifies that *an* eigenvalue lies that close (the nearest one); convergence flags the extremes."""
    vals = _planted(800, seed=11)
    obj = Objective(QuadraticModel(vals, seed=11), quadratic_loss, [None])
    for budget in (6, 10, 20, 40, 300):
        result = extremal_eigenpairs(obj, max_hvp=budget)
        nearest_max = np.abs(vals - result.lambda_max).min()
        nearest_min = np.abs(vals - result.lambda_min).min()
        assert nearest_max <= result.error_bounds[0] * (1 + 1e-6) + 1e-12
        assert nearest_min <= result.error_bound_min * (1 + 1e-6) + 1e-12
        assert result.error_bounds[0] <= result.residuals[0]
        if result.converged_min:  # within its own tolerance, 1e-3 of the width by default
            assert abs(result.lambda_min - vals.min()) <= result.tol_min * (vals.max() - vals.min())
    assert result.converged_min  # the largest budget is enough


# ----------------------------------------------------------------------------- lambda_min's tolerance, basis memory


def _issue10_spectrum() -> np.ndarray:
    """N = 1200: 650 eigenvalues in [0.01, 2], outliers 7 and 10, 548 in [-0.5, -0.001] (issue 10)."""
    gen = np.random.default_rng(0)
    return np.concatenate([gen.uniform(0.01, 2.0, 650), [7.0, 10.0], gen.uniform(-0.5, -0.001, 548)])


def test_lambda_min_has_its_own_tolerance_on_a_planted_spectrum_at_the_edge_of_a_dense_bulk() -> None:
    vals = _issue10_spectrum()
    width = vals.max() - vals.min()
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    default = extremal_eigenpairs(obj, max_hvp=300)
    strict = extremal_eigenpairs(obj, max_hvp=300, tol_min=1e-4)
    assert default.tol_min == 1e-3 and strict.tol_min == 1e-4 and default.tol == strict.tol == 1e-4
    assert default.converged and strict.converged
    assert abs(default.lambda_min - vals.min()) <= 1e-3 * width
    assert abs(strict.lambda_min - vals.min()) <= 1e-4 * width
    assert default.error_bound_min <= 1e-3 * width and strict.error_bound_min <= 1e-4 * width
    assert default.lambda_min < 0  # the sign is certified: the Ritz value is an upper bound on lambda_min
    assert default.n_hvp < strict.n_hvp
    assert default.lambda_max == pytest.approx(10.0, rel=1e-4)  # the top keeps its own (strict) tolerance


def test_lambda_min_is_not_declared_converged_from_a_tiny_krylov_space() -> None:
    """At tol_min=1e-3 a well-isolated second-lowest eigenvalue once passed for lambda_min after 7 products."""
    case = ALL_CASES[1]()
    ev = _dense_spectrum(case)
    obj = Objective(case.model, case.loss_fn, case.batches)
    for seed in range(3):
        result = extremal_eigenpairs(obj, seed=seed)
        assert result.converged_min and result.n_hvp >= 20
        assert abs(result.lambda_min - ev[0]) <= 1e-3 * (ev[-1] - ev[0])


def test_default_basis_size_follows_a_memory_bound() -> None:
    from lightning_hessian._krylov import auto_max_basis, basis_bytes

    assert auto_max_basis(100_000, 4) == 100  # 40 MB
    assert auto_max_basis(10_000_000, 4) == 52  # 2 GiB / 40 MB - 1
    assert auto_max_basis(10**9, 4) == 30  # never fewer than 30: the memory is then 31 vectors
    assert auto_max_basis(10_000_000, 2) == 100
    assert basis_bytes(52, 10_000_000, 4) <= 2 * 1024**3
    obj = Objective(QuadraticModel(_planted(300)), quadratic_loss, [None])
    result = extremal_eigenpairs(obj)
    assert result.max_basis == 100 and result.basis_bytes == 101 * 300 * 8  # float64 model
    bounded = extremal_eigenpairs(obj, basis_memory=40 * 300 * 8, max_hvp=400)
    assert bounded.max_basis == 39 and bounded.basis_bytes == 40 * 300 * 8
    assert bounded.converged and bounded.lambda_min == pytest.approx(result.lambda_min, abs=1e-3 * 5.5)


@pytest.mark.parametrize(
    ("kwargs", "rel"),
    [({"basis_device": "cpu"}, 1e-4), ({"basis_dtype": torch.float16}, 2e-3), ({"basis_dtype": torch.bfloat16}, 1e-2)],
)
def test_basis_in_host_memory_or_16_bits_gives_the_same_ends(kwargs, rel) -> None:
    """A 16-bit basis halves (float32 model) or quarters (float64) the memory; accuracy is that format's."""
    vals = _planted(400, seed=2)
    width = vals.max() - vals.min()
    obj = Objective(QuadraticModel(vals, seed=2), quadratic_loss, [None])
    result = extremal_eigenpairs(obj, max_hvp=400, tol=max(rel, 1e-4), tol_min=max(rel, 1e-3), max_basis=40, **kwargs)
    assert result.lambda_max == pytest.approx(vals.max(), rel=rel)
    assert abs(result.lambda_min - vals.min()) <= rel * width + 1e-3 * width
    assert result.converged_max
    if "basis_dtype" in kwargs:
        assert result.basis_bytes == 41 * 400 * 2


_MEMORY_PROBE = """
import json, resource, sys, torch
from torch import nn
from lightning_hessian import Objective, extremal_eigenpairs
from lightning_hessian.density import spectral_density

torch.set_num_threads(1)
n, what, device = int(sys.argv[1]), sys.argv[2], sys.argv[3]


class Diagonal(nn.Module):
    def __init__(self, n):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        d = torch.rand(n, generator=g) * 2.5 - 0.5
        d[:2] = torch.tensor([7.0, 10.0])
        self.register_buffer("d", d)
        self.theta = nn.Parameter(torch.randn(n, generator=g))

    def forward(self, _):
        return 0.5 * (self.d * self.theta**2).sum()


def current():
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak():
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


model = Diagonal(n).to(device)
obj = Objective(model, lambda m, b: m(b), [None], hvp="double_backward")
start = current()
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
with obj.session():
    obj.hvp(torch.ones(n, device=device))
    obj.hvp(torch.ones(n, device=device))
hvp_extra = peak() - start
base = current()
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
if what == "eig":
    r = extremal_eigenpairs(obj, max_hvp=45, basis_memory=100e6, tol=1e-12, tol_min=1e-12)
    out = {"basis_bytes": r.basis_bytes, "max_basis": r.max_basis, "n_hvp": r.n_hvp}
else:
    r = spectral_density(obj, max_hvp=80, n_starts=2, basis_memory=100e6)
    out = {"basis_bytes": r.basis_bytes, "n_hvp": r.n_hvp, "reorthogonalized": r.reorthogonalized}
out.update(extra=peak() - base, hvp_extra=hvp_extra, vector=n * 4)
print(json.dumps(out))
"""


def _probe_memory(n: int, what: str, device: str) -> dict[str, float]:
    import json
    import os
    import subprocess
    import sys

    # A fixed mmap threshold returns every freed vector to the OS at once, so the resident set
    # follows the live tensors instead of glibc's heap high-water mark.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(n), what, device],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["eig", "slq"])
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_measurement_on_two_million_parameters_stays_under_the_stated_memory_bound(what, device) -> None:
    """Stated bound: the basis ((max_basis + 1) N numbers, 0 for SLQ's three-term recurrence), plus
    at most k + 3 more vectors, plus what one HVP takes anyway. With basis_memory=100 MB and
    N = 2M float32 (8 MB a vector) the basis is 31 vectors (248 MB), where max_basis=100 would
    take 808 MB. Peak: resident set size on CPU, torch.cuda.max_memory_allocated on a GPU."""
    n = 2_000_000
    got = _probe_memory(n, what, device)
    vector = got["vector"]
    if what == "eig":
        assert got["max_basis"] == 30 and got["basis_bytes"] == 31 * vector
        assert got["n_hvp"] == 45  # past 30 products: the basis was full and thick-restarted
    else:
        assert not got["reorthogonalized"] and got["basis_bytes"] == 0  # 40 vectors did not fit 100 MB
    bound = got["basis_bytes"] + 4 * vector + got["hvp_extra"]
    assert got["extra"] <= bound, got
    # Beyond what one HVP takes anyway (which varies with the allocator's state: 0.1-0.8 GB seen here),
    # far below what an unbounded basis of 100 vectors would take.
    assert got["extra"] - got["hvp_extra"] < 100 * vector


@pytest.mark.parametrize(
    ("storage", "atol"), [(None, 1e-12), (torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]
)
def test_krylov_basis_products_and_in_place_restart_match_dense_algebra(storage, atol) -> None:
    from lightning_hessian._krylov import KrylovBasis

    gen = torch.Generator().manual_seed(0)
    n, m = 700_000, 6  # more entries than one restart slab
    rows, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    basis = KrylovBasis(m + 1, n, dtype=torch.float64, device=torch.device("cpu"), storage_dtype=storage)
    for i in range(m):
        basis.set(i, rows[:, i])
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    coeffs = basis.dot(m, w)
    torch.testing.assert_close(coeffs, rows.T @ w, atol=atol * float(w.norm()), rtol=0)
    rest = basis.subtract(m, coeffs, w)
    assert float((rows.T @ rest).abs().max()) <= atol * float(w.norm())
    mix = torch.randn(3, m, generator=gen, dtype=torch.float64)
    expected = mix @ rows.T
    assert float((basis.combine(mix, m) - expected).norm()) <= atol * float(expected.norm())
    basis.restart(mix, m)  # in place, slab by slab
    for i in range(3):
        assert float((basis.get(i) - expected[i]).norm()) <= atol * float(expected[i].norm())


def test_a_guide_in_the_top_eigenspace_saves_products_and_keeps_the_answer() -> None:
    """A start guided by a vector close to the top eigenvector converges in fewer products, to the same values."""
    vals = _planted(400)
    vals[-2] = 3.8  # a small gap at the top: slow from a random start
    model = QuadraticModel(vals)
    obj = Objective(model, quadratic_loss, [None])
    eig = torch.linalg.eigh(model.a)
    top = eig.eigenvectors[:, -1]
    noise = torch.randn(400, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    guide = top + 0.3 * noise / noise.norm()  # like a gradient: mostly, not only, in the top eigenspace
    cold = extremal_eigenpairs(obj, which="top", tol=1e-3)
    guided = extremal_eigenpairs(obj, which="top", tol=1e-3, guide=guide)
    assert guided.n_hvp < cold.n_hvp, (guided.n_hvp, cold.n_hvp)
    for result in (cold, guided):
        assert result.converged_max
        assert abs(result.lambda_max - vals.max()) <= result.error_bounds[0] + 1e-12
    assert guided.lambda_max == pytest.approx(vals.max(), rel=1e-3)


def test_a_guide_orthogonal_to_the_top_still_finds_it() -> None:
    """The random part of a guided cold start keeps every eigenvector in reach (a gradient can miss the top)."""
    vals = _planted(300)
    model = QuadraticModel(vals)
    obj = Objective(model, quadratic_loss, [None])
    interior = torch.linalg.eigh(model.a).eigenvectors[:, 150]
    both = extremal_eigenpairs(obj, tol=1e-6, tol_min=1e-6, max_hvp=300, guide=interior)
    assert both.lambda_max == pytest.approx(vals.max(), rel=1e-5)
    assert both.lambda_min == pytest.approx(vals.min(), rel=1e-4)
    same = extremal_eigenpairs(obj, which="top", guide=torch.zeros(300))  # a zero guide changes nothing
    plain = extremal_eigenpairs(obj, which="top")
    assert same.n_hvp == plain.n_hvp and same.lambda_max == plain.lambda_max
    with pytest.raises(ValueError, match="guide has 3 entries"):
        extremal_eigenpairs(obj, guide=torch.ones(3))


@pytest.mark.parametrize("max_basis", [7, 8])  # the smallest allowed for k=1 (k + 6), and one more
def test_both_ends_within_the_smallest_basis(max_basis: int) -> None:
    """Restarts that keep both ends in a tiny basis leave room for new Lanczos vectors (they used to overflow it)."""
    vals = _planted(200)
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    result = extremal_eigenpairs(obj, k=1, tol=1e-4, max_basis=max_basis, max_hvp=400)
    assert result.converged
    assert result.lambda_max == pytest.approx(vals.max(), rel=1e-3)
    assert abs(result.lambda_min - vals.min()) <= 1e-3 * (vals.max() - vals.min())
