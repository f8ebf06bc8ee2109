"""Failures stay inside the analysis: a failing measurement becomes one warning and a skipped step.

The monitor wraps every instrument run in :func:`guarded` and rank zero's writing (files,
loggers) in :func:`guarded_io`; ``on_error="raise"`` re-raises instead. Imports no Lightning
package: the trainer is only read (``global_step``, ``world_size``, ``global_rank``).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_hessian._agreement import PeerFailedError

_OUT_OF_MEMORY_ADVICE = (
    "To fit, use a smaller probe set (probe_batches, or smaller batches in probe_dataloader), "
    "hvp='double_backward' (the lowest memory of the engines), or params=[...] to take the Hessian of a subset "
    "of the parameters."
)


def guarded(
    trainer: Any,
    prefix: str,
    on_error: str,
    what: str,
    fn: Callable[[], Any],
    on_failure: Callable[[BaseException], None],
) -> tuple[bool, Any]:
    """``(True, fn())``, or ``(False, None)`` after one warning when ``fn`` fails (re-raised with ``on_error="raise"``).

    ``on_failure(err)`` runs first (the monitor counts the failure and, on running out of
    memory, drops what the measurement held); then memory is collected and the warning says
    what to change. Under DDP the failing rank warns with its own reason; the others learn of it
    through the agreement (:class:`PeerFailedError`) and rank zero says the step was skipped.
    """
    try:
        return True, fn()
    except Exception as err:
        on_failure(err)
        out_of_memory = is_out_of_memory(err)
        if out_of_memory:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if on_error == "raise":
            raise
        where = f"HessianMonitor({prefix}): {what} at step {trainer.global_step}"
        if isinstance(err, PeerFailedError):
            rank_zero_warn(f"{where} was skipped on every process: another process failed (its warning says why).")
        elif out_of_memory:
            first_line = str(err).splitlines()[0] if str(err) else ""
            warn_here(
                trainer,
                f"{where} ran out of memory and was skipped; training goes on ({type(err).__name__}: {first_line}). "
                + _OUT_OF_MEMORY_ADVICE,
            )
        else:
            warn_here(
                trainer,
                f"{where} failed and was skipped ({type(err).__name__}: {err}); training goes on. Pass "
                "on_error='raise' to stop instead.",
            )
        return False, None


def is_out_of_memory(err: BaseException) -> bool:
    """Host (``MemoryError``) or accelerator (``torch.OutOfMemoryError``) memory ran out."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError))


def warn_here(trainer: Any, message: str) -> None:
    """Warn on this process (a rank's own failure is only known there), naming the rank under DDP."""
    if int(trainer.world_size) > 1:
        warnings.warn(f"[rank {trainer.global_rank}] {message}", UserWarning, stacklevel=3)
    else:
        rank_zero_warn(message)


def guarded_io(prefix: str, on_error: str, what: str, fn: Callable[[], Any]) -> None:
    """Rank zero's writing (files, loggers): a failure is reported as such, never as a skipped measurement."""
    try:
        fn()
    except Exception as err:
        if on_error == "raise":
            raise
        rank_zero_warn(
            f"HessianMonitor({prefix}): {what} failed ({type(err).__name__}: {err}). What was measured is "
            "kept in `history` and in every file and logger that did not fail; training goes on."
        )
