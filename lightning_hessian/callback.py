"""HessianMonitor for ``pytorch_lightning``: the core logic on ``pytorch_lightning.Callback``."""

from __future__ import annotations

from pytorch_lightning import Callback

from lightning_hessian._callback_core import _HessianMonitorCore


class HessianMonitor(_HessianMonitorCore, Callback):  # type: ignore[misc]
    __doc__ = _HessianMonitorCore.__doc__


__all__ = ["HessianMonitor"]
