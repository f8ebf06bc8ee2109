"""TrustRegion and Steihaug-Toint CG against independent ground truth: exact trust-region solutions in numpy
float64 (eigendecomposition + secular-equation root), a strict saddle, acceptance/rejection, resume, Lightning."""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from torch import Tensor, nn

from lightning_hessian.optim import TrustRegion, negative_curvature_step, steihaug_cg

# ---------------------------------------------------------------------------------------------------------------
# Ground truth: the exact solution of min g.s + s.Hs/2 s.t. ||s||_M <= radius, M diagonal (More-Sorensen theory)
# ---------------------------------------------------------------------------------------------------------------


def exact_tr_solution(h: np.ndarray, g: np.ndarray, metric: np.ndarray, radius: float) -> np.ndarray:
    """In u = M^{1/2} s the region is a ball; s* = -M^{-1/2} (A + mu I)^{-1} b with A = M^{-1/2} H M^{-1/2},
    b = M^{-1/2} g and mu >= max(0, -lambda_min(A)) the root of ||u(mu)|| = radius (or mu = 0 inside)."""
    d = 1.0 / np.sqrt(metric)
    a = d[:, None] * h * d[None, :]
    b = d * g
    lam, q = np.linalg.eigh(a)
    c = q.T @ b
    assert abs(c[0]) > 1e-6 * np.linalg.norm(c), "hard case: the test problems avoid it"

    def u_norm(mu: float) -> float:
        return float(np.linalg.norm(c / (lam + mu)))

    if lam[0] > 0 and u_norm(0.0) <= radius:
        mu = 0.0
    else:
        low = max(0.0, -lam[0]) + 1e-14 * max(1.0, abs(lam[0]))
        high = low + np.linalg.norm(b) / radius + 1.0
        while u_norm(high) > radius:
            high *= 2
        mu = brentq(lambda m: u_norm(m) - radius, low, high, xtol=1e-15, rtol=1e-15, maxiter=500)
    return d * (-(q @ (c / (lam + mu))))


def model(h: np.ndarray, g: np.ndarray, s: np.ndarray) -> float:
    return float(g @ s + 0.5 * s @ h @ s)


def m_norm(s: np.ndarray, metric: np.ndarray) -> float:
    return float(np.sqrt(s @ (metric * s)))


def cauchy_point(h: np.ndarray, g: np.ndarray, metric: np.ndarray, radius: float) -> np.ndarray:
    """The model minimiser along the preconditioned steepest descent -M^{-1} g, inside the region."""
    d = -g / metric
    t_max = radius / m_norm(d, metric)
    curv = d @ h @ d
    t = t_max if curv <= 0 else min(-(g @ d) / curv, t_max)
    return t * d


def problem(n: int, eigenvalues: np.ndarray, seed: int, ellipsoidal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H = M^{1/2} Q diag(eigenvalues) Q^T M^{1/2}, so M^{-1/2} H M^{-1/2} has the planted spectrum; random g."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    metric = rng.uniform(0.2, 5.0, n) if ellipsoidal else np.ones(n)
    root = np.sqrt(metric)
    h = root[:, None] * (q @ np.diag(eigenvalues) @ q.T) * root[None, :]
    return (h + h.T) / 2, rng.standard_normal(n), metric


def solve_cg(h: np.ndarray, g: np.ndarray, metric: np.ndarray, radius: float, ellipsoidal: bool, **kw: Any) -> Any:
    ht = torch.tensor(h)
    calls = []

    def hvp(v: Tensor) -> Tensor:
        calls.append(1)
        return ht @ v

    res = steihaug_cg(torch.tensor(g), hvp, radius, torch.tensor(metric) if ellipsoidal else None, **kw)
    assert res.n_hvp == len(calls)
    return res


NORMS = pytest.mark.parametrize("ellipsoidal", [False, True], ids=["uniform", "ellipsoidal"])


@NORMS
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cg_interior_solution_matches_exact_newton_step(ellipsoidal: bool, seed: int) -> None:
    h, g, metric = problem(8, np.geomspace(0.5, 20.0, 8), seed, ellipsoidal)
    exact = exact_tr_solution(h, g, metric, radius=1e6)
    assert m_norm(exact, metric) < 1e3  # the Newton step is well inside
    res = solve_cg(h, g, metric, 1e6, ellipsoidal, krylov_tol=1e-12, max_iters=50)
    assert not res.boundary and not res.negative_curvature
    np.testing.assert_allclose(res.step.numpy(), exact, rtol=1e-8, atol=1e-10)
    assert res.predicted_decrease == pytest.approx(-model(h, g, exact), rel=1e-10)


@NORMS
def test_cg_boundary_solution_is_exact_when_the_norm_matches_the_curvature(ellipsoidal: bool) -> None:
    # H = 3 M: the preconditioned CG direction -M^{-1} g is the Newton direction and the exact boundary solution.
    rng = np.random.default_rng(5)
    metric = rng.uniform(0.2, 5.0, 6) if ellipsoidal else np.ones(6)
    h, g = 3.0 * np.diag(metric), rng.standard_normal(6)
    radius = 0.2 * m_norm(np.linalg.solve(h, g), metric)
    exact = exact_tr_solution(h, g, metric, radius)
    res = solve_cg(h, g, metric, radius, ellipsoidal)
    assert res.boundary and not res.negative_curvature and res.iterations == 1
    np.testing.assert_allclose(res.step.numpy(), exact, rtol=1e-10, atol=1e-12)


@NORMS
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cg_boundary_solution_on_the_boundary_and_within_half_of_the_optimal_decrease(
    ellipsoidal: bool, seed: int
) -> None:
    h, g, metric = problem(10, np.geomspace(0.1, 50.0, 10), seed, ellipsoidal)
    radius = 0.3 * m_norm(exact_tr_solution(h, g, metric, 1e6), metric)
    exact = exact_tr_solution(h, g, metric, radius)
    assert m_norm(exact, metric) == pytest.approx(radius, rel=1e-9)
    res = solve_cg(h, g, metric, radius, ellipsoidal)
    s = res.step.numpy()
    assert res.boundary and not res.negative_curvature
    assert m_norm(s, metric) == pytest.approx(radius, rel=1e-10)
    m_cg, m_opt = model(h, g, s), model(h, g, exact)
    assert m_opt <= m_cg + 1e-12  # the exact solution is optimal (checks the reference too)
    assert m_cg <= model(h, g, cauchy_point(h, g, metric, radius)) + 1e-12  # at least the Cauchy decrease
    assert m_cg <= 0.5 * m_opt  # Yuan: for convex models Steihaug-Toint gets at least half the optimal decrease
    assert res.predicted_decrease == pytest.approx(-m_cg, rel=1e-10)


@NORMS
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cg_indefinite_hessian_ends_on_the_boundary_below_the_cauchy_point(ellipsoidal: bool, seed: int) -> None:
    h, g, metric = problem(10, np.array([-3.0, -0.5, 0.2, 1, 2, 4, 8, 10, 20, 40]), seed, ellipsoidal)
    radius = 1.5
    exact = exact_tr_solution(h, g, metric, radius)
    res = solve_cg(h, g, metric, radius, ellipsoidal)
    s = res.step.numpy()
    assert res.boundary
    assert m_norm(s, metric) == pytest.approx(radius, rel=1e-10)
    assert model(h, g, exact) <= model(h, g, s) + 1e-12
    assert model(h, g, s) <= model(h, g, cauchy_point(h, g, metric, radius)) + 1e-12
    assert res.predicted_decrease == pytest.approx(-model(h, g, s), rel=1e-10)


@NORMS
def test_cg_follows_negative_curvature_to_the_exact_solution(ellipsoidal: bool) -> None:
    # g along the negative-curvature eigenvector of M^{-1/2} H M^{-1/2}: the exact solution lies along -M^{-1} g.
    eig = np.array([-2.0, 0.5, 1.0, 3.0, 7.0, 11.0])
    h, _, metric = problem(6, eig, 3, ellipsoidal)
    d = 1.0 / np.sqrt(metric)
    _, q = np.linalg.eigh(d[:, None] * h * d[None, :])
    g = 0.7 * np.sqrt(metric) * q[:, 0]
    exact = exact_tr_solution(h, g, metric, radius=0.8)
    res = solve_cg(h, g, metric, 0.8, ellipsoidal)
    assert res.negative_curvature and res.boundary and res.iterations == 1
    np.testing.assert_allclose(res.step.numpy(), exact, rtol=1e-9, atol=1e-12)


@NORMS
def test_negative_curvature_search_finds_the_exact_solution_at_zero_gradient(ellipsoidal: bool) -> None:
    # g = 0 (a saddle): every minimiser is +-radius times the M-unit eigenvector of the most negative eigenvalue.
    eig = np.array([-1.5, -0.2, 0.3, 1.0, 2.0, 5.0])
    h, _, metric = problem(6, eig, 7, ellipsoidal)
    g = np.zeros(6)
    assert solve_cg(h, g, metric, 0.5, ellipsoidal).predicted_decrease == 0.0  # CG alone cannot move
    ht = torch.tensor(h)
    res = negative_curvature_step(
        torch.tensor(g),
        lambda v: ht @ v,
        0.5,
        torch.tensor(metric) if ellipsoidal else None,
        steps=6,
        generator=torch.Generator().manual_seed(0),
    )
    s = res.step.numpy()
    assert res.negative_curvature and m_norm(s, metric) == pytest.approx(0.5, rel=1e-10)
    assert model(h, g, s) == pytest.approx(0.5 * -1.5 * 0.25, rel=1e-9)  # m(s*) = lambda_min radius^2 / 2
    assert res.predicted_decrease == pytest.approx(-model(h, g, s), rel=1e-9)


def test_negative_curvature_search_returns_no_step_on_a_positive_definite_hessian() -> None:
    h = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    res = negative_curvature_step(torch.zeros(3, dtype=torch.float64), lambda v: h @ v, 1.0, steps=3)
    assert res.predicted_decrease == 0.0 and not res.negative_curvature and torch.count_nonzero(res.step) == 0


# ---------------------------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------------------------


def closure_for(opt: torch.optim.Optimizer, loss_fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("norm", ["uniform", "rms"])
def test_leaves_a_strict_saddle_where_gradient_descent_stays(norm: str) -> None:
    # f = x^2 - y^2 + y^4/4: gradient zero at the origin, Hessian diag(2, -2); minima at y = +-sqrt(2), f = -1.
    def f(p: Tensor) -> Tensor:
        return p[0] ** 2 - p[1] ** 2 + p[1] ** 4 / 4

    start = torch.zeros(2, dtype=torch.float64)
    gd_point = start.clone().requires_grad_(True)
    sgd = torch.optim.SGD([gd_point], lr=0.1)
    for _ in range(30):
        sgd.step(closure_for(sgd, lambda: f(gd_point)))
    assert torch.count_nonzero(gd_point.detach()) == 0 and f(gd_point).item() == 0.0

    tr_point = start.clone().requires_grad_(True)
    opt = TrustRegion([tr_point], norm, radius=0.1)
    stats = []
    for _ in range(80):
        opt.step(closure_for(opt, lambda: f(tr_point)))
        stats.append(opt.last_stats)
    # The first move is along the negative curvature (rms: after some rejections, since at g = 0 its norm is
    # eps-small and the first boundary steps are huge in Euclidean terms).
    first = next(s for s in stats if s.accepted)
    assert first.negative_curvature and first.cg_iterations == 0 and first.lanczos_iterations == first.n_hvp == 2
    assert abs(tr_point[1].item()) == pytest.approx(math.sqrt(2), abs=1e-4)
    assert f(tr_point).item() == pytest.approx(-1.0, abs=1e-6)


def test_one_step_on_a_quadratic_is_the_newton_step_with_rho_one() -> None:
    # Checks the cached-graph HVPs end to end: an exact Hessian makes the model exact.
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.5, 4.0, 6, dtype=torch.float64)) @ q.T
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = TrustRegion([x], "uniform", radius=100.0, max_radius=100.0, krylov_tol=1e-12)
    opt.step(closure_for(opt, lambda: 0.5 * x @ a @ x + b @ x))
    stats = opt.last_stats
    assert stats is not None and stats.accepted and not stats.boundary
    torch.testing.assert_close(x.detach(), -torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)
    assert stats.rho == pytest.approx(1.0, abs=1e-9)
    assert stats.n_grad == 1 and stats.n_loss == 1 and stats.n_hvp == stats.cg_iterations <= 6
    assert stats.backprops == 1 + 2 * stats.n_hvp + 0.5


def mlp_problem(seed: int = 0, data_seed: int = 0) -> tuple[nn.Module, Callable[[], Tensor]]:
    """A float64 tanh MLP (weights from ``seed``) and its deterministic full-batch loss (data from ``data_seed``)."""
    gen = torch.Generator().manual_seed(data_seed)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return net, lambda: nn.functional.cross_entropy(net(x), y)


@pytest.mark.parametrize("norm", ["uniform", "rms", "adagrad", "adam"])
def test_accepted_steps_decrease_the_loss_and_rejected_steps_leave_parameters_bit_identical(norm: str) -> None:
    net, loss_fn = mlp_problem()
    opt = TrustRegion(net.parameters(), norm, radius=5.0)  # far too large at first: forces rejections
    statuses = set()
    for _ in range(25):
        before = [p.detach().clone() for p in net.parameters()]
        with torch.no_grad():
            loss_before = loss_fn().item()
        opt.step(closure_for(opt, loss_fn))
        stats = opt.last_stats
        assert stats is not None
        statuses.add(stats.status)
        with torch.no_grad():
            loss_after = loss_fn().item()
        assert stats.loss == loss_before
        if stats.accepted:
            assert loss_after < loss_before
            assert loss_after == stats.trial_loss
            assert stats.rho >= 0.01
        else:
            assert stats.status == "rejected"
            assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
            assert stats.next_radius == pytest.approx(stats.radius / 1.5)
    assert statuses == {"accepted", "rejected"}


def test_grad_holds_the_gradient_of_the_starting_point_after_a_step() -> None:
    net, loss_fn = mlp_problem()
    expected = torch.autograd.grad(loss_fn(), list(net.parameters()))
    opt = TrustRegion(net.parameters(), "rms")
    opt.step(closure_for(opt, loss_fn))
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("norm", "expected"), [("rms", lambda g: (0.2 * g * g).sqrt()), ("adam", lambda g: g.abs())])
def test_metric_is_the_square_root_of_the_second_moment_plus_eps(
    norm: str, expected: Callable[[Tensor], Tensor]
) -> None:
    # After one gradient: RMS (beta 0.8) has v = 0.2 g^2; Adam's bias correction gives v = g^2.
    net, loss_fn = mlp_problem()
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(), list(net.parameters()))])
    opt = TrustRegion(net.parameters(), norm, radius=1e-3)
    opt.step(closure_for(opt, loss_fn))
    metric = opt.metric()
    assert metric is not None
    torch.testing.assert_close(metric, expected(grad) + 1e-8, rtol=1e-10, atol=1e-14)
    assert TrustRegion([torch.zeros(2, requires_grad=True)], "uniform").metric() is None


def run_steps(opt: TrustRegion, loss_fn: Callable[[], Tensor], n: int) -> list[Any]:
    out = []
    for _ in range(n):
        opt.step(closure_for(opt, loss_fn))
        out.append(opt.last_stats)
    return out


@pytest.mark.parametrize("norm", ["rms", "adam"])
def test_state_dict_round_trip_resumes_bit_identically(norm: str) -> None:
    # gradient_tol=inf runs the random-start Lanczos search every step, so the generator's state matters too.
    options: dict[str, Any] = dict(radius=0.5, gradient_tol=math.inf, lanczos_steps=3)
    net, loss_fn = mlp_problem()
    opt = TrustRegion(net.parameters(), norm, seed=1, **options)
    run_steps(opt, loss_fn, 4)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buffer)
    expected = run_steps(opt, loss_fn, 5)
    assert any(s.negative_curvature for s in expected) or any(s.status == "rejected" for s in expected)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    net2, loss_fn2 = mlp_problem(seed=1)  # other initial weights and another optimizer seed: all must come back
    net2.load_state_dict(checkpoint["model"])
    opt2 = TrustRegion(net2.parameters(), norm, seed=2, **options)
    opt2.load_state_dict(checkpoint["optimizer"])
    assert opt2.radius == expected[0].radius
    resumed = run_steps(opt2, loss_fn2, 5)
    assert resumed == expected
    assert all(torch.equal(p, q) for p, q in zip(net2.parameters(), net.parameters()))
    assert all(
        torch.equal(opt2.state[p2]["second_moment"], opt.state[p]["second_moment"])
        for p, p2 in zip(net.parameters(), net2.parameters())
    )


def test_resume_without_the_generator_state_would_differ() -> None:
    # The round-trip test above can fail: a fresh optimizer with another seed takes different Lanczos steps.
    options: dict[str, Any] = dict(radius=0.5, gradient_tol=math.inf, lanczos_steps=3)
    steps = []
    for seed in (1, 2):
        net, loss_fn = mlp_problem()
        steps.append(run_steps(TrustRegion(net.parameters(), "rms", seed=seed, **options), loss_fn, 3))
    assert steps[0] != steps[1]


# ---------------------------------------------------------------------------------------------------------------
# Errors a user can cause fail early, saying what is allowed
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(norm="ellipse"), "norm must be one of 'uniform', 'rms', 'adagrad', 'adam'"),
        (dict(radius=0.0), "radius must be a positive finite number"),
        (dict(radius=-1.0), "radius must be a positive finite number"),
        (dict(radius=math.nan), "radius must be a positive finite number"),
        (dict(radius=20.0), "max_radius must be finite and >= radius"),
        (dict(accept_threshold=0.0), "0 < accept_threshold <= expand_threshold < 1"),
        (dict(accept_threshold=0.5, expand_threshold=0.4), "0 < accept_threshold <= expand_threshold < 1"),
        (dict(expand_threshold=1.0), "0 < accept_threshold <= expand_threshold < 1"),
        (dict(expand_factor=0.9), "expand_factor must be a finite number >= 1"),
        (dict(shrink_factor=1.0), "shrink_factor must be a finite number > 1"),
        (dict(beta=1.0), r"beta must be in \[0, 1\)"),
        (dict(eps=0.0), "eps must be a positive finite number"),
        (dict(krylov_tol=0.0), "krylov_tol must be a positive finite number"),
        (dict(max_cg_iters=0), "max_cg_iters must be an integer >= 1"),
        (dict(max_cg_iters=2.5), "max_cg_iters must be an integer >= 1"),
        (dict(lanczos_steps=-1), "lanczos_steps must be an integer >= 0"),
        (dict(gradient_tol=-1.0), "gradient_tol must be a number >= 0"),
    ],
)
def test_invalid_options_fail_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrustRegion([torch.zeros(2, requires_grad=True)], **kwargs)


def test_step_without_a_closure_says_what_to_pass() -> None:
    opt = TrustRegion([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(1.0)  # type: ignore[arg-type]


def test_a_second_parameter_group_is_refused() -> None:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="one parameter group"):
        TrustRegion([{"params": [a]}, {"params": [b]}])


def test_loading_another_optimizers_state_dict_is_refused() -> None:
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="not written by TrustRegion"):
        TrustRegion([p]).load_state_dict(torch.optim.Adam([p]).state_dict())


def test_closure_that_only_returns_the_loss_works_and_backward_is_restored_afterwards() -> None:
    net, loss_fn = mlp_problem()
    original = torch.autograd.backward
    opt = TrustRegion(net.parameters(), "uniform", radius=0.1)
    opt.step(loss_fn)  # no zero_grad, no backward: the optimizer differentiates the returned loss
    assert opt.last_stats is not None and opt.last_stats.status == "accepted"
    assert torch.autograd.backward is original


def test_a_closure_failing_at_the_trial_point_leaves_parameters_and_backward_as_they_were() -> None:
    net, loss_fn = mlp_problem()
    before = [p.detach().clone() for p in net.parameters()]
    original = torch.autograd.backward
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader broke")
        return loss_fn()

    opt = TrustRegion(net.parameters(), "rms")
    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert torch.autograd.backward is original


def test_importing_the_optimizer_does_not_import_lightning() -> None:
    code = (
        "import sys, lightning_hessian.optim; "
        "bad = [m for m in sys.modules if m in ('lightning', 'pytorch_lightning') or m.startswith('lightning.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# Lightning: automatic optimization passes the closure; the logger callback records each step
# ---------------------------------------------------------------------------------------------------------------


def test_lightning_fit_with_automatic_optimization_trains_and_logs_the_steps(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_hessian.optim.callback import TrustRegionLogger

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=gen)
    y = (x[:, 0] - x[:, 1] > 0).long()

    class Classifier(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
            self.calls = 0

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            self.calls += 1
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> TrustRegion:
            return TrustRegion(self.parameters(), "rms", radius=0.01)

    torch.manual_seed(0)
    module = Classifier()
    with torch.no_grad():
        before = nn.functional.cross_entropy(module.net(x), y).item()
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        max_epochs=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(str(tmp_path), name="tr"),
        log_every_n_steps=1,
        callbacks=[TrustRegionLogger()],
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, TrustRegion)
    counts = opt.state["trust_region"]  # type: ignore[index]
    assert counts["n_grad"] == counts["n_loss"] == trainer.global_step == 6
    assert module.calls == 12  # the closure ran twice per step: the gradient, then the trial point
    assert counts["accepted"] >= 1
    with torch.no_grad():
        assert nn.functional.cross_entropy(module.net(x), y).item() < before
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("trust_region/radius")]
    assert len(logged) == 6
    assert {"trust_region/rho", "trust_region/cg_iterations", "trust_region/total_backprops"} <= set(rows[0])
    assert float(logged[-1]["trust_region/total_backprops"]) == opt.total_backprops


def test_unified_logger_is_a_lightning_pytorch_callback() -> None:
    lightning = pytest.importorskip("lightning")
    from lightning_hessian.optim.unified import TrustRegionLogger

    assert issubclass(TrustRegionLogger, lightning.pytorch.Callback)
    with pytest.raises(ValueError, match="keys must be a non-empty subset"):
        TrustRegionLogger(keys=["rho", "learning_rate"])
