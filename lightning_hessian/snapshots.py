"""Landscape snapshots as plain files: one ``.npz`` per snapshot (arrays plus JSON metadata), written atomically.

Layout: ``<run dir>/landscape/<prefix>/step_<step:09d>.npz``. Each file holds, for every plane
``P`` (``random``, ``hessian``): ``P/alphas``, ``P/betas``, ``P/losses`` and optionally
``P/val_losses``; for every 1-D cut ``L`` (``v_max``, ``v_min``): ``line/L/ts``, ``line/L/losses``
and optionally ``line/L/val_losses``; and ``meta``, a JSON string with the step, epoch, the
scalar indicators and each plane's and line's metadata. Nothing but NumPy is needed to read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_hessian._files import atomic_write, json_safe
from lightning_hessian.landscape import Line, Surface

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    """Everything measured for one landscape frame."""

    step: int
    epoch: int
    planes: dict[str, Surface]
    lines: dict[str, Line] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def snapshot_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}.npz"


def save_snapshot(directory: Path, snapshot: Snapshot) -> Path:
    """Write ``snapshot`` to ``directory`` atomically (temporary file, then ``os.replace``); return the path."""
    arrays: dict[str, np.ndarray] = {}
    planes_meta: dict[str, Any] = {}
    for kind, s in snapshot.planes.items():
        for key, value in s.to_arrays().items():
            arrays[f"{kind}/{key}"] = value
        planes_meta[kind] = {
            "kind": s.kind,
            "center_loss": s.center_loss,
            "d1_norm": s.d1_norm,
            "d2_norm": s.d2_norm,
            "labels": list(s.labels),
            "eigenvalues": None if s.eigenvalues is None else list(s.eigenvalues),
            "n_loss": s.n_loss,
            "seconds": s.seconds,
            "meta": s.meta,
        }
    lines_meta: dict[str, Any] = {}
    for name, line in snapshot.lines.items():
        arrays[f"line/{name}/ts"] = line.ts
        arrays[f"line/{name}/losses"] = line.losses
        if line.val_losses is not None:
            arrays[f"line/{name}/val_losses"] = line.val_losses
        lines_meta[name] = {"label": line.label, "d_norm": line.d_norm}
    meta = {
        "format_version": FORMAT_VERSION,
        "step": snapshot.step,
        "epoch": snapshot.epoch,
        "scalars": snapshot.scalars,
        "planes": planes_meta,
        "lines": lines_meta,
        "meta": snapshot.meta,
    }
    arrays["meta"] = np.array(json.dumps(json_safe(meta)))
    target = snapshot_path(Path(directory), snapshot.step)
    atomic_write(target, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]
    return target


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def load_snapshot(path: Path) -> Snapshot:
    """Read a snapshot written by :func:`save_snapshot`."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {k: data[k] for k in data.files if k != "meta"}
    planes = {}
    for kind, m in meta["planes"].items():
        planes[kind] = Surface(
            alphas=arrays[f"{kind}/alphas"],
            betas=arrays[f"{kind}/betas"],
            losses=arrays[f"{kind}/losses"],
            val_losses=arrays.get(f"{kind}/val_losses"),
            kind=m["kind"],
            center_loss=_num(m["center_loss"]),
            d1_norm=_num(m["d1_norm"]),
            d2_norm=_num(m["d2_norm"]),
            labels=(m["labels"][0], m["labels"][1]),
            eigenvalues=None if m["eigenvalues"] is None else (_num(m["eigenvalues"][0]), _num(m["eigenvalues"][1])),
            n_loss=int(m["n_loss"]),
            seconds=_num(m["seconds"]),
            meta=m.get("meta") or {},
        )
    lines = {
        name: Line(
            ts=arrays[f"line/{name}/ts"],
            losses=arrays[f"line/{name}/losses"],
            val_losses=arrays.get(f"line/{name}/val_losses"),
            label=m["label"],
            d_norm=_num(m["d_norm"]),
        )
        for name, m in meta["lines"].items()
    }
    scalars = {k: _num(v) for k, v in meta["scalars"].items()}
    return Snapshot(
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        planes=planes,
        lines=lines,
        scalars=scalars,
        meta=meta.get("meta") or {},
    )


def list_snapshots(directory: Path) -> list[Path]:
    """Snapshot files of a directory, in step order."""
    return sorted(Path(directory).glob("step_*.npz"))
