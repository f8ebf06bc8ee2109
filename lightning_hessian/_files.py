"""Small file helpers shared by the writers: atomic writes, and JSON-safe values."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

TEMP_SUFFIX = ".lh-tmp"


def _file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0o666 less the process umask (usually 0o644)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write`` on a temporary file next to ``path``, then ``os.replace`` it into place.

    A crash or an error never leaves a half-written file behind; the temporary file is removed
    (and one left by a killed process is removed by :func:`remove_leftover_temporaries`). The
    file gets the permissions the loggers' own files get (``mkstemp`` alone would give 0o600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_leftover_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files that :func:`atomic_write` left in ``directory`` when its process was killed."""
    removed = []
    if directory.is_dir():
        for tmp in directory.glob(f".*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` and NumPy scalars as Python numbers, recursively."""
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
