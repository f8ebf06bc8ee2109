"""Read back what the loggers wrote: a CSV metrics file, TensorBoard event files and a W&B offline run.

Each reader uses the format's own tooling where there is one:

- CSV: the standard ``csv`` module on Lightning's ``metrics.csv``.
- TensorBoard: ``EventAccumulator`` (TensorBoard's reader) for scalars and for the custom-scalars
  layout (the ``custom_scalars__config__`` tensor, parsed as ``layout_pb2.Layout`` as the plugin does).
- W&B: wandb 0.31 has no Python reader of the ``run-*.wandb`` transaction log any more (the old
  ``wandb.sdk.internal.datastore.DataStore`` is gone; wandb-core writes the log). The supported
  way to read it offline is the CLI ``wandb leet inspect --json <file>`` (one JSON line per
  record); :func:`wandb_history` runs it. :func:`wandb_history_from_log` is an independent
  cross-check: it decodes the LevelDB-style log (7-byte header ``:W&B``, 0xBEE1, version 0; 32 KiB
  blocks of records ``crc32 | length | type | data``) and parses each record with
  ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

Series = list[tuple[int, float]]

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# ---------------------------------------------------------------------------- CSV
def csv_series(metrics_csv: str | Path, key: str) -> Series:
    """``(step, value)`` for every row of Lightning's ``metrics.csv`` where ``key`` has a value."""
    with open(metrics_csv, newline="") as fh:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(fh) if row.get(key, "") != ""]


# ---------------------------------------------------------------------------- TensorBoard
def tensorboard_accumulator(log_dir: str | Path) -> Any:
    """A loaded ``EventAccumulator`` over every event file in ``log_dir``, keeping all events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tensorboard_series(acc: Any, tag: str) -> Series:
    return [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]


def tensorboard_layouts(acc: Any) -> list[Any]:
    """Every custom-scalars layout written to the run, as ``layout_pb2.Layout`` protos."""
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    if metadata.CONFIG_SUMMARY_TAG not in acc.Tags().get("tensors", []):
        return []
    layouts = []
    for event in acc.Tensors(metadata.CONFIG_SUMMARY_TAG):
        layout = layout_pb2.Layout()
        layout.ParseFromString(tensor_util.make_ndarray(event.tensor_proto).item())
        layouts.append(layout)
    return layouts


def multiline_charts(layout: Any) -> dict[str, list[str]]:
    """``{chart title: tag regexes}`` for every multiline chart of a layout."""
    return {
        chart.title: list(chart.multiline.tag)
        for category in layout.category
        for chart in category.chart
        if chart.WhichOneof("content") == "multiline"
    }


# ---------------------------------------------------------------------------- Weights & Biases
def wandb_offline_run(save_dir: str | Path) -> Path:
    """The single ``<save_dir>/wandb/offline-run-*`` directory."""
    runs = sorted(Path(save_dir).glob("wandb/offline-run-*"))
    if len(runs) != 1:
        raise FileNotFoundError(f"expected one offline run under {save_dir}/wandb, found {runs}")
    return runs[0]


def wandb_log_file(run: str | Path) -> Path:
    """The ``run-*.wandb`` transaction log of a run directory (or the file itself)."""
    run = Path(run)
    if run.is_file():
        return run
    files = sorted(run.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb file in {run}, found {files}")
    return files[0]


def _decode(value: Any) -> Any:
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def wandb_history(run: str | Path) -> list[dict[str, Any]]:
    """History rows of an offline run through ``wandb leet inspect --json`` (wandb's own reader)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_log_file(run))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    rows = []
    for line in out.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            rows.append({k: _decode(v) for k, v in record["history"]["item"].items()})
    return rows


_BLOCK = 32768
_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_RECORD = struct.Struct("<IHB")  # crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str | Path) -> list[bytes]:
    """The serialized records of a ``.wandb`` transaction log, checksums verified."""
    data = Path(path).read_bytes()
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B transaction log (header {ident!r}, {magic:#x}, {version})")
    seeds = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}
    records: list[bytes] = []
    pending = b""
    pos = _HEADER.size
    while pos + _RECORD.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD.size:  # block trailer: zero padding
            pos += left
            continue
        checksum, length, kind = _RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:  # preallocated zeros at the end of the file
            break
        chunk = data[pos + _RECORD.size : pos + _RECORD.size + length]
        pos += _RECORD.size + length
        if kind not in seeds or zlib.crc32(chunk, seeds[kind]) != checksum:
            raise ValueError(f"{path}: corrupt record at offset {pos - length - _RECORD.size}")
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        else:
            records.append(pending + chunk)
            pending = b""
    return records


def wandb_history_from_log(run: str | Path) -> list[dict[str, Any]]:
    """History rows decoded from the transaction log with ``wandb_internal_pb2.Record`` (no wandb-core)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in wandb_records(wandb_log_file(run)):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (item.key or "/".join(item.nested_key)): _decode(json.loads(item.value_json))
                    for item in record.history.item
                }
            )
    return rows


def wandb_series(rows: list[dict[str, Any]], key: str, step_key: str = "trainer/global_step") -> Series:
    """``(step, value)`` of the history rows holding ``key``, in logging order."""
    return [(int(row[step_key]), float(row[key])) for row in rows if key in row]
