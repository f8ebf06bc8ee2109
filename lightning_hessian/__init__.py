"""lightning_hessian: Hessian eigenvalues, traces and loss landscapes of a model, during training or standalone."""

from typing import TYPE_CHECKING, Any

from lightning_hessian import instruments
from lightning_hessian.allocator import pin_malloc_thresholds
from lightning_hessian.instruments import run_instruments
from lightning_hessian.landscape import Line, Surface, hessian_directions, loss_line, loss_surface, random_direction
from lightning_hessian.objective import DetachedLossError, HvpFallbackWarning, NonFiniteLossError, Objective
from lightning_hessian.spectrum import EigenResult, extremal_eigenpairs
from lightning_hessian.trace import TraceEstimate, hutchinson_trace, slope_fit_trace

if TYPE_CHECKING:
    from lightning_hessian.callback import HessianMonitor

__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    """Import the Lightning callback on first use: the math layers work without importing Lightning."""
    if name == "HessianMonitor":
        from lightning_hessian.callback import HessianMonitor

        return HessianMonitor
    raise AttributeError(f"module 'lightning_hessian' has no attribute {name!r}")


__all__ = [
    "DetachedLossError",
    "EigenResult",
    "HessianMonitor",
    "HvpFallbackWarning",
    "Line",
    "NonFiniteLossError",
    "Objective",
    "Surface",
    "TraceEstimate",
    "__version__",
    "extremal_eigenpairs",
    "hessian_directions",
    "hutchinson_trace",
    "instruments",
    "loss_line",
    "loss_surface",
    "pin_malloc_thresholds",
    "random_direction",
    "run_instruments",
    "slope_fit_trace",
]
