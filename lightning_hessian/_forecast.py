"""What a budget means for a curve, in one line: an instrument's cost in training steps and when it runs next.

Users otherwise learn their curve's density only from the points that appear (or do not): on a
CPU a ``lambda_max`` can cost 20 training steps, so 5 % of the time gives about one point every
400 steps, fewer than one per short epoch. Said once per instrument, after its first run.
"""

from __future__ import annotations

import math


def spacing_note(
    prefix: str,
    name: str,
    seconds: float,
    step_seconds: float,
    budget: float,
    step: int,
    next_allowed: int,
    steps_per_epoch: float | None,
) -> str:
    """The info line for instrument ``name`` whose first run at ``step`` took ``seconds``.

    ``next_allowed`` is the scheduler's first step at which the budget lets it run again;
    ``steps_per_epoch`` (optimizer steps) is left out of the line when unknown or infinite.
    """
    worth = seconds / step_seconds if step_seconds > 0 else math.inf
    gap = next_allowed - step
    epoch = (
        f"; an epoch is {steps_per_epoch:.0f} steps"
        if steps_per_epoch is not None and math.isfinite(steps_per_epoch) and steps_per_epoch > 0
        else ""
    )
    when = f"planned from step {next_allowed} ({gap} steps on{epoch})" if gap < 10**8 else "not within this budget"
    return (
        f"HessianMonitor({prefix}): {name} took {seconds:.3g} s at step {step}, about {worth:.3g} training steps; "
        f"within budget={budget} its next run is {when}. For a denser curve raise budget= or lower the "
        "instrument's cost; budget=None measures exactly on schedule."
    )
