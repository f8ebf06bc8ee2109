"""Where measurements go: scalars to every Lightning logger, a TensorBoard chart layout, files in the run dir.

Loggers are recognised by class name, so the same code serves ``pytorch_lightning`` and
``lightning.pytorch``. Only rank zero calls these functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_hessian._files import json_safe


def log_scalars(loggers: Iterable[Any], metrics: dict[str, float], step: int) -> None:
    """Send finite and non-finite scalars alike to every logger at ``step`` (``trainer.global_step``)."""
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in loggers:
        logger.log_metrics(clean, step=step)


def is_tensorboard(logger: Any) -> bool:
    return type(logger).__name__ == "TensorBoardLogger" and hasattr(logger.experiment, "add_custom_scalars")


def tensorboard_layout(prefixes: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: eigenvalues on one chart, the trace with its +-2 standard-error band."""
    charts: dict[str, list[Any]] = {}
    for p in prefixes:
        q = re.escape(p)
        charts[f"{p}: extremal eigenvalues"] = [
            "Multiline",
            [f"^{q}/lambda_max$", f"^{q}/lambda_min$", f"^{q}/lambda_[0-9]+$"],
        ]
        charts[f"{p}: trace (+-2 stderr)"] = ["Margin", [f"{p}/trace", f"{p}/trace_lower", f"{p}/trace_upper"]]
        charts[f"{p}: saddle signal"] = [
            "Multiline",
            [f"^{q}/negative_ratio$", f"^{q}/random_plane_saddle_probability$"],
        ]
        charts[f"{p}: traces compared"] = ["Multiline", [f"^{q}/trace$", f"^{q}/trace_slope_fit$"]]
        charts[f"{p}: cost"] = ["Multiline", [f"^{q}/hvp_count$", f"^{q}/seconds$"]]
    return {"Hessian": charts}


def write_tensorboard_layout(loggers: Iterable[Any], prefixes: Sequence[str]) -> None:
    """Write one merged layout per TensorBoard run (the plugin reads a single layout per run)."""
    for logger in loggers:
        if is_tensorboard(logger):
            logger.experiment.add_custom_scalars(tensorboard_layout(prefixes))


def run_directory(loggers: Sequence[Any], default_root_dir: str) -> Path:
    """The first logger's ``log_dir`` (where TensorBoard/CSV write), else the trainer's root dir."""
    for logger in loggers:
        log_dir = getattr(logger, "log_dir", None)
        if isinstance(log_dir, str) and log_dir:
            return Path(log_dir)
    return Path(default_root_dir)


def append_jsonl(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON record as a line, written in one call; non-finite floats become ``null``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_safe(entry)) + "\n"
    with open(path, "a") as fh:
        fh.write(line)
        fh.flush()


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
