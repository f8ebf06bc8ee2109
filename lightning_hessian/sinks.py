"""Where measurements go: scalars to every Lightning logger, a TensorBoard chart layout, files in the run dir.

Loggers are recognised by class name, so the same code serves ``pytorch_lightning`` and
``lightning.pytorch``. Only rank zero calls these functions.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_hessian._files import atomic_write, json_safe


class LoggerError(RuntimeError):
    """One or more loggers raised; the others (and the run's data files) still got the values."""


def log_scalars(loggers: Iterable[Any], metrics: dict[str, float], step: int) -> None:
    """Send finite and non-finite scalars alike to every logger at ``step`` (``trainer.global_step``).

    A logger that raises does not keep the others from their values; the failures are raised
    together afterwards as one :class:`LoggerError`.
    """
    clean = {k: float(v) for k, v in metrics.items()}
    failures = []
    for logger in loggers:
        try:
            logger.log_metrics(clean, step=step)
        except Exception as err:
            failures.append(f"{type(logger).__name__}: {type(err).__name__}: {err}")
    if failures:
        raise LoggerError("; ".join(failures))


def is_tensorboard(logger: Any) -> bool:
    return type(logger).__name__ == "TensorBoardLogger" and hasattr(logger.experiment, "add_custom_scalars")


def _exact(prefix: str, names: Sequence[str]) -> list[str]:
    q = re.escape(prefix)
    return [f"^{q}/{name}$" for name in names]


@dataclass(frozen=True)
class ChartSet:
    """What one monitor logs: its prefix, its instruments' names, and whether a budget can postpone."""

    prefix: str
    instruments: frozenset[str]
    budgeted: bool = True
    landscape_prefix: str | None = None


def _charts_of(p: str, has: Callable[[str], bool], budgeted: bool) -> dict[str, list[Any]]:
    q = re.escape(p)
    charts: dict[str, list[Any]] = {}
    if has("eigenvalues"):
        charts[f"{p}: extremal eigenvalues"] = [
            "Multiline",
            [*_exact(p, ["lambda_max", "lambda_min"]), f"^{q}/lambda_[0-9]+$"],
        ]
        charts[f"{p}: negative ratio |lambda_min| / lambda_max"] = ["Multiline", _exact(p, ["negative_ratio"])]
    if has("trace"):
        charts[f"{p}: trace (+-2 stderr)"] = ["Margin", [f"{p}/trace", f"{p}/trace_lower", f"{p}/trace_upper"]]
        charts[f"{p}: saddle probability of a random plane"] = [
            "Multiline",
            _exact(p, ["random_plane_saddle_probability"]),
        ]
    if has("trace") and has("slope_fit"):
        charts[f"{p}: traces compared"] = ["Multiline", _exact(p, ["trace", "trace_slope_fit"])]
    elif has("slope_fit"):
        charts[f"{p}: slope-fit trace"] = ["Multiline", _exact(p, ["trace_slope_fit"])]
    if has("optimizer_curvature"):
        charts[f"{p}: preconditioned sharpness vs stability edge"] = [
            "Multiline",
            _exact(p, ["preconditioned_lambda_max", "stability_threshold"]),
        ]
        charts[f"{p}: stability ratio (edge at 1)"] = ["Multiline", _exact(p, ["stability_ratio"])]
    if has("step_curvature"):
        charts[f"{p}: curvature along the step"] = [
            "Multiline",
            _exact(p, ["gradient_curvature", "direction_curvature"]),
        ]
        charts[f"{p}: critical learning rate"] = ["Multiline", _exact(p, ["critical_lr"])]
    if has("hessian_diagonal"):
        charts[f"{p}: diagonal share"] = ["Multiline", _exact(p, ["diagonal_share"])]
    if has("spectral_density"):
        charts[f"{p}: negative spectral mass"] = ["Multiline", _exact(p, ["negative_mass"])]
    if has("block_spectrum"):
        charts[f"{p}: block lambda_max"] = ["Multiline", [f"^{q}/block/.*/lambda_max$"]]
        charts[f"{p}: block trace"] = ["Multiline", [f"^{q}/block/.*/trace$"]]
    charts[f"{p}: HVPs per measurement"] = ["Multiline", _exact(p, ["hvp_count", "lanczos_hvp_count"])]
    charts[f"{p}: seconds per measurement"] = ["Multiline", _exact(p, ["seconds"])]
    if budgeted:
        charts[f"{p}: measurements postponed by the budget"] = ["Multiline", _exact(p, ["skipped"])]
    return charts


def _runs(instruments: frozenset[str], name: str) -> bool:
    """Whether an instrument of that name runs (``trace`` also matches a second one, ``trace_2``)."""
    return any(i == name or i.startswith(name + "_") for i in instruments)


def tensorboard_layout(monitors: Sequence[ChartSet]) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: one unit per chart (curvatures, ratios, counts, seconds, losses never mixed),
    and only the charts of the instruments each monitor runs (no empty cards)."""
    charts: dict[str, list[Any]] = {}
    for m in monitors:
        charts.update(_charts_of(m.prefix, functools.partial(_runs, m.instruments), m.budgeted))
        lp = m.landscape_prefix
        if lp is not None:
            q = re.escape(lp)
            charts[f"{lp}: lowest loss on the planes"] = [
                "Multiline",
                _exact(lp, ["center_loss", "random_min_loss", "hessian_min_loss"]),
            ]
            charts[f"{lp}: curvature of the planes"] = ["Multiline", [f"^{q}/(random|hessian)_curvature_(min|max)$"]]
    return {"Hessian": charts}


def write_tensorboard_layout(loggers: Iterable[Any], monitors: Sequence[ChartSet]) -> None:
    """Write one merged layout per TensorBoard run (the plugin reads a single layout per run)."""
    for logger in loggers:
        if is_tensorboard(logger):
            logger.experiment.add_custom_scalars(tensorboard_layout(monitors))


def run_directory(loggers: Sequence[Any], default_root_dir: str) -> Path:
    """This run's own directory, where its data files go.

    The first logger's ``log_dir`` (TensorBoard, CSV); for a logger without one (W&B),
    ``save_dir/name/version`` as Lightning's ``ModelCheckpoint`` resolves it, so two W&B runs never
    share files; with no logger, ``trainer.default_root_dir``.
    """
    if loggers:
        logger = loggers[0]
        log_dir = getattr(logger, "log_dir", None)
        if isinstance(log_dir, str) and log_dir:
            return Path(log_dir)
        save_dir = getattr(logger, "save_dir", None) or default_root_dir
        version = getattr(logger, "version", None)
        if version is not None:
            version = version if isinstance(version, str) else f"version_{version}"
            return Path(save_dir) / str(getattr(logger, "name", None) or "lightning_logs") / version
    return Path(default_root_dir)


def run_id(loggers: Sequence[Any]) -> str | None:
    """The first logger's run id (W&B) or version (TensorBoard, CSV), as a string; ``None`` without loggers."""
    version = getattr(loggers[0], "version", None) if loggers else None
    return None if version is None else str(version)


def append_jsonl(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON record as a line, written in one call; non-finite floats become ``null``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_safe(entry)) + "\n"
    with open(path, "a") as fh:
        fh.write(line)
        fh.flush()


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite ``path`` (atomically) with only the records ``keep`` accepts; returns how many were dropped.

    After a crash and a resume into the same directory, records written after the checkpoint
    would otherwise appear twice. A line that does not parse (cut off by the crash) is dropped.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and keep(record):
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write(path, lambda fh: fh.write("".join(kept).encode()))
    return dropped


def is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def log_image(loggers: Iterable[Any], tag: str, rgb: np.ndarray, step: int) -> None:
    """An HxWx3 uint8 image to every logger that shows images (TensorBoard, W&B); others are skipped."""
    for logger in loggers:
        if is_tensorboard(logger):
            logger.experiment.add_image(tag, rgb, step, dataformats="HWC")
        elif is_wandb(logger):
            logger.log_image(key=tag, images=[rgb], step=step)


def log_animation(loggers: Iterable[Any], tag: str, gif: Path, step: int) -> None:
    """An animated GIF: an image summary in TensorBoard (which plays GIFs), a video file in W&B."""
    data = gif.read_bytes()
    for logger in loggers:
        if is_tensorboard(logger):
            from tensorboard.compat.proto.summary_pb2 import Summary

            with Image.open(gif) as im:
                width, height = im.size
            image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
            logger.experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
            logger.experiment.flush()
        elif is_wandb(logger):
            logger.log_video(key=tag, videos=[str(gif)], step=step, format=["gif"])


def log_lines(loggers: Iterable[Any], tag: str, lines: dict[str, Any]) -> None:
    """A multi-line chart (``{"title", "x", "series": {name: values}}``) to W&B, which draws it from data.

    TensorBoard shows the same series together through its custom-scalars layout; other loggers
    have the scalars themselves.
    """
    series = {k: [float(v) for v in vs] for k, vs in lines["series"].items()}
    if not lines["x"] or not series:
        return
    for logger in loggers:
        if is_wandb(logger):
            import wandb

            plot = wandb.plot.line_series(
                xs=[int(x) for x in lines["x"]],
                ys=list(series.values()),
                keys=list(series),
                title=str(lines.get("title", tag)),
                xname="step",
            )
            logger.experiment.log({tag: plot})
