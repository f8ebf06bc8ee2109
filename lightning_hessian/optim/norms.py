"""The trust-region norms: the diagonal M of ||s||_M = sqrt(s.Ms) that each adaptive method measures steps in.

``uniform`` is the sphere (M = I). The ellipsoidal norms are the preconditioners of adaptive gradient
methods, as in the adaptive-norms paper: M = sqrt(v) + eps with v the RMSProp exponential average of
g^2 (``rms``), the Adagrad running sum of g^2 (``adagrad``) or Adam's bias-corrected second moment
(``adam``). Each includes the current gradient. Long steps are allowed along coordinates that have
seen small gradients, short ones along coordinates that have seen large ones.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

NormName = Literal["uniform", "rms", "adagrad", "adam"]
NORMS: tuple[str, ...] = ("uniform", "rms", "adagrad", "adam")

DEFAULT_BETA: dict[str, float] = {"rms": 0.8, "adam": 0.999}
"""Decay of the second-moment average: RMSProp's 0.8 as in the paper's code, Adam's usual 0.999."""


def check_norm(norm: object) -> str:
    """Return ``norm`` if it names a known trust-region norm, else raise a ``ValueError`` listing them."""
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(repr(n) for n in NORMS)}; got {norm!r}")
    return norm


def update_second_moment(moment: Tensor, grad: Tensor, norm: str, beta: float) -> None:
    """Fold the current gradient into the running second moment, in place (nothing for ``uniform``)."""
    if norm == "adagrad":
        moment.addcmul_(grad, grad)
    elif norm in ("rms", "adam"):
        moment.mul_(beta).addcmul_(grad, grad, value=1.0 - beta)


def metric_diagonal(moment: Tensor | None, norm: str, beta: float, eps: float, step: int) -> Tensor | None:
    """The diagonal of M after ``step`` gradients: sqrt(v) + eps (Adam: v bias-corrected); ``None`` = identity."""
    if norm == "uniform" or moment is None:
        return None
    if norm == "adam":
        return (moment / (1.0 - beta**step)).sqrt_().add_(eps)
    return moment.sqrt().add_(eps)


__all__ = ["DEFAULT_BETA", "NORMS", "NormName", "check_norm", "metric_diagonal", "update_second_moment"]
