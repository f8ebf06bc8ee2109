"""Where a monitor's results go: the run's JSONL record, landscape snapshots, their pictures and animation.

Rank zero only, and free of Lightning: it is handed the loggers and the run directory. The data
files are written first and never depend on a logger; a logger that fails does not keep the
others (or the files) from their values.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_hessian import sinks
from lightning_hessian._files import remove_leftover_temporaries
from lightning_hessian.snapshots import Snapshot, list_snapshots, save_snapshot


class RunFiles:
    """The files of one monitor (one prefix) in one run directory."""

    def __init__(self, prefix: str, landscape_prefix: str) -> None:
        self.prefix = prefix
        self.landscape_prefix = landscape_prefix
        self.frames: list[str] = []  # every snapshot file of the run so far (carried over on resume)

    # ------------------------------------------------------------------ paths
    def jsonl_path(self, run_dir: Path) -> Path:
        return run_dir / "hessian" / (self.prefix.replace("/", "_") + ".jsonl")

    def landscape_dir(self, run_dir: Path) -> Path:
        return run_dir / "landscape" / self.prefix

    # ------------------------------------------------------------------ fit start
    def prepare(self, run_dir: Path, resumed_at: int | None, last_frame_step: int) -> None:
        """Remove temporary files a killed process left; after a resume cut the files back to the checkpoint.

        A crash after the checkpoint left records (and frames) that the resumed fit writes again:
        records with ``step > resumed_at`` and frames after ``last_frame_step`` are removed, so that
        every step appears exactly once.
        """
        remove_leftover_temporaries(self.jsonl_path(run_dir).parent)
        remove_leftover_temporaries(self.landscape_dir(run_dir))
        if resumed_at is not None:
            sinks.truncate_jsonl(self.jsonl_path(run_dir), lambda r: float(r.get("step", -1)) <= resumed_at)
            for path in list_snapshots(self.landscape_dir(run_dir)):
                if _snapshot_step(path) > last_frame_step:
                    path.unlink(missing_ok=True)
        self._carry_over_frames(run_dir)

    def _carry_over_frames(self, run_dir: Path) -> None:
        """After a resume into a new log directory, copy the earlier frames so the animation stays whole."""
        directory = self.landscape_dir(run_dir)
        for name in self.frames:
            source = Path(name)
            target = directory / source.name
            if source.exists() and not target.exists():
                directory.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)

    # ------------------------------------------------------------------ measurements
    def record(self, run_dir: Path, loggers: Sequence[Any], entry: dict[str, Any]) -> None:
        """Append the step's record (with the run's id, so records of runs never mix) to the JSONL."""
        sinks.append_jsonl(self.jsonl_path(run_dir), {"run": sinks.run_id(loggers), **entry})

    # ------------------------------------------------------------------ landscapes
    def snapshot(
        self,
        run_dir: Path,
        loggers: Sequence[Any],
        snap: Snapshot,
        log_scale: Any,
        animate: bool,
        shared_scale: bool = False,
    ) -> None:
        """The .npz file first, then the scalars, the pictures, and (``animate``) the animation so far."""
        import lightning_hessian.render as render

        path = save_snapshot(self.landscape_dir(run_dir), snap)
        if str(path) not in self.frames:
            self.frames.append(str(path))
        lp = self.landscape_prefix
        sinks.log_scalars(loggers, {f"{lp}/{k}": v for k, v in snap.scalars.items()}, snap.step)
        if not any(sinks.is_tensorboard(lg) or sinks.is_wandb(lg) for lg in loggers):
            return
        figures = {f"{lp}/planes": snap}
        for kind, surface in snap.planes.items():
            figures[f"{lp}/{kind}"] = Snapshot(
                step=snap.step, epoch=snap.epoch, planes={kind: surface}, scalars=snap.scalars, meta=snap.meta
            )
        for tag, frame in figures.items():  # each plane on its own robust colour scale
            fig = render.snapshot_figure(frame, log_scale=log_scale, shared_scale=shared_scale)
            sinks.log_image(loggers, tag, render.figure_to_rgb(fig), snap.step)
        if animate:
            self.animate(run_dir, loggers, log_scale, snap.step, shared_scale=shared_scale)

    def animate(
        self, run_dir: Path, loggers: Sequence[Any], log_scale: Any, step: int, shared_scale: bool = False
    ) -> None:
        """Re-render every frame of the run (extents and colour limits fixed per plane) and log the GIF."""
        import lightning_hessian.render as render

        directory = self.landscape_dir(run_dir)
        if not list_snapshots(directory):
            return
        written = render.render_run(directory, log_scale=log_scale, shared_scale=shared_scale)
        gif = next((p for p in written if p.suffix == ".gif"), None)
        if gif is not None:
            sinks.log_animation(loggers, f"{self.landscape_prefix}/animation", gif, step)

    def state_dict(self) -> dict[str, Any]:
        return {"files": list(self.frames)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frames = list(state.get("files", []))


def _snapshot_step(path: Path) -> int:
    """The step in a snapshot file's name (``step_000000120.npz``), or -1 when it has none."""
    digits = "".join(ch for ch in path.stem if ch.isdigit())
    return int(digits) if digits else -1
