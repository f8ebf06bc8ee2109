"""The budget's wall clock: training time so far (measuring excluded, carried across a resume) and first-run costs.

The scheduler decides in steps and seconds it is given; this is where those seconds come from.
Before anything was measured an HVP is taken to cost ``HVP_IN_TRAINING_STEPS`` training steps on
as many samples, so that planning a first run costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

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
        self.before = 0.0  # training seconds of the fit a checkpoint was written in
        self.hvp_seconds: float | None = None  # seconds per HVP of the latest measurement
        self.train_batch_size = 1

    def start(self) -> None:
        self.started_at = self.clock()
        self.measuring = 0.0

    def train_seconds(self) -> float:
        """Training wall time of this run so far (measuring excluded), carried across a resume."""
        if not self.started_at:
            return self.before
        return self.before + max(self.clock() - self.started_at - self.measuring, 0.0)

    def first_costs(self, expected_hvps: Mapping[str, float], step: int, probe_samples: int) -> dict[str, float]:
        """Seconds each not-yet-run instrument is expected to take: its expected HVPs times one HVP's seconds."""
        hvp_seconds = self.hvp_seconds
        if hvp_seconds is None:
            step_seconds = self.train_seconds() / max(step, 1)
            hvp_seconds = HVP_IN_TRAINING_STEPS * step_seconds * probe_samples / max(self.train_batch_size, 1)
        return {name: hvps * hvp_seconds for name, hvps in expected_hvps.items()}
