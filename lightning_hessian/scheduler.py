"""When each instrument runs: its cadence, log-spaced early tracking, and the time budget.

Free of Lightning and of wall clocks: the monitor feeds it steps, epoch ends and measured costs,
and it answers with the instruments to run. Budget decisions are turned into *step numbers*
(``next_allowed``) once per measurement, so that under DDP one broadcast of rank zero's numbers
makes every rank decide identically without a collective at every step.

The budget: instrument ``i`` has a share ``share_i = budget * weight_i / sum(weights)`` of the
training time so far (less the monitor's own overhead: hooks, logging, files). Its next run is
*entitled* from the first step at which, at the mean training-step time so far, its spending
plus that run fits its share. It may run earlier on what the whole monitor has left unspent
when its entitlement is the first of all instruments': that spending is back within its share
before any other share fills, so nobody waits longer than with fixed shares while a cheap
instrument does not idle behind an expensive one that is saving up. The next run is taken to
cost what the last did, scaled by the instrument's expected HVPs for it over those for the last
(a cheap ``lambda_max`` after an expensive ``lambda_min`` run is planned as cheap). A
measurement that is due before it may run is *postponed*: it stays pending and runs at the
first allowed step; further due points while it is pending are coalesced. Both count as
skipped. The start and the end of fit are due points like the others. An instrument that has
not run yet is planned with an estimated cost (its expected HVPs times an estimated HVP time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Cadence:
    """When an instrument is due: every ``every_n_steps`` optimizer steps, every ``every_n_epochs`` epochs,
    and (``log_spaced``) at steps 1, 2, 4, 8, ... where the geometry changes fastest."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    log_spaced: bool = False


@dataclass
class _Slot:
    anchor: int = 0  # step of the last every_n_steps slot
    last_run: int = -1
    pending_since: int = -1  # -1: nothing pending
    next_allowed: int = 0
    spent: float = 0.0
    last_cost: float = 0.0
    last_expected: float = 0.0  # the HVPs of the run that cost last_cost: as it turned out, else as expected
    runs: int = 0
    skipped: int = 0


class Scheduler:
    """Decides which instruments run at each point of a fit."""

    def __init__(
        self, cadences: dict[str, Cadence], budget: float | None, weights: dict[str, float] | None = None
    ) -> None:
        self.cadences = dict(cadences)
        self.budget = budget
        w = {name: float((weights or {}).get(name, 1.0)) for name in cadences}
        total = sum(w.values()) or 1.0
        self.shares = {name: (budget or 0.0) * w[name] / total for name in cadences}
        self.slots = {name: _Slot() for name in cadences}
        self.new_skips = 0  # skips since the last call of take_new_skips()
        self.needs_replan = False  # a plan made before any training step was timed
        self._due_now: set[str] = set()

    # ------------------------------------------------------------------ due points
    def after_step(self, step: int) -> list[str]:
        """Instruments to run after the optimizer step that made ``global_step == step``."""
        for name, cadence in self.cadences.items():
            slot = self.slots[name]
            n = cadence.every_n_steps
            due = n is not None and step > slot.anchor and step - slot.anchor >= n
            if due:
                slot.anchor = step
            if cadence.log_spaced and step >= 1 and step & (step - 1) == 0:
                due = True
            if due:
                self._request(name, step)
        return self._runnable(step)

    def at_epoch_end(self, epoch: int, step: int) -> list[str]:
        """Instruments to run at the end of training epoch ``epoch`` (0-based)."""
        for name, cadence in self.cadences.items():
            n = cadence.every_n_epochs
            if n is not None and (epoch + 1) % n == 0:
                self._request(name, step)
        return self._runnable(step)

    def at_fit_start(self, step: int) -> list[str]:
        """Every instrument is due. Without a budget all run now; with one, no training step has been
        timed yet, so they wait for the first plan (each then runs once its estimated cost fits)."""
        if self.budget is None:
            return [name for name, slot in self.slots.items() if slot.last_run != step]
        for name in self.slots:
            self._request(name, step)
        self._due_now = set()  # waiting for a plan is not a skip yet
        self.needs_replan = True
        return []

    def at_fit_end(self, step: int) -> list[str]:
        """Every instrument is due; with a budget, those that fit run (plan first)."""
        if self.budget is None:
            return [name for name, slot in self.slots.items() if slot.last_run != step]
        for name in self.slots:
            self._request(name, step)
        return self._runnable(step)

    def _request(self, name: str, step: int) -> None:
        slot = self.slots[name]
        if slot.last_run != step:
            self._due_now.add(name)
            if slot.pending_since < 0:
                slot.pending_since = step

    def _runnable(self, step: int) -> list[str]:
        """Pending instruments whose budget allows them now; due ones that must wait are counted as skipped."""
        runnable = [
            name
            for name, slot in self.slots.items()
            if slot.pending_since >= 0 and slot.last_run != step and (self.budget is None or step >= slot.next_allowed)
        ]
        for name in self._due_now - set(runnable):  # postponed, or folded into one already waiting
            self.slots[name].skipped += 1
            self.new_skips += 1
        self._due_now = set()
        return runnable

    # ------------------------------------------------------------------ accounting
    def ran(self, name: str, step: int, seconds: float, expected_hvps: float = 0.0) -> None:
        """Record a run (successful or failed: both cost time); clears what was pending.

        ``expected_hvps``: what this run cost in the unit of the instrument's expected HVPs (its
        measured count where it reports one, else what it expected), to scale the next run's cost
        when that run is of another kind or size (see :meth:`plan`).
        """
        slot = self.slots[name]
        slot.last_run = step
        slot.pending_since = -1
        slot.spent += seconds
        slot.last_cost = seconds
        slot.last_expected = expected_hvps
        slot.runs += 1

    def plan(
        self,
        step: int,
        train_seconds: float,
        train_steps: int,
        estimates: dict[str, float] | None = None,
        next_hvps: dict[str, float] | None = None,
        overhead_seconds: float = 0.0,
    ) -> dict[str, int]:
        """Rank zero: the first step at which each instrument may run again (to broadcast and :meth:`apply`).

        ``estimates``: predicted seconds of instruments that have not run yet (their first cost).
        ``next_hvps``: the instruments' expected HVPs for their next run; an instrument that ran is
        planned with its last cost scaled by ``next_hvps / last_expected`` (1 when its runs are
        alike), so that after an expensive run of one kind (``lambda_min`` with ``lambda_max``)
        the next, cheaper one is not planned as if it cost as much.
        ``overhead_seconds``: the monitor's time outside measurements (its hooks, logging, files),
        taken off the budget before the shares.

        An instrument may run from the training time at which its own share pays for its next run
        (*entitled*), or earlier, on the unspent budget of the whole monitor, if its entitlement
        comes first of all the instruments': what it spends early is back in its share before any
        other instrument's share fills, so no instrument waits longer than with fixed shares and the
        total stays within ``budget * train_seconds``. Instruments allowed now take their cost off
        that unspent budget in order, so two early runs at one step must fit together.
        """
        if self.budget is None:
            return {}
        if train_steps <= 0:  # no step timed yet: plan again after the next step (same decision on every rank)
            self.needs_replan = True
            return {name: step + 1 for name in self.slots}
        self.needs_replan = False
        step_seconds = max(train_seconds, 1e-9) / train_steps
        costs = {
            name: self._next_cost(name, next_hvps) if slot.runs else (estimates or {}).get(name, 0.0)
            for name, slot in self.slots.items()
        }
        entitled = {name: self._entitled_at(name, costs[name], overhead_seconds) for name in self.slots}
        unspent = self.budget * train_seconds - overhead_seconds - sum(slot.spent for slot in self.slots.values())
        earliest = min(entitled.values())
        plan = {}
        for name in sorted(self.slots, key=lambda n: entitled[n]):  # the earliest entitlement first
            slot = self.slots[name]
            at = entitled[name]
            if train_seconds < at <= earliest < math.inf:  # a weight-0 instrument (never entitled) never runs early
                at = min(at, train_seconds + max(costs[name] - unspent, 0.0) / self.budget)  # the unspent covers it
            if not math.isfinite(at):
                plan[name] = step + 1_000_000_000
            elif at <= train_seconds:
                plan[name] = step + (1 if slot.last_run == step else 0)
                if slot.pending_since >= 0 and slot.last_run != step:
                    unspent -= costs[name]  # runs now: what is left for the next one at this step
            else:
                plan[name] = step + max(1, math.ceil((at - train_seconds) / step_seconds))
        return plan

    def _entitled_at(self, name: str, cost: float, overhead_seconds: float) -> float:
        """Training seconds from which the instrument's share of the budget (after the overhead) pays its next run."""
        share = self.shares[name]
        if share <= 0 or self.budget is None:  # a weight of 0, a budget of 0, or none
            return math.inf
        return (self.slots[name].spent + cost) / share + overhead_seconds / self.budget

    def _next_cost(self, name: str, next_hvps: dict[str, float] | None) -> float:
        slot = self.slots[name]
        expected = (next_hvps or {}).get(name, 0.0)
        if expected > 0 and slot.last_expected > 0:
            return slot.last_cost * expected / slot.last_expected
        return slot.last_cost

    def apply(self, plan: dict[str, int]) -> None:
        for name, next_allowed in plan.items():
            if name in self.slots:
                self.slots[name].next_allowed = int(next_allowed)

    def confirm(self, step: int, names: list[str]) -> list[str]:
        """After a fresh plan at ``step``: the names that still fit; the others stay pending (postponed)."""
        kept = [name for name in names if self.budget is None or step >= self.slots[name].next_allowed]
        for name in set(names) - set(kept):
            self.slots[name].skipped += 1
            self.new_skips += 1
        return kept

    def take_new_skips(self) -> int:
        n, self.new_skips = self.new_skips, 0
        return n

    @property
    def skipped(self) -> int:
        return sum(slot.skipped for slot in self.slots.values())

    def pending(self) -> list[str]:
        return [name for name, slot in self.slots.items() if slot.pending_since >= 0]

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"slots": {name: asdict(slot) for name, slot in self.slots.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, values in (state.get("slots") or {}).items():
            if name in self.slots:
                self.slots[name] = _Slot(**{k: v for k, v in values.items() if k in _Slot.__dataclass_fields__})


def unique_names(names: Iterable[str]) -> list[str]:
    """Instrument names made unique (``trace``, ``trace_2``): they key the schedule and the checkpoint."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def cadence_for(
    own: tuple[int | None, int | None], every_n_steps: int | None, every_n_epochs: int | None, log_spaced: bool
) -> Cadence:
    """An instrument's own cadence when it has one, else the monitor's."""
    if own[0] is not None or own[1] is not None:
        return Cadence(every_n_steps=own[0], every_n_epochs=own[1])
    return Cadence(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, log_spaced=log_spaced)


def names_of(items: Sequence[Any]) -> list[str]:
    return unique_names(getattr(item, "name", type(item).__name__) for item in items)
