"""SpectralDensity and BlockSpectrum instruments against dense float64 spectra, alone and in a Lightning fit.

Ground truth is independent of the code under test: planted spectra (the eigenvalues are chosen),
and dense float64 Hessians of small nets (``torch.func.hessian``). Tolerances come from the
estimators' own evidence: the negative mass is within its quadrature bracket's half width plus
four standard errors of the truth, block traces within four standard errors, block
``lambda_max`` within its Ritz error bound.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn

from helpers import Case, QuadraticModel, compute_dense_hessian, quadratic_loss
from lightning_hessian import HessianMonitor, Objective
from lightning_hessian.__main__ import main as cli_main
from lightning_hessian.blocks import parameter_blocks
from lightning_hessian.density import spectral_density
from lightning_hessian.instruments import (
    Artifact,
    BlockSpectrum,
    Eigenvalues,
    SpectralDensity,
    StepResult,
    run_instruments,
)
from lightning_hessian.snapshots import save_snapshot
from lightning_hessian.spectra_files import list_blocks, list_densities, load_blocks, load_density
from lightning_models import TanhModule, dense_hessian_at, probe_loader, probe_loss, train_loader, trainer_kwargs
from test_render import make_snapshot

REPO = Path(__file__).resolve().parents[1]


def _ce(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _planted_values(seed: int = 0) -> np.ndarray:
    """N = 300: 170 eigenvalues in [0.01, 2], outliers 6 and 9, 128 in [-0.5, -0.001]."""
    gen = np.random.default_rng(seed)
    return np.concatenate([gen.uniform(0.01, 2.0, 170), [6.0, 9.0], gen.uniform(-0.5, -0.001, 128)])


@functools.cache
def _planted() -> tuple[QuadraticModel, np.ndarray]:
    values = _planted_values()
    return QuadraticModel(values), np.sort(values)


def _small_case(seed: int = 0) -> Case:
    """A 5-8-8-3 tanh net (147 parameters, three modules): dense Hessians in well under a second."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    return Case(f"spectra_small_{seed}", model, _ce, [(x[:40], y[:40]), (x[40:], y[40:])])


@functools.cache
def _small() -> tuple[Case, Tensor]:
    case = _small_case()
    return case, compute_dense_hessian(case)


def _artifacts(result: StepResult, name: str, kind: str) -> list[Artifact]:
    return [a for a in result.outputs[name].artifacts if a.kind == kind]


def _record(result: StepResult, name: str) -> dict[str, Any]:
    (artifact,) = _artifacts(result, name, "record")
    data: dict[str, Any] = artifact.data[name]
    return data


def _save(result: StepResult, name: str, directory: Path) -> None:
    for artifact in _artifacts(result, name, "save"):
        assert artifact.name == "spectra"
        artifact.data(directory)


def _assert_image(rgb: Any, min_width: int = 600) -> None:
    assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[1] >= min_width and rgb.shape[0] >= 200
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20  # something is drawn


# ------------------------------------------------------------------------------------ SpectralDensity


def test_spectral_density_metrics_match_the_planted_spectrum_and_cost_only_its_budget(tmp_path: Path) -> None:
    model, values = _planted()
    obj = Objective(model, quadratic_loss, [None])
    n_starts = 8
    result = run_instruments(obj, [SpectralDensity(max_hvp=160, n_starts=n_starts, image=False)], seed=2, step=7)
    m = result.metrics
    record = _record(result, "spectral_density")
    # No Eigenvalues instrument: the marks are the density's own Ritz extremes, no extra Lanczos run.
    assert result.eigen is None and m["hvp_count"] == 160 + obj.n_hvp_check  # (the engine's one-time check)
    assert record["lambda_min_marked"] is None and record["lambda_max_marked"] is None
    truth = float(np.mean(values < 0))
    lower, upper = record["negative_mass_lower"], record["negative_mass_upper"]
    assert lower <= m["negative_mass"] <= upper
    assert abs(m["negative_mass"] - truth) <= (upper - lower) / 2 + 4 * m["negative_mass_stderr"]
    assert m["negative_mass_stderr"] > 0
    assert m["n_outliers"] == 2 and 1.9 <= m["bulk_edge"] <= 2.0  # 6 and 9 above the bulk [0.01, 2]
    # The first moment against tr(H)/N, within four standard deviations of a Rademacher start.
    h = model.a.double()
    n = len(values)
    off = float((h**2).sum() - (torch.diagonal(h) ** 2).sum())
    assert abs(record["mean_eigenvalue"] - float(values.mean())) <= 4 * math.sqrt(2 * off / n**2 / n_starts)
    assert values[0] <= record["lambda_min_ritz"] and record["lambda_max_ritz"] <= values[-1] + 1e-9
    assert not _artifacts(result, "spectral_density", "image")  # image=False

    # The saved file holds this measurement's nodes and weights (the same as a direct call).
    _save(result, "spectral_density", tmp_path)
    (path,) = list_densities(tmp_path)
    saved = load_density(path)
    direct = spectral_density(obj, max_hvp=160, n_starts=n_starts, seed=2)
    assert saved.step == 7 and saved.lambda_min is None and saved.lambda_max is None
    for a, b in zip(saved.estimate.nodes, direct.nodes):
        np.testing.assert_array_equal(a, b)
    assert saved.estimate.negative_mass == m["negative_mass"]


def test_spectral_density_marks_the_shared_eigenpairs_and_draws_an_image() -> None:
    case, h = _small()
    obj = Objective(case.model, case.loss_fn, case.batches)
    dense = np.linalg.eigvalsh(h.numpy())
    eigen_instrument = Eigenvalues(tol=1e-6, tol_min=1e-5, max_hvp=200, lambda_min_every=1)
    result = run_instruments(obj, [SpectralDensity(max_hvp=60, n_starts=2), eigen_instrument])
    eigen = result.eigen
    record = _record(result, "spectral_density")
    # One Lanczos run (the Eigenvalues instrument's) plus the density's own budget.
    assert result.metrics["hvp_count"] == eigen.n_hvp + record["n_hvp"] + obj.n_hvp_check and record["n_hvp"] == 60
    width = dense[-1] - dense[0]
    # Both marks are bounds from inside the spectrum; the outer one of Lanczos and the Ritz extremes is kept.
    assert record["lambda_max_marked"] == max(eigen.lambda_max, record["lambda_max_ritz"])
    assert record["lambda_min_marked"] == min(eigen.lambda_min, record["lambda_min_ritz"])
    assert abs(record["lambda_max_marked"] - dense[-1]) <= eigen.error_bounds[0] + 1e-5 * width
    assert abs(record["lambda_min_marked"] - dense[0]) <= eigen.error_bound_min + 1e-5 * width
    truth = float(np.mean(dense < 0))
    m = result.metrics
    bracket = (record["negative_mass_upper"] - record["negative_mass_lower"]) / 2
    assert abs(m["negative_mass"] - truth) <= bracket + 4 * m["negative_mass_stderr"]
    (image,) = _artifacts(result, "spectral_density", "image")
    assert image.name == "spectral_density"
    _assert_image(image.data)


def test_spectral_density_summary_continues_from_the_saved_files_after_a_checkpoint(tmp_path: Path) -> None:
    model, _ = _planted()
    obj = Objective(model, quadratic_loss, [None])
    first = SpectralDensity(max_hvp=40, n_starts=2, image=False)
    assert first.summary() is None  # nothing measured yet
    for step in (0, 10):
        _save(run_instruments(obj, [first], step=step), "spectral_density", tmp_path)
    summary = first.summary()
    assert summary is not None
    (image,) = [a for a in summary.artifacts if a.kind == "image"]
    assert image.name == "spectral_density_over_training"
    _assert_image(image.data)

    # The checkpoint holds no spectrum and loads with weights_only=True.
    buffer = io.BytesIO()
    torch.save({"state": first.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["state"]
    resumed = SpectralDensity(max_hvp=40, n_starts=2, image=False)
    resumed.reset()
    resumed.load_state_dict(state)
    _save(run_instruments(obj, [resumed], step=20), "spectral_density", tmp_path)
    # The picture over training re-reads the files written before the resume.
    assert [r.step for r in resumed.measurements()] == [0, 10, 20]
    summary = resumed.summary()
    assert summary is not None
    (save,) = [a for a in summary.artifacts if a.kind == "save"]
    assert save.name == "spectra"
    save.data(tmp_path)
    with Image.open(tmp_path / "density_evolution.png") as im:
        assert im.size[0] >= 600 and im.size[1] >= 300
    resumed.reset()
    assert resumed.measurements() == [] and resumed.summary() is None


# ------------------------------------------------------------------------------------ BlockSpectrum


def test_block_spectrum_metrics_match_the_dense_diagonal_blocks(tmp_path: Path) -> None:
    case, h = _small()
    obj = Objective(case.model, case.loss_fn, case.batches)
    result = run_instruments(obj, [BlockSpectrum(n_trace=60)], seed=1, step=3)
    m = result.metrics
    record = _record(result, "block_spectrum")
    names = ["0", "2", "4"]
    expected_keys = {f"block/{b}/{q}" for b in names for q in ("lambda_max", "trace")}
    assert set(m) - {"hvp_count", "loss_evaluations", "seconds"} == expected_keys
    global_max = float(torch.linalg.eigvalsh(h)[-1])
    rows = {row["name"]: row for row in record["blocks"]}
    for block in parameter_blocks(obj):
        idx = block.index
        sub = h[idx][:, idx]
        exact = float(torch.linalg.eigvalsh(sub)[-1])
        row = rows[block.name]
        assert row["converged"]
        assert abs(m[f"block/{block.name}/lambda_max"] - exact) <= row["error_bound"] + 1e-5 * abs(exact) + 1e-7
        assert m[f"block/{block.name}/lambda_max"] <= global_max * (1 + 1e-5)  # Cauchy interlacing
        dense_trace = float(torch.trace(sub))
        assert abs(m[f"block/{block.name}/trace"] - dense_trace) <= 4 * row["trace_stderr"] + 1e-5 * abs(dense_trace)
    assert sum(m[f"block/{b}/trace"] for b in names) == pytest.approx(record["trace"], rel=1e-9)
    assert m["hvp_count"] - obj.n_hvp_check == record["n_hvp"] == 60 + sum(row["n_hvp"] for row in record["blocks"])
    (image,) = _artifacts(result, "block_spectrum", "image")
    assert image.name == "block_spectrum"
    _assert_image(image.data)
    _save(result, "block_spectrum", tmp_path)
    (path,) = list_blocks(tmp_path)
    assert load_blocks(path)["step"] == 3 and [b["name"] for b in load_blocks(path)["blocks"]] == names


def test_block_budget_rotates_and_warm_starts_survive_a_checkpoint() -> None:
    case, _ = _small()
    obj = Objective(case.model, case.loss_fn, case.batches)
    options: dict[str, Any] = dict(n_trace=4, max_hvp=25, max_hvp_per_block=12, image=False)
    instrument = BlockSpectrum(**options)
    first = run_instruments(obj, [instrument]).metrics
    measured_first = {k.split("/")[1] for k in first if k.endswith("/lambda_max")}
    assert measured_first == {"0", "2"}  # two runs of at most 12 products fit 25
    assert {k for k in first if k.endswith("/trace")} == {"block/0/trace", "block/2/trace", "block/4/trace"}

    buffer = io.BytesIO()
    torch.save({"state": instrument.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["state"]
    assert all(v.device.type == "cpu" for v in state["warm_start"].values() if v is not None)

    resumed = BlockSpectrum(**options)
    resumed.load_state_dict(state)
    again = run_instruments(obj, [resumed])
    original = run_instruments(obj, [instrument])
    # The rotation goes on at block "4" (warm-started blocks spend fewer products, so more of them may fit).
    assert "block/4/lambda_max" in again.metrics
    assert _record(again, "block_spectrum")["next_block"] == _record(original, "block_spectrum")["next_block"]
    assert _record(again, "block_spectrum")["warm_started"]
    for key, value in original.metrics.items():
        if key != "seconds":
            assert again.metrics[key] == value, key  # the same warm starts, the same rotation
    instrument.reset()
    assert instrument.state_dict()["warm_start"] is None


def test_expected_hvps_and_bad_arguments() -> None:
    assert SpectralDensity().expected_hvps() == 160
    assert SpectralDensity(max_hvp=50, n_starts=4).expected_hvps() == 48
    assert BlockSpectrum().expected_hvps() == 30 + 4 * 20  # four blocks guessed before the first run
    assert BlockSpectrum(max_hvp=25).expected_hvps() == 30 + 25
    assert BlockSpectrum(blocks=["0.*", "2.*"], n_trace=0).expected_hvps() == 3 * 20
    case, _ = _small()
    known = BlockSpectrum(image=False, n_trace=2)
    run_instruments(Objective(case.model, case.loss_fn, case.batches), [known])
    assert known.expected_hvps() == 2 + 3 * 20  # the block count is known after a run
    for make, message in [
        (lambda: SpectralDensity(max_hvp=5, n_starts=4), "max_hvp=5 is too small"),
        (lambda: SpectralDensity(distribution="uniform"), "distribution"),
        (lambda: SpectralDensity(image="yes"), "image"),
        (lambda: BlockSpectrum(blocks="0.*"), "blocks must be None"),
        (lambda: BlockSpectrum(blocks={}), "blocks is empty"),
        (lambda: BlockSpectrum(blocks={"a": []}), "non-empty list of globs"),
        (lambda: BlockSpectrum(n_trace=-1), "n_trace"),
        (lambda: BlockSpectrum(tol=0.0), "tol"),
        (lambda: BlockSpectrum(max_hvp_per_block=1), "max_hvp_per_block"),
        (lambda: BlockSpectrum(max_hvp=0), "max_hvp"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()


def test_blocks_without_traces_log_only_lambda_max() -> None:
    case, _ = _small()
    obj = Objective(case.model, case.loss_fn, case.batches)
    result = run_instruments(obj, [BlockSpectrum(blocks={"hidden": "2.*"}, n_trace=0, image=False)])
    keys = set(result.metrics) - {"hvp_count", "loss_evaluations", "seconds"}
    assert keys == {"block/hidden/lambda_max", "block/_rest/lambda_max"}


# ------------------------------------------------------------------------------------ the CLI


def test_render_command_finds_spectra_next_to_landscapes_and_alone(tmp_path: Path, capsys: Any) -> None:
    model, _ = _planted()
    obj = Objective(model, quadratic_loss, [None])
    case, _ = _small()
    run = tmp_path / "run"
    spectra = run / "spectra" / "hessian"
    density = SpectralDensity(max_hvp=40, n_starts=2, image=False)
    for step in (0, 5):
        _save(run_instruments(obj, [density], step=step), "spectral_density", spectra)
    blocks = BlockSpectrum(n_trace=2, image=False)
    block_objective = Objective(case.model, case.loss_fn, case.batches)
    _save(run_instruments(block_objective, [blocks], step=5), "block_spectrum", spectra)
    save_snapshot(run / "landscape" / "hessian", make_snapshot(step=5))

    assert cli_main(["render", str(run), "--out", str(tmp_path / "out")]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    names = [(p.parent.relative_to(tmp_path / "out").as_posix(), p.name) for p in printed]
    assert names == [
        ("hessian", "step_000000005.png"),
        ("hessian", "animation.gif"),
        ("spectra/hessian", "density_000000000.png"),
        ("spectra/hessian", "density_000000005.png"),
        ("spectra/hessian", "density_evolution.png"),
        ("spectra/hessian", "blocks_000000005.png"),
    ]
    assert all(p.is_file() for p in printed)
    # The spectra folder alone (its step_*.npz are densities, not landscape snapshots); PNGs go next to the files.
    for source in (run / "spectra", spectra):
        assert cli_main(["render", str(source)]) == 0
        printed = [Path(line) for line in capsys.readouterr().out.split()]
        assert sorted(p.name for p in printed) == sorted(n for _, n in names[2:])
        assert all(p.parent == spectra for p in printed)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["render", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no landscape snapshots" in err and "no spectra" in err


# ------------------------------------------------------------------------------------ in a Lightning fit


def _dense_probe_hessian(module: nn.Module) -> tuple[Tensor, list[str]]:
    """The dense float64 Hessian of the sample-weighted probe loss at the module's weights, and its parameter names."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    return dense_hessian_at(module, probe_loader()), names


def _tensorboard(log_dir: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_in_a_lightning_fit_spectra_are_logged_saved_rerendered_and_training_is_bit_identical(tmp_path: Path) -> None:
    def fit(callbacks: list[Any], logger: Any = False) -> TanhModule:
        pl.seed_everything(5, verbose=False)
        module = TanhModule()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, logger=logger), callbacks=callbacks)
        trainer.fit(module, train_loader())
        return module

    without = fit([])
    monitor = HessianMonitor(
        instruments=[SpectralDensity(max_hvp=60, n_starts=2), BlockSpectrum()],
        every_n_steps=2,
        budget=None,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
    )
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    module = fit([monitor], logger=tb)
    for key, value in without.state_dict().items():
        assert torch.equal(value, module.state_dict()[key]), f"{key} differs with the monitor"

    expected = [0, 2, 4, 6, 8]
    acc = _tensorboard(tb.log_dir)
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for tag in ("negative_mass", "negative_mass_stderr", "block/net.0/lambda_max", "block/net.4/trace"):
        assert [s for s, _ in series[f"hessian/{tag}"]] == expected, tag
    assert {t for t in series if t.startswith("hessian/block/")} == {
        f"hessian/block/net.{i}/{q}" for i in (0, 2, 4) for q in ("lambda_max", "trace")
    }
    for tag in ("hessian/spectral_density", "hessian/block_spectrum"):
        assert [e.step for e in acc.Images(tag)] == expected, tag
    (over,) = acc.Images("hessian/spectral_density_over_training")
    assert over.step == 8 and over.width >= 600

    # The last measurement (step 8, the final weights) against the dense float64 probe Hessian.
    h, names = _dense_probe_hessian(module)
    dense = np.linalg.eigvalsh(h.numpy())
    last = {tag[len("hessian/") :]: values[-1][1] for tag, values in series.items() if tag.startswith("hessian/")}
    (jsonl,) = list(Path(tb.log_dir).glob("**/*.jsonl"))
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [int(r["step"]) for r in records] == expected
    density, blocks = records[-1]["spectral_density"], records[-1]["block_spectrum"]
    bracket = (density["negative_mass_upper"] - density["negative_mass_lower"]) / 2
    # float32 tensorboard scalars: compare with a float32 rounding allowance
    assert abs(last["negative_mass"] - float(np.mean(dense < 0))) <= bracket + 4 * last["negative_mass_stderr"] + 1e-6
    offsets = np.cumsum([0] + [p.numel() for _, p in module.named_parameters()])
    by_module: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_module.setdefault(name.rpartition(".")[0], []).extend(range(offsets[i], offsets[i + 1]))
    rows = {row["name"]: row for row in blocks["blocks"]}
    for block, idx in by_module.items():
        sub = h[idx][:, idx]
        exact = float(torch.linalg.eigvalsh(sub)[-1])
        row = rows[block]
        assert abs(last[f"block/{block}/lambda_max"] - exact) <= row["error_bound"] + 1e-4 * abs(exact) + 1e-6
        assert abs(last[f"block/{block}/trace"] - float(torch.trace(sub))) <= 4 * row["trace_stderr"] + 1e-5

    # The monitor's state (what a checkpoint holds) loads with weights_only=True and restores the warm starts.
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    fresh = HessianMonitor(instruments=[SpectralDensity(), BlockSpectrum()], loss_fn=probe_loss)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    warm = fresh.instruments[1].state_dict()["warm_start"]
    assert set(warm) == {"net.0", "net.2", "net.4"} and all(isinstance(v, Tensor) for v in warm.values())

    # Files: one density and one block spectrum per measurement, the picture over training; they re-render.
    spectra = Path(tb.log_dir) / "spectra" / "hessian"
    assert [load_density(p).step for p in list_densities(spectra)] == expected
    assert [load_blocks(p)["step"] for p in list_blocks(spectra)] == expected
    assert (spectra / "density_evolution.png").is_file()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "rendered"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_hessian", "render", tb.log_dir, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = sorted(Path(line).name for line in proc.stdout.split())
    assert printed == sorted(
        [f"density_{s:09d}.png" for s in expected]
        + [f"blocks_{s:09d}.png" for s in expected]
        + ["density_evolution.png"]
    )
    assert all((out / "spectra" / "hessian" / name).is_file() for name in printed)
