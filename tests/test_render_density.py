"""Spectra files round-trip and their pictures re-render without a model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import QuadraticModel, quadratic_loss, tanh_mlp_case
from lightning_hessian import Objective
from lightning_hessian.blocks import block_spectrum
from lightning_hessian.density import spectral_density
from lightning_hessian.render_density import (
    blocks_figure,
    density_evolution_figure,
    density_figure,
    render_spectra,
    save_figure,
)
from lightning_hessian.spectra_files import list_densities, load_blocks, load_density, save_blocks, save_density


def _estimates():
    vals = np.concatenate([np.linspace(-0.5, -0.01, 60), np.linspace(0.01, 2.0, 100), [6.0, 9.0]])
    obj = Objective(QuadraticModel(vals), quadratic_loss, [None])
    return [spectral_density(obj, max_hvp=60, n_starts=3, seed=s) for s in range(3)]


def test_density_files_round_trip_and_render(tmp_path) -> None:
    estimates = _estimates()
    for step, est in zip((0, 10, 100), estimates):
        save_density(tmp_path, step, est, lambda_min=-0.5, lambda_max=9.0, meta={"epoch": 1})
    paths = list_densities(tmp_path)
    assert [p.name for p in paths] == ["step_000000000.npz", "step_000000010.npz", "step_000000100.npz"]
    rec = load_density(paths[1])
    assert rec.step == 10 and rec.lambda_min == -0.5 and rec.lambda_max == 9.0 and rec.meta == {"epoch": 1}
    assert rec.estimate.negative_mass == estimates[1].negative_mass
    assert rec.estimate.n_outliers == estimates[1].n_outliers
    for a, b in zip(rec.estimate.weights, estimates[1].weights):
        np.testing.assert_array_equal(a, b)
    written = render_spectra(tmp_path, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert "density_evolution.png" in names and "density_000000010.png" in names
    with Image.open(tmp_path / "out" / "density_evolution.png") as im:
        assert im.size[0] > 400 and im.size[1] > 300


def test_block_files_round_trip_and_render(tmp_path) -> None:
    case = tanh_mlp_case()
    obj = Objective(case.model, case.loss_fn, case.batches)
    result = block_spectrum(obj, n_trace=4, max_hvp=10, max_hvp_per_block=8)
    path = save_blocks(tmp_path, 7, result)
    data = load_blocks(path)
    assert data["step"] == 7 and [b["name"] for b in data["blocks"]] == list(result.names)
    assert any(b["lambda_max"] is None for b in data["blocks"])  # the budget left some blocks unmeasured
    save_figure(blocks_figure(data), tmp_path / "b.png")
    save_figure(blocks_figure(result, step=7), tmp_path / "c.png")
    assert render_spectra(tmp_path)[0].name == "blocks_000000007.png"


def test_figures_accept_plain_estimates_and_refuse_nothing_to_draw(tmp_path) -> None:
    estimates = _estimates()
    save_figure(density_figure(estimates[0]), tmp_path / "one.png")
    save_figure(density_evolution_figure(list(enumerate(estimates)), yscale="linear"), tmp_path / "lin.png")
    with pytest.raises(ValueError, match="at least one"):
        density_evolution_figure([])
    with pytest.raises(ValueError, match="yscale"):
        density_evolution_figure(estimates, yscale="log")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="no density"):
        render_spectra(tmp_path / "empty")
    with pytest.raises(ValueError, match="step must be"):
        save_density(tmp_path, -1, estimates[0])
