"""Where a measured step goes (rank zero): the JSONL record, the loggers' scalars, images, line charts and files.

The record is written first, so what was measured is kept even when a logger fails; the monitor
runs :meth:`Publisher.measurement` under its I/O isolation. Rendering and file formats live in
:mod:`lightning_hessian.sinks` and :mod:`lightning_hessian.run_files`; this module only routes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_hessian import sinks
from lightning_hessian.instruments.base import Artifact, Instrument, InstrumentOutput
from lightning_hessian.instruments.landscape import Landscape
from lightning_hessian.run_files import RunFiles


class Publisher:
    """Routes one monitor's measurements to its run files and loggers under ``{prefix}/...``."""

    def __init__(self, prefix: str, files: RunFiles, instruments: Mapping[str, Instrument]) -> None:
        self.prefix = prefix
        self.files = files
        self.instruments = instruments
        self._constants_logged = False
        self._flags: dict[str, float] = {}

    def measurement(
        self,
        run_dir: Path,
        loggers: Sequence[Any],
        step: int,
        outputs: Mapping[str, InstrumentOutput],
        metrics: Mapping[str, float],
        entry: dict[str, Any],
        num_params: int | None,
    ) -> None:
        """The JSONL ``entry`` (with the instruments' records) first, then the scalars, then the artifacts."""
        if metrics:
            for out in outputs.values():
                for artifact in out.artifacts:
                    if artifact.kind == "record":
                        entry.update(artifact.data)
            self.files.record(run_dir, loggers, entry)
            logged = {f"{self.prefix}/{k}": v for k, v in metrics.items() if not self._unchanged_flag(k, v)}
            if not self._constants_logged and num_params is not None:  # run constants: once, not a flat curve
                logged[f"{self.prefix}/num_params"] = float(num_params)
                self._constants_logged = True
            sinks.log_scalars(loggers, logged, step)
        for name, out in outputs.items():
            ins = self.instruments[name]
            for artifact in out.artifacts:
                if artifact.kind == "snapshot" and isinstance(ins, Landscape):
                    self.files.snapshot(
                        run_dir, loggers, artifact.data, ins.log_scale, ins.animation == "always", ins.shared_scale
                    )
                else:
                    self.artifact(run_dir, loggers, artifact, step)

    def finish(
        self,
        run_dir: Callable[[], Path],
        loggers: Sequence[Any],
        step: int,
        guard: Callable[[str, Callable[[], Any]], None],
    ) -> None:
        """At the end of training: each instrument's summary, then each landscape's animation, each under
        ``guard(what, fn)`` (the monitor's I/O isolation), so one failing write does not stop the others."""
        for name, ins in self.instruments.items():
            guard(f"the {name} summary", functools.partial(self._summary, run_dir, loggers, ins, step))
        for ins in self.instruments.values():
            if isinstance(ins, Landscape) and ins.animation != "never" and self.files.frames:
                animate = functools.partial(
                    self._animation, run_dir, loggers, ins.log_scale, step, shared_scale=ins.shared_scale
                )
                guard("the landscape animation", animate)

    def _summary(self, run_dir: Callable[[], Path], loggers: Sequence[Any], ins: Instrument, step: int) -> None:
        out = ins.summary()
        if out is not None:
            for artifact in out.artifacts:
                self.artifact(run_dir(), loggers, artifact, step)

    def _animation(
        self, run_dir: Callable[[], Path], loggers: Sequence[Any], log_scale: Any, step: int, *, shared_scale: bool
    ) -> None:
        self.files.animate(run_dir(), loggers, log_scale, step, shared_scale=shared_scale)

    def artifact(self, run_dir: Path, loggers: Sequence[Any], artifact: Artifact, step: int) -> None:
        """An image, a line chart, or files saved under ``<run dir>/<name>/<prefix>``."""
        if artifact.kind == "image":
            sinks.log_image(loggers, f"{self.prefix}/{artifact.name}", artifact.data, step)
        elif artifact.kind == "save":
            artifact.data(run_dir / artifact.name / self.prefix)
        elif artifact.kind == "lines":
            sinks.log_lines(loggers, f"{self.prefix}/{artifact.name}", artifact.data)

    def _unchanged_flag(self, key: str, value: float) -> bool:
        """Convergence flags go to the loggers only when they change (the JSONL keeps every value)."""
        if not key.endswith("_converged"):
            return False
        unchanged = self._flags.get(key) == value
        self._flags[key] = value
        return unchanged
