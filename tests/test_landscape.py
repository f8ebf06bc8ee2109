"""Loss landscapes: exact centred grids, directions, and the indicators against closed forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import QuadraticModel, assert_untouched, bn_cnn_case, quadratic_loss, snapshot, tanh_mlp_case
from lightning_hessian import Objective, extremal_eigenpairs
from lightning_hessian.frames import FrameState, LandscapeConfig, landscape_frame, weight_norm
from lightning_hessian.indicators import grid_curvatures, grid_minimum, plane_curvature, saddle_visibility
from lightning_hessian.landscape import (
    centred_coordinates,
    curvature_span,
    hessian_directions,
    loss_line,
    loss_surface,
    orthogonalize,
    random_direction,
)
from lightning_hessian.snapshots import load_snapshot, save_snapshot


def _saddle(n: int = 400, seed: int = 0) -> tuple[np.ndarray, Objective]:
    """A quadratic saddle with tr H > 0: one strongly negative direction in a positive bulk."""
    gen = np.random.default_rng(seed)
    vals = gen.uniform(0.2, 1.0, n)
    vals[0], vals[-1] = -3.0, 5.0
    model = QuadraticModel(vals, seed=seed)
    with torch.no_grad():
        model.theta.copy_(model.c)  # the critical point itself: gradient zero, a true saddle
    return vals, Objective(model, quadratic_loss, [None])


def test_coordinates_are_odd_symmetric_and_exactly_zero_in_the_middle() -> None:
    c = centred_coordinates(0.3, 21)
    assert len(c) == 21 and c[10] == 0.0
    np.testing.assert_array_equal(c, -c[::-1])
    assert c[0] == -0.3 and c[-1] == 0.3
    with pytest.raises(ValueError, match="odd integer"):
        centred_coordinates(1.0, 20)
    with pytest.raises(ValueError, match="span must be a positive"):
        centred_coordinates(0.0, 21)


def test_centre_of_every_plane_is_the_current_loss_and_the_model_is_untouched() -> None:
    case = bn_cnn_case()
    case.model.train()
    before = snapshot(case.model)
    obj = Objective(case.model, case.loss_fn, case.batches)
    d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)
    surface = loss_surface(obj, d1, d2, span=0.5, resolution=5, kind="random")
    assert surface.losses.shape == (5, 5)
    assert surface.center_loss == pytest.approx(obj.loss(), rel=1e-12)
    assert surface.losses[2, 2] == surface.center_loss
    assert surface.n_loss == 25
    assert_untouched(before, case.model)


def test_grid_points_are_exact_not_incremental() -> None:
    """Each cell equals the loss at theta + a d1 + b d2 computed on its own (row = beta, column = alpha)."""
    case = tanh_mlp_case()
    obj = Objective(case.model, case.loss_fn, case.batches)
    d1, d2 = random_direction(obj, seed=3), random_direction(obj, seed=4)
    surface = loss_surface(obj, d1, d2, span=(0.4, 0.8), resolution=5)
    for i, b in enumerate(surface.betas):
        for j, a in enumerate(surface.alphas):
            point = torch.add(obj.parameters(), d1, alpha=float(a)).add_(d2, alpha=float(b))  # computed on its own
            expected = float(obj.losses_at([point], absolute=True)[0])
            assert surface.losses[i, j] == pytest.approx(expected, rel=1e-12)


def test_quadratic_grid_is_symmetric_and_matches_the_closed_form() -> None:
    vals, obj = _saddle(200)
    eig = extremal_eigenpairs(obj, max_hvp=300)
    d1, d2 = hessian_directions(eig)
    surface = loss_surface(obj, d1, d2, span=0.5, resolution=7)
    aa, bb = np.meshgrid(surface.alphas, surface.betas)
    expected = surface.center_loss + 0.5 * (vals.max() * aa**2 + vals.min() * bb**2)
    np.testing.assert_allclose(surface.losses, expected, atol=1e-8)
    np.testing.assert_allclose(surface.losses, surface.losses[::-1, ::-1], atol=1e-10)


@pytest.mark.parametrize("make_objective", ["quadratic", "tanh_mlp"])
def test_grid_curvatures_on_a_hessian_plane_match_the_eigenvalues(make_objective: str) -> None:
    if make_objective == "quadratic":
        _, obj = _saddle(300)
    else:
        case = tanh_mlp_case()
        obj = Objective(case.model, case.loss_fn, case.batches)
    eig = extremal_eigenpairs(obj, max_hvp=300)
    d1, d2 = hessian_directions(eig)
    # Small, but not so small that float32 round-off (about 4 eps L / h^2) swamps the second difference.
    surface = loss_surface(obj, d1, d2, span=0.1, resolution=5, kind="hessian")
    ca, cb = grid_curvatures(surface)
    assert ca == pytest.approx(eig.lambda_max, rel=1e-2)
    assert cb == pytest.approx(eig.lambda_min, rel=1e-2)


def test_random_plane_hides_the_saddle_that_the_hessian_plane_shows() -> None:
    """tr H > 0: the random plane looks like a minimum; the Hessian plane is a saddle; the indicators say so."""
    vals, obj = _saddle(400)
    assert vals.sum() > 0 and vals.min() < 0
    eig = extremal_eigenpairs(obj, max_hvp=300)
    h1, h2 = hessian_directions(eig)
    hessian = plane_curvature(obj, h1, h2)
    assert hessian.shows_saddle
    np.testing.assert_allclose(hessian.principal, (vals.min(), vals.max()), rtol=1e-6)
    r1 = random_direction(obj, seed=5, normalization="none", ignore_bias_and_norm=False)
    r2 = orthogonalize(r1, random_direction(obj, seed=6, normalization="none", ignore_bias_and_norm=False))
    random_plane = plane_curvature(obj, r1, r2)
    assert not random_plane.shows_saddle and random_plane.principal[0] > 0
    # Expected projected curvature of a Gaussian direction is tr(H): d'Hd / |d|^2 ~ tr(H) / N.
    assert random_plane.matrix[0, 0] / float(r1 @ r1) == pytest.approx(vals.mean(), rel=0.2)
    # The grids agree with the indicators: the random grid's minimum is its centre, the Hessian grid's is not.
    rs = loss_surface(obj, r1 / r1.norm(), r2 / r2.norm(), span=0.5, resolution=9, kind="random")
    hs = loss_surface(obj, h1, h2, span=0.5, resolution=9, kind="hessian")
    assert grid_minimum(rs).offset == 0.0
    low = grid_minimum(hs)
    assert low.alpha == 0.0 and abs(low.beta) == 0.5 and low.depth == pytest.approx(-0.5 * vals.min() * 0.25)
    # And the visibility number says a random plane almost never shows it.
    assert saddle_visibility(float(vals.sum()), float((vals**2).sum())) < 1e-6


def test_saddle_visibility_closed_form() -> None:
    assert saddle_visibility(0.0, 4.0) == pytest.approx(1 / np.sqrt(2))
    assert saddle_visibility(np.sqrt(20.0), 1.0) == pytest.approx(np.exp(-5) / np.sqrt(2))
    assert np.isnan(saddle_visibility(1.0, 0.0))


def test_filter_normalisation_matches_each_filter_norm_and_zeroes_biases() -> None:
    case = bn_cnn_case()
    obj = Objective(case.model, case.loss_fn, case.batches)
    d = random_direction(obj, seed=0)
    for (name, _), w, piece in zip(obj.param_shapes, obj.split(obj.parameters()), obj.split(d)):
        if w.dim() > 1:
            np.testing.assert_allclose(
                piece.reshape(len(piece), -1).norm(dim=1), w.reshape(len(w), -1).norm(dim=1), rtol=1e-5
            )
        else:
            assert torch.count_nonzero(piece) == 0, name
    layer = random_direction(obj, seed=0, normalization="layer", ignore_bias_and_norm=False)
    for w, piece in zip(obj.split(obj.parameters()), obj.split(layer)):
        assert float(piece.norm()) == pytest.approx(float(w.norm()), rel=1e-5)
    assert torch.equal(d, random_direction(obj, seed=0))  # same seed, same plane in every frame
    assert not torch.equal(d, random_direction(obj, seed=1))


def test_hessian_directions_keep_their_sign_across_frames() -> None:
    _, obj = _saddle(100)
    eig = extremal_eigenpairs(obj)
    d1, d2 = hessian_directions(eig)
    flipped = hessian_directions(eig, previous=(-d1, -d2))
    assert torch.equal(flipped[0], -d1) and torch.equal(flipped[1], -d2)
    same = hessian_directions(eig, previous=(d1, d2))
    assert torch.equal(same[0], d1) and torch.equal(same[1], d2)


def test_validation_objective_and_non_finite_values_on_the_same_plane() -> None:
    case = tanh_mlp_case()
    train = Objective(case.model, case.loss_fn, case.batches[:1])
    val = Objective(case.model, case.loss_fn, case.batches[1:])
    d1, d2 = random_direction(train, seed=1), random_direction(train, seed=2)
    d2[-1] = 3e38  # the last output bias: an infinite logit wherever b != 0 (0 * inf would poison b = 0)
    surface = loss_surface(train, d1, d2, span=1.0, resolution=3, val_objective=val)
    assert surface.val_losses is not None
    assert surface.val_losses[1, 1] == pytest.approx(val.loss(), rel=1e-12)
    assert not np.isfinite(surface.losses[0]).any() and np.isfinite(surface.losses[1]).all()
    low = grid_minimum(surface)
    assert low.beta == 0.0 and np.isfinite(low.loss)


def test_loss_line_and_curvature_span() -> None:
    vals, obj = _saddle(100)
    eig = extremal_eigenpairs(obj)
    line = loss_line(obj, eig.eigenvectors[0], span=0.2, resolution=5)
    np.testing.assert_allclose(line.losses - line.losses[2], 0.5 * vals.max() * line.ts**2, atol=1e-10)
    assert curvature_span(4.0, 2.0, rise=1.0) == pytest.approx(1.0)
    assert curvature_span(0.0, 1.0) == 1e3  # flat: clipped


def _near_flat_saddle(n: int = 40, lam_min: float = -1e-4) -> Objective:
    """A quadratic whose most negative eigenvalue is tiny, away from its critical point (loss > 0)."""
    gen = np.random.default_rng(3)
    vals = gen.uniform(0.5, 2.0, n)
    vals[0] = lam_min
    model = QuadraticModel(vals, seed=3)
    with torch.no_grad():
        model.theta.copy_(model.c + 0.2 * torch.tensor(gen.standard_normal(n)))
    return Objective(model, quadratic_loss, [None])


def test_tiny_lambda_min_span_is_capped_by_the_weight_norm_and_recorded(tmp_path: Path) -> None:
    obj = _near_flat_saddle()
    norm = float(obj.parameters().norm())  # 1-D parameters only: the norm of all of them
    assert weight_norm(obj) == pytest.approx(norm)
    config = LandscapeConfig(planes=("hessian",), resolution=5, line_resolution=5, max_span=0.5)
    snap = landscape_frame(obj, config, FrameState())
    record = snap.meta["hessian_span"]
    lam_max, lam_min = snap.planes["hessian"].eigenvalues  # type: ignore[misc]
    assert lam_min == pytest.approx(-1e-4, rel=1e-3)
    center = snap.scalars["center_loss"]
    raw = curvature_span(lam_min, center)
    assert raw > 10 * norm  # uncapped, the plane would reach far beyond the weights' own size
    assert record["capped"] == [False, True] and record["cap"] == pytest.approx(0.5 * norm)
    assert record["curvature_spans"][1] == pytest.approx(raw)
    assert "v_min" in record["reason"] and "capped" in record["reason"]
    assert snap.scalars["hessian_span_min"] == pytest.approx(0.5 * norm)
    assert snap.scalars["hessian_span_max"] == pytest.approx(curvature_span(lam_max, center))
    assert snap.planes["hessian"].betas[-1] == pytest.approx(0.5 * norm)
    assert snap.lines["v_min"].ts[-1] == pytest.approx(0.5 * norm)  # the 1-D cut uses the same span
    # the record survives the file round trip and reaches the picture
    loaded = load_snapshot(save_snapshot(tmp_path, snap))
    assert loaded.meta["hessian_span"]["capped"] == [False, True]
    assert loaded.planes["hessian"].meta["span_capped"] == [False, True]


def test_span_cap_off_and_fixed_span_are_recorded() -> None:
    obj = _near_flat_saddle()
    uncapped = LandscapeConfig(planes=("hessian",), resolution=3, lines=False, max_span=None)
    record = landscape_frame(obj, uncapped, FrameState()).meta["hessian_span"]
    assert record["capped"] == [False, False] and record["cap"] is None
    assert record["spans"] == record["curvature_spans"]
    fixed = LandscapeConfig(planes=("hessian",), resolution=3, lines=False, span=0.3)
    record = landscape_frame(obj, fixed, FrameState()).meta["hessian_span"]
    assert record["rule"] == "fixed" and record["spans"] == [0.3, 0.3]
    with pytest.raises(ValueError, match="max_span"):
        LandscapeConfig(max_span=0.0)


def test_weight_norm_leaves_out_biases_and_normalisation() -> None:
    case = bn_cnn_case()
    obj = Objective(case.model, case.loss_fn, case.batches[:1])
    weights = [p.detach() for p in case.model.parameters() if p.dim() > 1]
    expected = float(torch.sqrt(sum((w.double() ** 2).sum() for w in weights)))
    assert weight_norm(obj) == pytest.approx(expected, rel=1e-6)
    # ... which is the distance a filter-normalised random direction moves the weights at 1 unit
    assert float(random_direction(obj, seed=0).norm()) == pytest.approx(expected, rel=1e-5)
