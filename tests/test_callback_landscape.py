"""Landscape snapshots through the callback: files, images, animation, scalars, guarantees, resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_hessian import HessianMonitor, Objective
from lightning_hessian.instruments import Landscape
from lightning_hessian.render import render_run
from lightning_hessian.snapshots import list_snapshots, load_snapshot
from lightning_models import BNDropoutModule, TanhModule, probe_loader, probe_loss, train_loader, trainer_kwargs
from logreader_utils import csv_series, tensorboard_accumulator, wandb_offline_run


def _monitor(instruments: list[Any] | None = None, **landscape: Any) -> HessianMonitor:
    """A monitor with one Landscape instrument (every 4 steps, 5x5 grids unless overridden)."""
    options: dict[str, Any] = dict(every_n_steps=4, resolution=5)
    options.update(landscape)
    return HessianMonitor(
        instruments=[Landscape(**options), *(instruments or [])],
        every_n_epochs=None,
        budget=None,
        at_fit_start=False,
        at_fit_end=False,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
    )


def test_snapshots_reach_files_tensorboard_and_wandb_at_the_expected_steps(tmp_path: Path, wandb_offline: Any) -> None:
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    wb = WandbLogger(offline=True, save_dir=str(tmp_path), project="lh-test")
    csv = CSVLogger(tmp_path, name="csv", version=0)
    monitor = _monitor(val_dataloader=probe_loader(n=64))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=12, logger=[tb, wb, csv]), callbacks=[monitor])
    module = TanhModule()
    trainer.fit(module, train_loader())
    expected = [4, 8, 12]

    # Plain data files, one per snapshot, in the first logger's directory; they round-trip.
    files = list_snapshots(Path(tb.log_dir) / "landscape" / "hessian")
    assert [load_snapshot(f).step for f in files] == expected
    last = load_snapshot(files[-1])
    assert set(last.planes) == {"random", "hessian"} and set(last.lines) == {"v_max", "v_min"}
    assert last.planes["hessian"].val_losses is not None
    # The centre of every plane is the objective at the final weights.
    loss = Objective(module, probe_loss, list(probe_loader())).loss()
    for surface in last.planes.values():
        assert surface.losses[2, 2] == pytest.approx(loss, rel=1e-6)

    # TensorBoard: the images at the snapshot steps, the animated GIF at the end.
    acc = tensorboard_accumulator(tb.log_dir)
    for tag in ("landscape/random", "landscape/hessian", "landscape/planes"):
        assert [e.step for e in acc.Images(tag)] == expected
    (animation,) = acc.Images("landscape/animation")
    assert animation.step == 12 and animation.encoded_image_string[:6] == b"GIF89a"
    assert [s.step for s in acc.Scalars("landscape/hessian_shows_saddle")] == expected

    # CSV gets the scalars (no images).
    assert [s for s, _ in csv_series(Path(csv.log_dir) / "metrics.csv", "landscape/center_loss")] == expected

    # W&B: image files and the GIF in the offline run's media folder.
    wandb_offline.finish()
    media = wandb_offline_run(tmp_path) / "files" / "media"
    images = sorted(p.name for p in (media / "images").rglob("*.png"))
    assert len(images) == 3 * len(expected)
    assert any(p.suffix == ".gif" for p in (media / "videos").rglob("*"))


def test_render_command_reproduces_the_frames_from_the_files(tmp_path: Path) -> None:
    monitor = _monitor(animation="never")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=8, logger=CSVLogger(tmp_path, version=0)), callbacks=[monitor]
    )
    trainer.fit(TanhModule(), train_loader())
    directory = Path(trainer.loggers[0].log_dir) / "landscape" / "hessian"
    assert not (directory / "animation.gif").exists()
    written = render_run(directory, log_scale=True)
    assert sorted(p.name for p in written) == ["animation.gif", "step_000000004.png", "step_000000008.png"]


def test_landscapes_leave_training_bit_identical(tmp_path: Path) -> None:
    def run(callbacks: list[Any]) -> dict[str, torch.Tensor]:
        pl.seed_everything(5, verbose=False)
        module = BNDropoutModule()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=callbacks)
        trainer.fit(module, train_loader())
        return copy.deepcopy(module.state_dict())

    plain = run([])
    monitor = _monitor(every_n_steps=3)
    watched = run([monitor])
    assert monitor.last_snapshot is not None
    for key, value in plain.items():
        assert torch.equal(value, watched[key]), key


def test_a_hessian_plane_shows_the_saddle_a_random_plane_hides(tmp_path: Path) -> None:
    """At initialisation the tanh net sits near a saddle: the indicators of the two planes disagree."""
    monitor = _monitor(every_n_steps=None, every_n_epochs=1, resolution=7)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[monitor])
    trainer.fit(TanhModule(), train_loader())
    snap = monitor.last_snapshot
    assert snap is not None
    assert snap.scalars["hessian_shows_saddle"] == 1.0
    assert snap.scalars["hessian_curvature_min"] < 0 < snap.scalars["hessian_curvature_max"]
    assert snap.scalars["hessian_curvature_min"] == pytest.approx(snap.planes["hessian"].eigenvalues[1], rel=1e-3)
    assert snap.planes["hessian"].losses.shape == (7, 7)


def test_resume_continues_the_frame_sequence(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True)
    first = _monitor()
    kwargs = trainer_kwargs(tmp_path, max_steps=8, enable_checkpointing=True)
    pl.Trainer(**kwargs, callbacks=[first, ckpt]).fit(TanhModule(), train_loader())
    assert [s for s in first.history] == [] and first.last_snapshot is not None
    random_plane = first.instruments[0].state.random_plane

    second = _monitor()
    resumed = trainer_kwargs(tmp_path, max_steps=16, max_epochs=10, enable_checkpointing=True)
    pl.Trainer(**resumed, callbacks=[second, ModelCheckpoint(dirpath=tmp_path / "ckpt2")]).fit(
        TanhModule(), train_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    directory = Path(tmp_path) / "landscape" / "hessian"
    assert [load_snapshot(f).step for f in list_snapshots(directory)] == [4, 8, 12, 16]
    # The same random plane before and after the resume (it was saved, not redrawn at new weights).
    assert second.instruments[0].state.random_plane is not None and random_plane is not None
    assert torch.equal(second.instruments[0].state.random_plane[0], random_plane[0])
    frames = render_run(directory)
    assert len([p for p in frames if p.suffix == ".png"]) == 4
    assert np.isfinite(load_snapshot(list_snapshots(directory)[-1]).planes["random"].losses).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"resolution": 20}, "resolution must be an odd integer"),
        ({"planes": ["random", "pca"]}, "planes has unknown entries"),
        ({"planes": "hessian"}, "planes must be a non-empty list"),
        ({"span": -1.0}, "span must be a finite positive number"),
        ({"animation": "mp4"}, "animation must be one of 'end', 'always', 'never'"),
    ],
)
def test_bad_landscape_arguments_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Landscape(**kwargs)


def test_random_plane_options_reach_the_snapshot(tmp_path: Path) -> None:
    """Layer normalisation and orthogonalisation, set on the callback, shape the plane that is drawn."""
    monitor = _monitor(
        every_n_steps=None, every_n_epochs=1, planes=["random"], normalization="layer", orthogonalize=True
    )
    module = TanhModule()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[monitor]).fit(module, train_loader())
    plane = monitor.instruments[0].state.random_plane
    assert plane is not None and monitor.last_snapshot is not None
    d1, d2 = plane
    assert abs(float(d1 @ d2)) <= 1e-4 * float(d1.norm() * d2.norm())  # orthogonal
    objective = Objective(module, probe_loss, list(probe_loader()))
    weights = [p for p in objective.split(objective.parameters()) if p.dim() > 1]
    pieces = [p for p in objective.split(d1) if p.dim() > 1]
    for w, piece in zip(weights, pieces):  # layer-normalised: each weight tensor's direction has its norm
        assert float(piece.norm()) == pytest.approx(float(w.norm()), rel=1e-4)
    assert monitor.last_snapshot.meta["normalization"] == "layer"
    assert set(monitor.last_snapshot.planes) == {"random"}


def test_a_snapshot_reports_its_progress_point_by_point() -> None:
    """Long snapshots show a progress bar: every grid and cut point is reported, and the total is announced."""
    import contextlib
    from collections.abc import Iterator

    from lightning_hessian.instruments import StepContext, run_instruments

    bars: list[tuple[str, int, list[int]]] = []

    @contextlib.contextmanager
    def recorder(what: str, total: int) -> Iterator[Any]:
        updates: list[int] = []
        bars.append((what, total, updates))
        yield updates.append

    objective = Objective(TanhModule(), probe_loss, list(probe_loader()))
    ctx = StepContext(objective, step=7)
    ctx.progress_factory = recorder
    run_instruments(objective, [Landscape(resolution=5)], context=ctx)
    ((what, total, updates),) = bars
    assert what == "landscape at step 7"
    assert total == 2 * 5 * 5 + 2 * 41 == sum(updates) == objective.n_loss - 1  # one centre loss besides the grid
