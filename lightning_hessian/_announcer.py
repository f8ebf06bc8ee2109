"""What the monitor tells the user once per fit, on rank zero: postponed measurements, what each instrument costs
and when the budget lets it run again, the CPU allocator's effect, and the probe set's warnings.

Each line is said the first time it applies and not again, so a long run's log is not flooded.
The texts of the budget's lines live in :mod:`lightning_hessian._forecast` and here; nothing is
decided here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

from lightning_hessian._forecast import spacing_note
from lightning_hessian.allocator import dynamic_glibc_thresholds


class Announcer:
    """Once-per-fit messages of one monitor (``prefix``) under a ``budget`` (``None``: no budget lines)."""

    def __init__(self, prefix: str, budget: float | None) -> None:
        self.prefix = prefix
        self.budget = budget
        self._warned: set[str] = set()
        self._skips_told = False
        self._spacing_told: set[str] = set()  # instruments whose cost and next run were said
        self._allocator_told = False

    def warn_once(self, message: str | None) -> None:
        """A warning (for example the probe set's), the first time this exact text comes up."""
        if message and message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message)

    def skips(self, new_skips: int) -> None:
        """The first time the budget postponed measurements: how many, where the count is logged, how to stop it."""
        if not new_skips or self._skips_told:
            return
        self._skips_told = True
        rank_zero_info(
            f"HessianMonitor({self.prefix}): the time budget (budget={self.budget} of the training time) postponed "
            f"{new_skips} measurement(s) so far; they run at the first step where they fit. The count is logged "
            f"as {self.prefix}/skipped. Pass budget=None to measure exactly on schedule."
        )

    def spacing(
        self,
        trainer: Any,
        step: int,
        seconds: Mapping[str, float],
        step_seconds: float,
        next_allowed: Mapping[str, int],
    ) -> None:
        """After each instrument's first successful run: its cost in training steps and the step from which the
        budget lets it run again (the plan is the same on every rank; rank zero says it)."""
        if self.budget is None:
            return
        for name in [n for n in seconds if n not in self._spacing_told]:
            self._spacing_told.add(name)
            note = spacing_note(
                self.prefix,
                name,
                seconds[name],
                step_seconds,
                self.budget,
                step,
                next_allowed[name],
                steps_per_epoch(trainer),
            )
            rank_zero_info(note)

    def allocator(self, device_type: str) -> None:
        """On CPU with glibc's dynamic malloc thresholds, once: measuring can slow later training steps."""
        if self._allocator_told or device_type != "cpu":
            return
        self._allocator_told = True
        if dynamic_glibc_thresholds():
            rank_zero_info(
                f"HessianMonitor({self.prefix}): training on CPU with glibc's dynamic malloc thresholds. A "
                "measurement's temporaries raise them, and later training steps can run slower (about 5 % on "
                "a CIFAR-shaped ResNet). lightning_hessian.pin_malloc_thresholds() at the start of the script, "
                "or MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment, avoids it (README, "
                "'What it costs')."
            )


def steps_per_epoch(trainer: Any) -> float | None:
    """Optimizer steps in a training epoch (``None`` when the trainer cannot say)."""
    try:
        batches = float(trainer.num_training_batches)
        return batches / max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
    except (AttributeError, TypeError, ValueError):
        return None
