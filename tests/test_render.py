"""Rendering of landscape snapshots: figures, one honest colour scale, GIFs, whole runs and the CLI.

Synthetic snapshots from closed forms: the Hessian plane is the saddle ``0.5 (3 a^2 - b^2) + 1``
(lambda_max = 3, lambda_min = -1 along the axes), the random plane a bowl; each has one NaN and
one +inf cell. ``matplotlib.pyplot`` is imported here only to check that rendering leaves no
figure in pyplot's global state.
"""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import LogNorm
from matplotlib.contour import QuadContourSet
from matplotlib.figure import Figure
from PIL import Image

from lightning_hessian import render
from lightning_hessian.landscape import Line, Surface, centred_coordinates
from lightning_hessian.snapshots import Snapshot, save_snapshot

REPO = Path(__file__).resolve().parents[1]
NAN_CELL = (2, 3)  # (row = beta index, col = alpha index)
INF_CELL = (8, 7)


@dataclass
class CliRuns:
    tmp_path: Path
    empty_dir: Path
    ok: subprocess.Popen[str]
    empty: subprocess.Popen[str]


def saddle(scale: float = 1.0, n: int = 11, val: bool = False) -> Surface:
    a, b = centred_coordinates(1.0, n), centred_coordinates(1.0, n)
    aa, bb = np.meshgrid(a, b)
    losses = scale * 0.5 * (3 * aa**2 - bb**2) + 1.0
    losses[NAN_CELL] = np.nan
    losses[INF_CELL] = np.inf
    return Surface(
        alphas=a,
        betas=b,
        losses=losses,
        val_losses=losses + 0.25 if val else None,
        kind="hessian",
        center_loss=1.0,
        d1_norm=1.0,
        d2_norm=1.0,
        labels=("v_max", "v_min"),
        eigenvalues=(3.21 * scale, -0.42 * scale),
    )


def bowl(scale: float = 1.0, n: int = 11, val: bool = False) -> Surface:
    a = centred_coordinates(1.0, n)
    aa, bb = np.meshgrid(a, a)
    losses = scale * (aa**2 + 0.5 * bb**2) + 1.0
    losses[NAN_CELL] = np.nan
    losses[INF_CELL] = np.inf
    return Surface(
        alphas=a,
        betas=a,
        losses=losses,
        val_losses=losses + 0.25 if val else None,
        kind="random",
        center_loss=1.0,
        d1_norm=12.5,
        d2_norm=11.0,
        labels=("d1 (filter)", "d2 (filter)"),
    )


def make_snapshot(step: int = 10, scale: float = 1.0, val: bool = False) -> Snapshot:
    t = centred_coordinates(1.0, 21)
    lines = {
        "v_max": Line(t, 1.0 + 1.5 * scale * t**2, 1.25 + 1.5 * scale * t**2 if val else None, "v_max", 1.0),
        "v_min": Line(t, 1.0 - 0.5 * scale * t**2, None, "v_min", 1.0),
    }
    return Snapshot(
        step=step,
        epoch=step // 10,
        planes={"random": bowl(scale, val=val), "hessian": saddle(scale, val=val)},
        lines=lines,
        scalars={"lambda_max": 3.21 * scale},
    )


def filled_contours(fig: Figure) -> list[QuadContourSet]:
    return [c for ax in fig.axes for c in ax.collections if isinstance(c, QuadContourSet) and c.filled]


def test_snapshot_figure_layout_labels_and_markers() -> None:
    fig = render.snapshot_figure(make_snapshot())
    # random plane, Hessian plane, a colour bar each (one scale per plane by default), two 1-D cuts
    assert len(fig.axes) == 6
    random_ax, hessian_ax = fig.axes[0], fig.axes[1]
    assert "3.21" in hessian_ax.get_xlabel() and "v_max" in hessian_ax.get_xlabel()
    assert "0.42" in hessian_ax.get_ylabel() and "v_min" in hessian_ax.get_ylabel()
    assert "\N{MINUS SIGN}0.42" in hessian_ax.get_ylabel()  # the sign of lambda_min is shown
    assert "d1" in random_ax.get_xlabel() and "12.5" in random_ax.get_xlabel()
    assert random_ax.get_title().startswith("random plane") and hessian_ax.get_title().startswith("Hessian plane")
    for ax in (random_ax, hessian_ax):
        assert ax.get_box_aspect() == 1.0  # a square panel whatever the plane's extents
        assert "2 masked" in ax.get_title()
        markers = {line.get_marker(): np.asarray(line.get_xydata()).tolist() for line in ax.lines}
        assert markers["P"] == [[0.0, 0.0]]  # the current weights
    # the saddle's lowest finite grid point is a corner at beta = +-1, alpha = 0
    star = np.asarray(next(line for line in hessian_ax.lines if line.get_marker() == "*").get_xydata())
    assert star[0, 0] == 0.0 and abs(star[0, 1]) == 1.0
    assert "v_max" in fig.axes[4].get_title() and "3.21" in fig.axes[4].get_title()
    assert "v_min" in fig.axes[5].get_title()
    assert "step 10" in fig.get_suptitle()

    with_val = render.snapshot_figure(make_snapshot(val=True), show_val=True)
    assert len(with_val.axes) == 8  # two rows of planes, a colour bar per plane, two cuts
    assert "validation" in with_val.axes[2].get_title()


def test_non_finite_cells_are_masked_not_interpolated() -> None:
    fig = render.snapshot_figure(make_snapshot(), levels=12)
    rgb = render.figure_to_rgb(fig)
    height = rgb.shape[0]
    bad = np.array([int(render.BAD_COLOR[i : i + 2], 16) for i in (1, 3, 5)])
    surface = bowl()
    ax = fig.axes[0]
    # half a cell beside the NaN grid point: inside the unfilled hole, away from the 'x' marker
    i, j = NAN_CELL
    step = surface.alphas[1] - surface.alphas[0]
    x, y = ax.transData.transform((surface.alphas[j] + 0.5 * step, surface.betas[i]))
    assert np.abs(rgb[height - round(y), round(x)].astype(int) - bad).max() <= 3
    # and a finite cell far from both is coloured by the colour map, not grey
    x, y = ax.transData.transform((0.5 * step, 0.5 * step))
    assert np.abs(rgb[height - round(y), round(x)].astype(int) - bad).max() > 20


def test_figure_to_rgb_shape_and_dtype() -> None:
    fig = render.snapshot_figure(make_snapshot(), dpi=60)
    rgb = render.figure_to_rgb(fig)
    width, height = fig.canvas.get_width_height()
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    assert rgb.flags["C_CONTIGUOUS"] and 0 < rgb.mean() < 255


def test_color_limits_span_frames_and_ignore_non_finite() -> None:
    one, two = bowl(1.0), bowl(3.0)
    exact = (0.0, 100.0)
    finite = np.concatenate([s.losses[np.isfinite(s.losses)] for s in (one, two)])
    low, high = render.color_limits([one, two], percentiles=exact)
    assert (low, high) == (finite.min(), finite.max())
    assert high == 3 * 1.5 + 1.0 and low == 1.0  # the frame with the larger range sets the top
    assert render.color_limits([one], percentiles=exact) != (low, high)

    # log scale: log10 of the loss itself over the positive finite values (non-positive ones left out)
    s = saddle(1.0)
    positive = s.losses[np.isfinite(s.losses) & (s.losses > 0)]
    assert render.color_limits([s], log_scale=True, percentiles=exact) == pytest.approx(
        (math.log10(positive.min()), math.log10(positive.max()))
    )
    assert render.color_limits([one, two], log_scale=True, percentiles=exact) == pytest.approx((0.0, math.log10(5.5)))
    # clip caps the top (in loss units on both scales) and never raises the bottom
    assert render.color_limits([one, two], clip=2.0, percentiles=exact) == (1.0, 2.0)
    assert render.color_limits([one, two], log_scale=True, clip=2.0, percentiles=exact) == pytest.approx(
        (0.0, math.log10(2.0))
    )
    with pytest.raises(ValueError, match="clip"):
        render.color_limits([one], clip=0.5)
    nothing = Surface(
        one.alphas, one.betas, np.full_like(one.losses, np.nan), None, "random", math.nan, 1, 1, ("a", "b")
    )
    with pytest.raises(ValueError, match="no finite"):
        render.color_limits([nothing])


def test_shared_limits_give_identical_colour_scales() -> None:
    first, second = make_snapshot(10, scale=1.0), make_snapshot(20, scale=3.0)
    for log_scale in (False, True):
        limits = render.color_limits([*first.planes.values(), *second.planes.values()], log_scale=log_scale)
        figs = [render.snapshot_figure(s, limits=limits, log_scale=log_scale) for s in (first, second)]
        sets = [filled_contours(f) for f in figs]
        assert all(len(s) == 2 for s in sets)
        scales = {(c.norm.vmin, c.norm.vmax, type(c.norm)) for s in sets for c in s}
        assert len(scales) == 1  # every plane of both frames: one norm
        vmin, vmax, norm_type = scales.pop()
        assert (norm_type is LogNorm) == log_scale
        lo, hi = np.asarray([vmin, vmax], dtype=float)
        if log_scale:
            lo, hi = np.log10(lo), np.log10(hi)
        assert lo <= limits[0] + 1e-12 and hi >= limits[1] - 1e-12  # only ever rounded outwards
        levels = [tuple(c.levels) for s in sets for c in s]
        assert len(set(levels)) == 1  # the same contour levels too
        colorbars = [c.colorbar for s in sets for c in s[-1:]]
        assert all(cb is not None and cb.ax in f.axes for cb, f in zip(colorbars, figs))
        assert {(cb.norm.vmin, cb.norm.vmax) for cb in colorbars if cb is not None} == {(vmin, vmax)}
    # without shared limits each frame scales itself: the scales differ
    own = [filled_contours(render.snapshot_figure(s))[0].norm.vmax for s in (first, second)]
    assert own[0] != own[1]


def test_write_gif_round_trip(tmp_path: Path) -> None:
    frames = [np.full((24, 32, 3), value, dtype=np.uint8) for value in (0, 120, 250)]
    frames[1][:, :8] = (255, 0, 0)
    path = render.write_gif(frames, tmp_path / "anim.gif", fps=4.0)
    assert path == tmp_path / "anim.gif" and not list(tmp_path.glob("*.tmp"))
    with Image.open(path) as im:
        assert im.format == "GIF" and getattr(im, "is_animated", False) and getattr(im, "n_frames", 1) == 3
        assert im.size == (32, 24)
        assert im.info.get("loop") == 0 and im.info.get("duration") == 250
        im.seek(1)
        assert im.convert("RGB").getpixel((2, 2)) == (255, 0, 0)
    assert render.gif_bytes(frames, 2.0)[:6] == b"GIF89a"
    with pytest.raises(ValueError, match="same size"):
        render.gif_bytes([frames[0], np.zeros((10, 10, 3), np.uint8)])
    with pytest.raises(ValueError):
        render.gif_bytes([])


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_render_run_writes_frames_and_animation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    snap_dir = run / "landscape" / "train"
    for i, scale in enumerate((0.5, 1.0, 2.0)):
        save_snapshot(snap_dir, make_snapshot(step=10 * i, scale=scale))

    written = render.render_run(snap_dir)  # default: next to the snapshots
    pngs = [p for p in written if p.suffix == ".png"]
    assert [p.name for p in pngs] == ["step_000000000.png", "step_000000010.png", "step_000000020.png"]
    assert written[-1] == snap_dir / "animation.gif" and all(p.parent == snap_dir for p in written)
    shapes = {_pixels(p).shape for p in pngs}
    assert len(shapes) == 1
    height, width, _ = shapes.pop()
    with Image.open(written[-1]) as im:
        assert getattr(im, "n_frames", 1) == 3 and getattr(im, "is_animated", False) and im.size == (width, height)

    # a run directory: each landscape/<prefix>/ is rendered, into out/<prefix>/
    log = render.render_run(run, out=tmp_path / "log", log_scale=True)
    assert [p.parent for p in log] == [tmp_path / "log" / "train"] * 4 and log[-1].name == "animation.gif"
    assert not np.array_equal(_pixels(pngs[1]), _pixels(log[1]))  # the log scale draws another picture

    with pytest.raises(render.NoSnapshotsError):
        render.render_run(tmp_path / "nothing-here")


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliRuns]:
    """Start the two CLI runs (a real run dir, an empty dir) when the module starts, in the background.

    Each ``python -m lightning_hessian`` process spends seconds importing the package, so they run
    concurrently with the in-process tests; ``test_cli_*`` collects them.
    """
    tmp_path = tmp_path_factory.mktemp("cli")
    run = tmp_path / "run"
    for i in range(2):
        save_snapshot(run / "landscape" / "train", make_snapshot(step=i, scale=1.0 + i))
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lightning_hessian", "render"]
    ok_args = [str(run), "--out", str(tmp_path / "out"), "--log-scale", "--levels", "8"]
    procs = [
        subprocess.Popen([*cmd, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in (ok_args, [str(empty)])
    ]
    try:
        yield CliRuns(tmp_path, empty, procs[0], procs[1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_cli_render_and_no_snapshots(cli_runs: CliRuns) -> None:
    out_ok, err_ok = cli_runs.ok.communicate(timeout=120)
    assert cli_runs.ok.returncode == 0, err_ok
    printed = [Path(line) for line in out_ok.split()]
    assert [p.name for p in printed] == ["step_000000000.png", "step_000000001.png", "animation.gif"]
    assert all(p.is_file() and p.parent == cli_runs.tmp_path / "out" / "train" for p in printed)

    out_empty, err_empty = cli_runs.empty.communicate(timeout=120)
    assert cli_runs.empty.returncode == 2
    assert "no landscape snapshots" in err_empty and str(cli_runs.empty_dir) in err_empty and out_empty == ""


def test_no_pyplot_anywhere() -> None:
    import matplotlib.pyplot as plt

    render.figure_to_rgb(render.snapshot_figure(make_snapshot()))
    assert plt.get_fignums() == []
    for module in ("render.py", "__main__.py"):
        tree = ast.parse((REPO / "lightning_hessian" / module).read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
        assert not [name for name in imported if "pyplot" in name], module


# --------------------------------------------------------------------------------------------
# the colour scale chosen from the data, fixed geometry, legends for what is shown


def plane(losses: np.ndarray, kind: str = "random", span: float = 1.0) -> Surface:
    """A plane with the given loss grid on ``[-span, span]^2``."""
    n = losses.shape[0]
    a = centred_coordinates(span, n)
    eig = (2.0, -0.5) if kind == "hessian" else None
    mid = n // 2
    return Surface(a, a, losses, None, kind, float(losses[mid, mid]), 1.0, 1.0, ("d1", "d2"), eigenvalues=eig)


def decades(low: float, high: float, n: int = 11) -> np.ndarray:
    """A bowl whose losses run log-uniformly from 10**low at the centre to 10**high at the corners."""
    a = centred_coordinates(1.0, n)
    r = np.hypot(*np.meshgrid(a, a)) / math.sqrt(2.0)
    return np.asarray(10.0 ** (low + (high - low) * r), dtype=np.float64)


def test_auto_log_scale_is_chosen_from_the_decades_the_losses_span() -> None:
    wide, narrow = plane(decades(-2.5, 0.5)), plane(decades(0.0, 1.0), kind="hessian")
    snap = Snapshot(step=1, epoch=0, planes={"random": wide, "hessian": narrow})
    scales = render.choose_scales([snap])  # log_scale="auto", one scale per plane
    assert scales.planes["random"].log and not scales.planes["hessian"].log  # 3 decades vs 1
    assert render.AUTO_LOG_DECADES == 1.5
    fig = render.snapshot_figure(snap)
    norms = [type(c.norm) for c in filled_contours(fig)]
    assert norms[0] is LogNorm and norms[1] is not LogNorm
    # forced either way
    assert all(p.log for p in render.choose_scales([snap], log_scale=True).planes.values())
    assert not any(p.log for p in render.choose_scales([snap], log_scale=False).planes.values())
    # one shared scale: one decision for both planes, from the pooled losses
    shared = render.choose_scales([snap], shared=True).planes
    assert shared["random"] == render.PlaneScale(shared["hessian"].low, shared["hessian"].high, True, (1.0, 1.0))
    # a non-positive loss has no logarithm: "auto" stays linear rather than mask it
    with_zero = decades(-2.5, 0.5)
    with_zero[0, 0] = 0.0
    assert not render.choose_scales([Snapshot(1, 0, {"random": plane(with_zero)})]).planes["random"].log
    with pytest.raises(ValueError, match="log_scale"):
        render.choose_scales([snap], log_scale="yes")  # type: ignore[arg-type]


def test_colour_limits_are_percentiles_not_the_blown_up_corner() -> None:
    losses = decades(0.0, 0.3, n=21)  # 1 ... 2
    losses[0, :3] = 1e4  # a diverged corner: 3 of 441 points
    surface = plane(losses)
    low, high = render.color_limits([surface])
    assert low == pytest.approx(np.percentile(losses, 1.0)) and high == pytest.approx(np.percentile(losses, 98.0))
    assert high < 2.0 + 1e-9
    assert render.color_limits([surface], percentiles=(0.0, 100.0))[1] == 1e4
    # the corner is drawn in the top colour, the colour bar says so with an arrow, and no log scale is
    # chosen just because of it
    scale = render.choose_scales([Snapshot(1, 0, {"random": surface})]).planes["random"]
    assert not scale.log
    (filled,) = filled_contours(render.snapshot_figure(Snapshot(1, 0, {"random": surface})))
    assert filled.extend in ("max", "both") and filled.norm.vmax < 3.0
    with pytest.raises(ValueError, match="percentiles"):
        render.color_limits([surface], percentiles=(50.0, 10.0))


def test_one_scale_per_plane_by_default_one_shared_on_request() -> None:
    steep, flat = plane(decades(0.0, 2.0)), plane(1.0 + 0.01 * decades(0.0, 1.0), kind="hessian")
    snap = Snapshot(step=3, epoch=0, planes={"random": steep, "hessian": flat})
    own = filled_contours(render.snapshot_figure(snap))
    assert own[1].norm.vmax < 1.2  # the flat plane gets its own range instead of a single colour
    assert len({(c.norm.vmin, c.norm.vmax) for c in own}) == 2
    assert len([ax for ax in render.snapshot_figure(snap).axes if ax.get_label() == "<colorbar>"]) == 2
    shared_fig = render.snapshot_figure(snap, shared_scale=True)
    shared = filled_contours(shared_fig)
    assert len({(c.norm.vmin, c.norm.vmax, type(c.norm)) for c in shared}) == 1
    assert len([ax for ax in shared_fig.axes if ax.get_label() == "<colorbar>"]) == 1


def _hessian_frame(step: int, span: float, scale: float) -> Snapshot:
    n = 11
    a = centred_coordinates(span, n)
    aa, bb = np.meshgrid(a, 0.5 * a)
    hess = Surface(
        a, 0.5 * a, 1.0 + scale * (aa**2 - 0.3 * bb**2) + 0.2, None, "hessian", 1.2, 1.0, 1.0, ("v_max", "v_min"),
        eigenvalues=(2.0 * scale, -0.6 * scale),
    )  # fmt: skip
    t = centred_coordinates(span, 21)
    return Snapshot(step, 0, {"random": bowl(scale), "hessian": hess}, {"v_max": Line(t, 1 + t**2, None, "v", 1.0)})


def test_animation_frames_keep_each_planes_extent_and_colour_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = [_hessian_frame(0, span=0.2, scale=1.0), _hessian_frame(10, span=1.5, scale=3.0)]
    scales = render.choose_scales(frames)
    assert scales.planes["hessian"].extent == (1.5, 0.75)  # the widest frame, per axis
    assert scales.planes["random"].extent == (1.0, 1.0)
    assert scales.line_extents == {"v_max": 1.5}
    figs = [render.snapshot_figure(f, scales=scales, figsize=render.figure_size(f)) for f in frames]
    for i in range(2):  # the same axes limits and the same colours in both frames, plane by plane
        assert figs[0].axes[i].get_xlim() == figs[1].axes[i].get_xlim()
        assert figs[0].axes[i].get_ylim() == figs[1].axes[i].get_ylim()
        norms = [filled_contours(f)[i].norm for f in figs]
        assert (norms[0].vmin, norms[0].vmax) == (norms[1].vmin, norms[1].vmax)
    assert figs[0].axes[1].get_xlim() == pytest.approx((-1.5, 1.5))
    assert figs[0].axes[4].get_xlim() == figs[1].axes[4].get_xlim()  # the 1-D cut too

    # render_run chooses them once over all frames and passes the same to every frame
    seen: list[render.Scales | None] = []
    original = render.snapshot_figure

    def spy(snapshot: Snapshot, *args: object, **kwargs: object) -> Figure:
        seen.append(kwargs.get("scales"))  # type: ignore[arg-type]
        return original(snapshot, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(render, "snapshot_figure", spy)
    for frame in frames:
        save_snapshot(tmp_path, frame)
    render.render_run(tmp_path)
    assert len(seen) == 2 and seen[0] is seen[1] and seen[0] is not None
    assert seen[0].planes["hessian"].extent == (1.5, 0.75)
    # without scales a single picture uses its own grid's extent
    alone = render.snapshot_figure(frames[0])
    assert alone.axes[1].get_xlim() == pytest.approx((-0.2, 0.2))


def _legend_texts(fig: Figure) -> list[str]:
    """The texts of the figure's legends (the planes' legend sits on a sub-figure when cuts are drawn)."""
    sections = [fig, *fig.subfigs]
    return [t.get_text() for part in sections for leg in part.legends for t in leg.get_texts()]


def test_legend_lists_only_what_the_picture_shows() -> None:
    clean = Snapshot(1, 0, {"random": plane(decades(0.0, 1.0))})
    assert _legend_texts(render.snapshot_figure(clean)) == ["weights", "grid min"]
    holes = _legend_texts(render.snapshot_figure(make_snapshot()))
    assert holes == ["weights", "grid min", "masked (NaN or inf)", "no data"]
    negative = decades(0.0, 1.0)
    negative[0, 0] = -1.0
    texts = _legend_texts(render.snapshot_figure(Snapshot(1, 0, {"random": plane(negative)}), log_scale=True))
    assert "masked (NaN, inf or ≤ 0)" in texts


def test_single_plane_image_fills_its_canvas() -> None:
    snap = make_snapshot()
    alone = Snapshot(snap.step, snap.epoch, {"hessian": snap.planes["hessian"]})
    fig = render.snapshot_figure(alone)
    width, height = fig.get_size_inches()
    assert width < 6.0 and 0.8 < height / width < 1.3  # about one square panel, not a wide empty canvas
    render.figure_to_rgb(fig)  # lay it out
    box = fig.axes[0].get_position()
    assert box.width > 0.55 and box.height > 0.5


def test_capped_span_is_named_on_the_axis() -> None:
    snap = make_snapshot()
    capped = replace(snap.planes["hessian"], meta={"span_capped": [False, True]})
    fig = render.snapshot_figure(Snapshot(1, 0, {"hessian": capped}))
    assert "capped" in fig.axes[0].get_ylabel() and "capped" not in fig.axes[0].get_xlabel()


def test_cli_colour_scale_options_parse() -> None:
    from lightning_hessian.__main__ import build_parser

    parse = build_parser().parse_args
    default = parse(["render", "run"])
    assert default.log_scale == "auto" and not default.shared_scale and tuple(default.percentiles) == (1.0, 98.0)
    assert parse(["render", "run", "--log-scale"]).log_scale is True
    assert parse(["render", "run", "--linear"]).log_scale is False
    options = parse(["render", "run", "--shared-scale", "--percentiles", "0", "100"])
    assert options.shared_scale and tuple(options.percentiles) == (0.0, 100.0)
    for bad in (["--log-scale", "--linear"], ["--percentiles", "5", "101"]):
        with pytest.raises(SystemExit):
            parse(["render", "run", *bad])


def test_a_frame_far_wider_than_the_others_is_cropped_not_the_others_shrunk() -> None:
    """A frame at initialisation can have a Hessian plane 25 times wider than later ones."""
    frames = [_hessian_frame(0, span=2.5, scale=30.0)] + [_hessian_frame(s, span=0.1, scale=1.0) for s in (1, 2, 3)]
    frames[2] = _hessian_frame(2, span=0.12, scale=1.0)
    scales = render.choose_scales(frames)
    assert scales.planes["hessian"].extent == pytest.approx((0.12, 0.06))  # the widest of the others
    assert render.EXTENT_SPREAD == 2.0
    assert scales.line_extents["v_max"] == pytest.approx(0.12)
    # the outlier's losses (up to 30 x 2.5^2) do not set the colour scale or the cuts' axes
    assert scales.planes["hessian"].high < 1.3 and scales.line_limits is not None and scales.line_limits[1] < 1.1
    outlier = render.snapshot_figure(frames[0], scales=scales)
    assert "cropped" in outlier.axes[1].get_title() and "cropped" in outlier.axes[4].get_title()
    assert outlier.axes[1].get_xlim() == pytest.approx((-0.12, 0.12))
    regular = render.snapshot_figure(frames[1], scales=scales)
    assert "cropped" not in regular.axes[1].get_title() and "cropped" not in regular.axes[4].get_title()
