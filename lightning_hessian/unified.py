"""HessianMonitor for the unified ``lightning`` package (``import lightning.pytorch as pl``)."""

from __future__ import annotations

from lightning_hessian._callback_core import _HessianMonitorCore

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "lightning_hessian.unified needs the 'lightning' package (pip install lightning); with "
        "'pytorch_lightning' use `from lightning_hessian import HessianMonitor` instead"
    ) from err


class HessianMonitor(_HessianMonitorCore, Callback):  # type: ignore[misc]
    __doc__ = _HessianMonitorCore.__doc__


__all__ = ["HessianMonitor"]
