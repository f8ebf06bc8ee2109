"""The budget's wall clock: training time so far (the monitor's own time excluded, carried across a resume) and
first-run costs.

The scheduler decides in steps and seconds it is given; this is where those seconds come from.
Before anything was measured an HVP is taken to cost ``HVP_IN_TRAINING_STEPS`` training steps on
as many samples, so that planning a first run costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

#: An HVP's cost in training steps on as many samples until one is timed: measured 2.4-3.1 on the
#: CIFAR ResNet of ``benchmarks/bench_overhead.py`` (a forward pass, a backward pass that keeps its
#: graph, a double backward).
HVP_IN_TRAINING_STEPS = 2.5


class BudgetClock:
    """Training and measuring seconds of one fit, on an injectable clock (a test can fake it)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.started_at = 0.0
        self.measuring = 0.0  # seconds spent measuring in this fit
        self.overhead = 0.0  # the monitor's other seconds in this fit: hooks, planning, logging, files
        self.before = 0.0  # training seconds of the fit a checkpoint was written in
        self.overhead_before = 0.0  # overhead seconds of the fit a checkpoint was written in
        self.hvp_seconds: float | None = None  # seconds per HVP of the latest measurement
        self.train_batch_size = 1

    def start(self) -> None:
        self.started_at = self.clock()
        self.measuring = 0.0
        self.overhead = 0.0

    @contextlib.contextmanager
    def monitoring(self) -> Iterator[None]:
        """Charge the time of the enclosed monitor code, less the measuring inside it, as overhead."""
        t0, measuring0 = self.clock(), self.measuring
        try:
            yield
        finally:
            if self.started_at:
                self.overhead += max(self.clock() - t0 - (self.measuring - measuring0), 0.0)

    def overhead_seconds(self) -> float:
        """The monitor's time outside measurements so far, carried across a resume."""
        return self.overhead_before + self.overhead

    def train_seconds(self) -> float:
        """Training wall time of this run so far (the monitor's own time excluded), carried across a resume."""
        if not self.started_at:
            return self.before
        return self.before + max(self.clock() - self.started_at - self.measuring - self.overhead, 0.0)

    def step_seconds(self, step: int) -> float:
        """The mean training step so far: training seconds over the ``step`` optimizer steps taken."""
        return self.train_seconds() / max(step, 1)

    def first_costs(self, expected_hvps: Mapping[str, float], step: int, probe_samples: int) -> dict[str, float]:
        """Seconds each not-yet-run instrument is expected to take: its expected HVPs times one HVP's seconds."""
        hvp_seconds = self.hvp_seconds
        if hvp_seconds is None:
            step_seconds = self.step_seconds(step)
            hvp_seconds = HVP_IN_TRAINING_STEPS * step_seconds * probe_samples / max(self.train_batch_size, 1)
        return {name: hvps * hvp_seconds for name, hvps in expected_hvps.items()}
