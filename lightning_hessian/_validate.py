"""Argument checks that fail at construction with a message saying what was wrong and what is allowed.

Shared by the callback and the estimators' configurations, so every entry point gives the same
message for the same mistake (``k=True``, ``tol="1e-3"``, ``params=3``, ``probe_dataloader=5``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sized
from typing import Any

from torch import Tensor


def positive_int(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; booleans are refused (``True`` is not a count)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be an integer >= {minimum}{upper}, got {value!r}")
    return value


def optional_positive_int(name: str, value: Any, *, also: str = "") -> int | None:
    """``None`` or a positive integer; ``also`` names a further accepted value for the message (e.g. ``"'auto'"``)."""
    if value is None:
        return None
    if also and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer, None or {also}, got {value!r}")
    return positive_int(name, value)


def optional_callable(name: str, value: Any, signature: str) -> Any:
    """``None`` or a callable, named by how it is called."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be callable as {signature}, got {value!r}")
    return value


def prefix(value: Any) -> str:
    """A metric namespace: a non-empty string without a trailing ``/``."""
    if not isinstance(value, str) or not value or value.endswith("/"):
        raise ValueError(f"prefix must be a non-empty string without a trailing '/', got {value!r}")
    return value


def instruments(value: Any, kind: type) -> list[Any]:
    """A non-empty list (or tuple) of ``kind`` objects."""
    if isinstance(value, kind) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"instruments must be a non-empty list of instruments, e.g. [Eigenvalues(), Trace()]; got {value!r}"
        )
    for item in value:
        if not isinstance(item, kind):
            raise ValueError(f"instruments must be Instrument objects (lightning_hessian.instruments), got {item!r}")
    return list(value)


def positive_float(name: str, value: Any, *, below: float | None = None) -> float:
    """A finite positive number (``below``: exclusive upper bound); strings and booleans are refused."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a positive number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 0) or (below is not None and value >= below):
        bound = f" below {below}" if below is not None else ""
        raise ValueError(f"{name} must be a finite positive number{bound}, got {value!r}")
    return float(value)


def seed(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value!r}")
    return value


def param_globs(value: Any) -> str | tuple[str, ...] | None:
    """``None``, a glob string, or a non-empty list of glob strings (names matched at setup)."""
    if value is None or isinstance(value, str):
        return value  # type: ignore[no-any-return]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(
        f"params must be None (every trainable parameter), a glob string such as 'fc1.*', or a non-empty list "
        f"of glob strings; got {value!r}"
    )


def choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    options = tuple(allowed)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def names(name: str, value: Any, allowed: Iterable[str]) -> tuple[str, ...]:
    """A non-empty list of names from ``allowed`` (a bare string is refused: it is not a list)."""
    options = tuple(allowed)
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of names from {options}, got {value!r}")
    unknown = [v for v in value if v not in options]
    if unknown:
        raise ValueError(f"{name} has unknown entries {unknown}; allowed: {options}")
    return tuple(value)


def batches_source(name: str, value: Any) -> Any:
    """An iterable of batches (a DataLoader, a list); refuses numbers, strings, tensors and empty sized ones."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, Tensor)) or not isinstance(value, Iterable):
        raise ValueError(
            f"{name} must be an iterable of batches (a DataLoader or a list of batches), got {type(value).__name__}"
        )
    if isinstance(value, Sized) and len(value) == 0:
        raise ValueError(f"{name} is empty: it must give at least one batch")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
