"""Turns the budget's seconds into the scheduler's step numbers, the same on every DDP rank.

The scheduler (:mod:`lightning_hessian.scheduler`) decides in steps from the seconds it is given;
the clock (:mod:`lightning_hessian._budget_clock`) measures them. This module feeds one to the
other: after every measurement, before running what an earlier plan allowed, and at the ends of
fit. Rank zero's plan is broadcast, so every rank applies the same next-allowed steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_hessian._budget_clock import BudgetClock
from lightning_hessian._probe_set import ProbeSet
from lightning_hessian.instruments.base import Instrument
from lightning_hessian.objective import default_batch_size
from lightning_hessian.scheduler import Scheduler


class BudgetPlanner:
    """Plans one fit's ``scheduler`` from its ``clock`` under ``budget`` (``None``: nothing to plan)."""

    def __init__(
        self,
        budget: float | None,
        instruments: Mapping[str, Instrument],
        scheduler: Scheduler,
        clock: BudgetClock,
        probe: ProbeSet,
    ) -> None:
        self.budget = budget
        self.instruments = instruments
        self.scheduler = scheduler
        self.clock = clock
        self.probe = probe

    def plan(self, trainer: Any, step: int) -> None:
        """Rank zero turns the budget into next-allowed steps; every rank applies the same numbers."""
        if self.budget is None:
            return
        next_hvps = {name: float(ins.expected_hvps()) for name, ins in self.instruments.items()}
        plan = self.scheduler.plan(
            step,
            self.clock.train_seconds(),
            step,
            self._first_cost_estimates(step),
            next_hvps,
            overhead_seconds=self.clock.overhead_seconds(),
        )
        if int(trainer.world_size) > 1:
            plan = trainer.strategy.broadcast(plan, src=0)
        self.scheduler.apply(plan)

    def confirm(self, trainer: Any, names: list[str]) -> list[str]:
        """Plan again before running what an earlier plan allowed: that plan's step time may have been off
        (the first steps carry the fit's start-up), so the budget is checked against the time so far."""
        if not names or self.budget is None or not self.probe.complete or trainer.sanity_checking:
            return names
        step = int(trainer.global_step)
        self.plan(trainer, step)
        return self.scheduler.confirm(step, names)

    def _first_cost_estimates(self, step: int) -> dict[str, float]:
        """Predicted seconds of the instruments that have not run yet (free: no HVP is timed to find out)."""
        fresh = [name for name, slot in self.scheduler.slots.items() if slot.runs == 0]
        if not fresh or not self.probe.complete:
            return {}
        probe_samples = sum(default_batch_size(b) for b in self.probe.batches)
        expected = {name: self.instruments[name].expected_hvps() for name in fresh}
        return self.clock.first_costs(expected, step, probe_samples)
