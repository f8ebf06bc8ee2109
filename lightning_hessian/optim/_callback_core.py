"""The TrustRegionLogger's logic, free of any Lightning import: after each step, log what TrustRegion did."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_hessian.optim.trust_region import TrustRegion, TrustRegionStats

DEFAULT_KEYS: tuple[str, ...] = (
    "loss",
    "rho",
    "radius",
    "cg_iterations",
    "boundary",
    "negative_curvature",
    "accepted",
    "n_hvp",
    "total_backprops",
)
"""Logged by default: the mini-batch loss at the step's starting point (values logged inside
``training_step`` mix it with the trial point's, since the closure runs twice), the acceptance ratio,
the radius the step used, CG iterations, whether the step hit the boundary or met negative curvature,
whether it was accepted, its HVPs, and backprop-equivalents so far."""

_ALLOWED = frozenset(TrustRegionStats.__dataclass_fields__) - {"status"} | {"accepted"}


class _TrustRegionLoggerCore:
    """Log every :class:`~lightning_hessian.optim.TrustRegion` step's statistics (``trust_region/rho``, ...).

    After each training batch, each ``TrustRegion`` among the trainer's optimizers that stepped reports
    ``keys`` of its :class:`~lightning_hessian.optim.TrustRegionStats` through ``LightningModule.log``
    (on step, not on epoch), under ``prefix`` (with ``_<index>`` appended when several optimizers are
    trust regions). Non-finite values (rho of a step that never evaluated a trial point) are left out.
    """

    def __init__(self, prefix: str = "trust_region/", keys: Sequence[str] = DEFAULT_KEYS) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string; got {prefix!r}")
        keys = tuple(keys)
        unknown = [k for k in keys if k not in _ALLOWED]
        if not keys or unknown:
            raise ValueError(f"keys must be a non-empty subset of {sorted(_ALLOWED)}; unknown: {unknown}")
        self.prefix = prefix
        self.keys = keys
        self._logged_step: dict[int, int] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the statistics of the steps taken since the last call."""
        optimizers = [_unwrap(o) for o in trainer.optimizers]
        trust_regions = [(i, o) for i, o in enumerate(optimizers) if isinstance(o, TrustRegion)]
        for i, opt in trust_regions:
            stats = opt.last_stats
            if stats is None or self._logged_step.get(i) == stats.step:
                continue
            self._logged_step[i] = stats.step
            suffix = f"_{i}" if len(trust_regions) > 1 else ""
            values = stats.metrics()
            metrics = {
                f"{self.prefix}{k}{suffix}": values[k] for k in self.keys if math.isfinite(values.get(k, math.nan))
            }
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer behind a LightningOptimizer wrapper (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


__all__ = ["DEFAULT_KEYS"]
