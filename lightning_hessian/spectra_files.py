"""Spectral densities and block spectra as plain files, so their pictures can be re-rendered later.

Layout under a directory (for example ``<run dir>/density/<prefix>/``):

* ``step_<step:09d>.npz``: a density measurement: ``nodes``, ``weights``, ``residuals``
  (``(n_starts, steps)``, NaN-padded) and ``meta``, a JSON string with the step, the scalars of
  the :class:`~lightning_hessian.density.DensityEstimate` and optional ``lambda_min`` /
  ``lambda_max`` measured at the same step (drawn on the pictures);
* ``blocks_<step:09d>.json``: a block spectrum: per block its name, size, trace, standard error,
  ``lambda_max`` and error bound (``null`` when not measured).

Files are written atomically; nothing but NumPy and ``json`` is needed to read them.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_hessian._files import atomic_write, json_safe
from lightning_hessian.blocks import BlockSpectrum
from lightning_hessian.density import DensityEstimate

FORMAT_VERSION = 1
_DENSITY = re.compile(r"step_(\d+)\.npz$")
_BLOCKS = re.compile(r"blocks_(\d+)\.json$")


@dataclass(frozen=True)
class DensityRecord:
    """One saved density measurement: the estimate plus what the pictures mark."""

    step: int
    estimate: DensityEstimate
    lambda_min: float | None = None
    lambda_max: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_density(
    directory: Path | str,
    step: int,
    estimate: DensityEstimate,
    *,
    lambda_min: float | None = None,
    lambda_max: float | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``step_<step>.npz`` in ``directory`` atomically; return its path."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    header = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "lambda_min": lambda_min,
        "lambda_max": lambda_max,
        "scalars": estimate.scalars(),
        "meta": meta or {},
    }
    arrays = estimate.to_arrays()

    def write(fh: Any) -> None:
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(json_safe(header))), **arrays)  # type: ignore[arg-type]
        fh.write(buf.getvalue())

    return atomic_write(Path(directory) / f"step_{step:09d}.npz", write)


def load_density(path: Path | str) -> DensityRecord:
    """Read a file written by :func:`save_density`."""
    with np.load(Path(path), allow_pickle=False) as data:
        header = json.loads(str(data["meta"]))
        arrays = {k: np.asarray(data[k]) for k in ("nodes", "weights", "residuals")}
    return DensityRecord(
        step=int(header["step"]),
        estimate=DensityEstimate.from_arrays(arrays, header.get("scalars", {})),
        lambda_min=header.get("lambda_min"),
        lambda_max=header.get("lambda_max"),
        meta=header.get("meta", {}),
    )


def list_densities(directory: Path | str) -> list[Path]:
    """The density files of ``directory``, by step."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step_*.npz") if (m := _DENSITY.search(p.name))]
    return [p for _, p in sorted(found)]


def save_blocks(directory: Path | str, step: int, result: BlockSpectrum) -> Path:
    """Write ``blocks_<step>.json`` in ``directory`` atomically; return its path."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    payload = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "trace": result.trace,
        "trace_stderr": result.trace_stderr,
        "n_samples": result.n_samples,
        "n_hvp": result.n_hvp,
        "tol": result.tol,
        "blocks": [
            {
                "name": b.name,
                "num_params": b.num_params,
                "trace": b.trace,
                "trace_stderr": b.trace_stderr,
                "lambda_max": b.lambda_max if b.measured else None,
                "error_bound": b.error_bound if b.measured else None,
                "converged": b.converged,
                "n_hvp": b.n_hvp,
            }
            for b in result.blocks
        ],
    }
    text = json.dumps(json_safe(payload), indent=1).encode()
    return atomic_write(Path(directory) / f"blocks_{step:09d}.json", lambda fh: fh.write(text))


def load_blocks(path: Path | str) -> dict[str, Any]:
    """Read a file written by :func:`save_blocks` (a plain dict; ``null`` values are ``None``)."""
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def list_blocks(directory: Path | str) -> list[Path]:
    """The block-spectrum files of ``directory``, by step."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("blocks_*.json") if (m := _BLOCKS.search(p.name))]
    return [p for _, p in sorted(found)]
