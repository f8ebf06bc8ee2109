"""The budget's arithmetic, driven the way the monitor drives it, on a clock of one second per training step."""

from __future__ import annotations

import math
import random

import pytest

from lightning_hessian._forecast import spacing_note
from lightning_hessian.scheduler import Cadence, Scheduler


def _simulate(
    costs: dict[str, float], weights: dict[str, float], budget: float, steps: int, overhead_per_step: float = 0.0
) -> tuple[dict[str, list[int]], list[tuple[int, float, float]]]:
    """Every instrument due at every step, each run costing ``costs[name]``; steps take 1 s of training.

    Returns each instrument's run steps and, after every step with runs, (step, total spent, budget x training
    seconds less the overhead), mirroring the monitor: plan before running (confirm), plan again after.
    """
    scheduler = Scheduler({name: Cadence(every_n_steps=1) for name in costs}, budget, weights)
    runs: dict[str, list[int]] = {name: [] for name in costs}
    ledger = []
    for step in range(1, steps + 1):
        train, overhead = float(step), overhead_per_step * step
        due = scheduler.after_step(step)

        if due:
            _replan(scheduler, costs, step, train, overhead)
            for name in scheduler.confirm(step, due):
                scheduler.ran(name, step, costs[name])
                runs[name].append(step)
            _replan(scheduler, costs, step, train, overhead)
            spent = sum(slot.spent for slot in scheduler.slots.values())
            ledger.append((step, spent, budget * train - overhead))
    return runs, ledger


def _replan(scheduler: Scheduler, costs: dict[str, float], step: int, train: float, overhead: float) -> None:
    fresh = {name: cost for name, cost in costs.items() if scheduler.slots[name].runs == 0}
    scheduler.apply(scheduler.plan(step, train, step, fresh, overhead_seconds=overhead))


def test_a_cheap_instrument_runs_on_what_an_expensive_one_has_not_spent_yet() -> None:
    # Two equal shares of a 10 % budget (5 % each). The expensive instrument's share pays its 50 s at
    # 50 / 0.05 = 1000 s. Until then the cheap one (1 s) may run on the whole 10 %, as long as its own
    # share would fill before the expensive one's: after k runs its share pays run k + 1 at
    # (k + 1) / 0.05 s, which is at most 1000 s for k <= 49, so runs 1..50 come at 10, 20, ..., 500 s
    # (with fixed shares they would come every 20 s, at 20, 40, ...). The expensive run is not delayed.
    runs, ledger = _simulate({"cheap": 1.0, "dear": 50.0}, {"cheap": 1.0, "dear": 1.0}, budget=0.1, steps=1000)
    assert runs["dear"] == [1000]
    before = [s for s in runs["cheap"] if s < 1000]
    assert before == list(range(10, 501, 10)) + [520 + 20 * k for k in range(len(before) - 50)]
    assert all(spent <= allowed + 1e-9 for _, spent, allowed in ledger)


@pytest.mark.parametrize("seed", range(6))
def test_borrowing_keeps_the_budget_and_never_delays_a_share(seed: int) -> None:
    """Random costs and weights: the total never exceeds the budget, and each instrument's k-th run comes no
    later than its own share alone allows it (the k-th run fits at k * cost / share seconds)."""
    rng = random.Random(seed)
    names = [f"i{k}" for k in range(rng.randint(2, 5))]
    costs = {name: rng.choice([0.5, 1.0, 2.0, 5.0, 13.0, 40.0]) for name in names}
    weights = {name: rng.choice([0.1, 0.5, 1.0, 2.0]) for name in names}
    budget = rng.choice([0.05, 0.1, 0.25])
    runs, ledger = _simulate(costs, weights, budget, steps=1500)
    assert all(spent <= allowed + 1e-9 for _, spent, allowed in ledger)
    total_weight = sum(weights.values())
    for name in names:
        share = budget * weights[name] / total_weight
        for k, step in enumerate(runs[name], start=1):
            assert step <= math.ceil(k * costs[name] / share - 1e-9), (name, k)
    # the instrument whose share fills first does not wait for its share: its first run is paid by the whole budget
    first = min(names, key=lambda n: costs[n] * total_weight / weights[n])
    assert runs[first][0] == math.ceil(costs[first] / budget - 1e-9)


def test_the_monitors_overhead_comes_off_the_budget_first() -> None:
    # A 1 s instrument on a 10 % budget fits after 10 s; 0.02 s of monitor overhead per training second
    # leaves 0.1 - 0.02 = 0.08 of each second: 1 / 0.08 = 12.5 s, so step 13.
    runs, ledger = _simulate({"only": 1.0}, {"only": 1.0}, budget=0.1, steps=40, overhead_per_step=0.02)
    assert runs["only"][:3] == [13, 25, 38]  # k / 0.08 s: 12.5, 25, 37.5
    assert all(spent <= allowed + 1e-9 for _, spent, allowed in ledger)


def test_an_instrument_of_weight_zero_never_runs_under_a_budget_even_alone() -> None:
    runs, _ = _simulate({"free": 0.1, "other": 1.0}, {"free": 0.0, "other": 1.0}, budget=0.25, steps=50)
    assert runs["free"] == [] and runs["other"][:2] == [4, 8]
    runs, _ = _simulate({"free": 0.1}, {"free": 0.0}, budget=0.25, steps=50)
    assert runs["free"] == []


def test_the_spacing_line_states_cost_in_steps_and_the_planned_gap() -> None:
    """The text users read about their curve's density: steps-worth, the planned step, the epoch when known."""
    line = spacing_note("hessian", "eigenvalues", 4.63, 0.2315, 0.05, 302, 801, 390.0)
    assert "eigenvalues took 4.63 s at step 302, about 20 training steps" in line
    assert "its next run is planned from step 801 (499 steps on; an epoch is 390 steps)" in line
    for unknown in (None, math.inf):  # an iterable loader without a length: no epoch in the line
        assert "(499 steps on)." in spacing_note("hessian", "eigenvalues", 4.63, 0.2315, 0.05, 302, 801, unknown)
    never = spacing_note("hessian", "diag", 1.0, 0.5, 0.05, 10, 10 + 1_000_000_000, 390.0)
    assert "about 2 training steps" in never and "its next run is not within this budget" in never
