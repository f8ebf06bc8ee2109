"""HessianMonitor's logging: the right values, at exactly the scheduled steps, in every logger.

The end-to-end test trains once with a CSV, a TensorBoard and an offline W&B logger at the same
time and reads each back with the format's own reader (``csv``, TensorBoard's
``EventAccumulator``, ``wandb leet inspect`` plus a protobuf decode of the ``.wandb`` log), then
checks the last logged extremal eigenvalues against the dense float64 Hessian of the user's probe
loss at the final weights.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.logger import Logger

from lightning_hessian import HessianMonitor
from lightning_hessian.instruments import Eigenvalues, Trace
from lightning_models import TanhModule, dense_spectrum_at, probe_loader, probe_loss, train_loader, trainer_kwargs
from logreader_utils import (
    csv_series,
    multiline_charts,
    tensorboard_accumulator,
    tensorboard_layouts,
    tensorboard_series,
    wandb_history,
    wandb_history_from_log,
    wandb_offline_run,
    wandb_series,
)

BATCHES_PER_EPOCH = 6  # train_loader(): 192 samples in batches of 32
EIGEN_KEYS = ("lambda_max", "lambda_min")


def expected_steps(
    max_steps: int,
    every_n_steps: int,
    at_fit_start: bool,
    at_fit_end: bool,
    every_n_epochs: int | None = None,
) -> list[int]:
    """The schedule rules, as optimizer steps: 0 at fit start, every n steps, the end of every n-th
    epoch, the final step; a step is measured once however many rules select it."""
    steps = {0} if at_fit_start else set()
    steps |= set(range(every_n_steps, max_steps + 1, every_n_steps))
    if every_n_epochs is not None:
        steps |= set(range(every_n_epochs * BATCHES_PER_EPOCH, max_steps + 1, every_n_epochs * BATCHES_PER_EPOCH))
    if at_fit_end:
        steps.add(max_steps)
    return sorted(steps)


def make_monitor(every_n_steps: int = 3, **kwargs: Any) -> HessianMonitor:
    """A monitor on the user probe loader and loss, on a step schedule (plus fit start and end)."""
    options: dict[str, Any] = dict(
        every_n_steps=every_n_steps,
        every_n_epochs=None,
        at_fit_start=True,
        at_fit_end=True,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
        on_error="raise",
        budget=None,
        instruments=[Eigenvalues(lambda_min_every=1), Trace()],
    )
    options.update(kwargs)
    return HessianMonitor(**options)


def extremal_chart_of(charts: dict[str, list[str]], prefix: str) -> list[str]:
    """Titles of the multiline charts whose tag regexes pick up both ``prefix/lambda_max`` and ``prefix/lambda_min``."""
    return [
        title
        for title, regexes in charts.items()
        if all(any(re.search(rx, f"{prefix}/{key}") for rx in regexes) for key in EIGEN_KEYS)
    ]


def jsonl_steps(path: Path) -> list[int]:
    return [int(json.loads(line)["step"]) for line in path.read_text().splitlines()]


class RecordingLogger(Logger):
    """Records every ``log_metrics`` call with the trainer's ``global_step`` at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: pl.Trainer | None = None
        self.calls: list[tuple[int | None, int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        assert self.trainer is not None
        self.calls.append((step, int(self.trainer.global_step), dict(metrics)))

    def calls_with(self, prefix: str) -> list[tuple[int | None, int, dict[str, float]]]:
        return [c for c in self.calls if any(k.startswith(prefix + "/") for k in c[2])]


def test_three_loggers_match_dense_hessian_at_exact_steps(tmp_path: Path, wandb_offline: Any) -> None:
    """CSV, TensorBoard and W&B offline hold lambda_max/min at exactly the scheduled steps; the last
    values match the dense Hessian of the probe loss at the final weights to 1e-3 of the spectral width."""
    from pytorch_lightning.loggers import WandbLogger

    max_steps, every = 10, 3
    assert max_steps > BATCHES_PER_EPOCH  # the schedule runs across an epoch boundary
    steps = expected_steps(max_steps, every, at_fit_start=True, at_fit_end=True)
    assert steps == [0, 3, 6, 9, 10]

    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-hessian-test")
    monitor = make_monitor(every)
    model = TanhModule()
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_steps=max_steps,
            max_epochs=None,
            logger=[csv_logger, tb_logger, wandb_logger],
            callbacks=[monitor],
        )
    )
    try:
        trainer.fit(model, train_loader())
    finally:
        wandb_offline.finish()  # WandbLogger.finalize does not finish the run; the log is complete after this
    assert trainer.global_step == max_steps

    # Ground truth: the dense float64 Hessian of the user's loss on the probe set, at the final weights.
    dense_max, dense_min = dense_spectrum_at(model, probe_loader())
    width = dense_max - dense_min
    assert width > 0
    assert [int(r["step"]) for r in monitor.history] == steps
    last = monitor.history[-1]
    assert abs(last["lambda_max"] - dense_max) <= 1e-3 * width, (last["lambda_max"], dense_max, width)
    assert abs(last["lambda_min"] - dense_min) <= 1e-3 * width, (last["lambda_min"], dense_min, width)

    # CSV: exact floats, one row per measurement.
    csv_path = Path(csv_logger.log_dir) / "metrics.csv"
    logged: dict[str, list[tuple[int, float]]] = {}
    for key in EIGEN_KEYS:
        series = csv_series(csv_path, f"hessian/{key}")
        assert [s for s, _ in series] == steps, key
        assert [v for _, v in series] == [r[key] for r in monitor.history], key
        logged[key] = series
    for key, dense in zip(EIGEN_KEYS, (dense_max, dense_min)):
        assert abs(logged[key][-1][1] - dense) <= 1e-3 * width, (key, logged[key][-1][1], dense)
    for key in ("negative_ratio", "trace", "trace_stderr", "trace_lower", "trace_upper", "hvp_count", "skipped"):
        assert [s for s, _ in csv_series(csv_path, f"hessian/{key}")] == steps, key
    # A run constant is logged once, not as a flat curve at every step.
    assert csv_series(csv_path, "hessian/num_params") == [(0, float(sum(p.numel() for p in model.parameters())))]

    # The JSONL record next to the first logger's files.
    assert jsonl_steps(Path(csv_logger.log_dir) / "hessian" / "hessian.jsonl") == steps

    # TensorBoard, read with its own EventAccumulator (float32 storage).
    acc = tensorboard_accumulator(tb_logger.log_dir)
    for key in EIGEN_KEYS:
        series = tensorboard_series(acc, f"hessian/{key}")
        assert [s for s, _ in series] == steps, key
        for (_, got), (_, want) in zip(series, logged[key]):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7), key
    layouts = tensorboard_layouts(acc)
    assert len(layouts) == 1, "one custom-scalars layout per run"
    charts = multiline_charts(layouts[0])
    assert extremal_chart_of(charts, "hessian"), charts

    # W&B offline: wandb's own reader, cross-checked against a protobuf decode of the transaction log.
    run_dir = wandb_offline_run(tmp_path)
    rows = wandb_history(run_dir)
    assert _same_rows(rows, wandb_history_from_log(run_dir))
    for key in EIGEN_KEYS:
        assert wandb_series(rows, f"hessian/{key}") == logged[key], key


def _same_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Row-wise equality where NaN equals NaN."""

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        return bool(x == y)

    return len(a) == len(b) and all(r.keys() == s.keys() and all(same(r[k], s[k]) for k in r) for r, s in zip(a, b))


def test_logs_once_per_step_at_global_step(tmp_path: Path) -> None:
    """One log_metrics call per measured step, with step == trainer.global_step, even where the step
    schedule, an epoch end (step 6) and the end of fit (step 9) select the same step."""
    recorder = RecordingLogger()
    monitor = make_monitor(3, every_n_epochs=1)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=9, max_epochs=None, logger=[recorder], callbacks=[monitor])
    )
    recorder.trainer = trainer
    trainer.fit(TanhModule(), train_loader())

    steps = expected_steps(9, 3, at_fit_start=True, at_fit_end=True, every_n_epochs=1)
    assert steps == [0, 3, 6, 9]
    calls = recorder.calls_with("hessian")
    assert [c[0] for c in calls] == steps
    for step, global_step, metrics in calls:
        assert step == global_step
        assert {f"hessian/{k}" for k in (*EIGEN_KEYS, "trace", "hvp_count", "seconds")} <= set(metrics)
        assert ("hessian/num_params" in metrics) == (step == 0)  # a run constant: logged once
        assert all(isinstance(v, float) for v in metrics.values())
    assert [int(r["step"]) for r in monitor.history] == steps


def test_only_rank_zero_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a process that is not global rank zero the monitor measures but sends nothing to loggers."""
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    recorder = RecordingLogger()
    monitor = make_monitor(3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, logger=[recorder], callbacks=[monitor]))
    recorder.trainer = trainer
    trainer.fit(TanhModule(), train_loader())

    assert [int(r["step"]) for r in monitor.history] == expected_steps(4, 3, True, True)
    assert recorder.calls_with("hessian") == []
    assert recorder.calls, "the module's own train_loss still reaches the logger"
    assert list(tmp_path.rglob("*.jsonl")) == [], "no measurement file either"


def test_two_monitors_own_keys_and_one_merged_layout(tmp_path: Path) -> None:
    """Two monitors with distinct prefixes log their own keys; TensorBoard gets one layout with both."""
    recorder = RecordingLogger()
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    whole = make_monitor(3)
    layer = make_monitor(2, prefix="hess_layer", params="net.4.*", instruments=[Eigenvalues()])
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=4, logger=[recorder, tb_logger], callbacks=[whole, layer])
    )
    recorder.trainer = trainer
    model = TanhModule()
    trainer.fit(model, train_loader())

    n_all = sum(p.numel() for p in model.parameters())
    n_layer = sum(p.numel() for p in model.net[4].parameters())
    for prefix, every, n in (("hessian", 3, n_all), ("hess_layer", 2, n_layer)):
        calls = recorder.calls_with(prefix)
        assert [c[0] for c in calls] == expected_steps(4, every, True, True), prefix
        other = "hess_layer" if prefix == "hessian" else "hessian"
        for step, global_step, metrics in calls:
            assert step == global_step
            assert all(k.startswith(prefix + "/") for k in metrics), (prefix, sorted(metrics))
            assert not any(k.startswith(other + "/") for k in metrics)
            assert metrics.get(f"{prefix}/num_params", n) == n
    assert "hess_layer/trace" not in {k for c in recorder.calls for k in c[2]}

    acc = tensorboard_accumulator(tb_logger.log_dir)
    layouts = tensorboard_layouts(acc)
    assert len(layouts) == 1, "a single merged layout per run"
    charts = multiline_charts(layouts[0])
    for prefix in ("hessian", "hess_layer"):
        assert extremal_chart_of(charts, prefix), (prefix, charts)
    # A chart of one prefix must not pick up the other's series.
    for tags in charts.values():
        hits = {p for p in ("hessian", "hess_layer") if any(re.search(rx, f"{p}/lambda_max") for rx in tags)}
        assert len(hits) <= 1, tags
    assert [s for s, _ in tensorboard_series(acc, "hess_layer/lambda_max")] == expected_steps(4, 2, True, True)


def test_no_logger_still_measures(tmp_path: Path) -> None:
    """logger=False: trainer.loggers is empty, the monitor measures on schedule and writes its JSONL."""
    monitor = make_monitor(3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, logger=False, callbacks=[monitor]))
    assert trainer.loggers == []
    trainer.fit(TanhModule(), train_loader())

    steps = expected_steps(4, 3, True, True)
    assert [int(r["step"]) for r in monitor.history] == steps
    assert all(math.isfinite(r["lambda_max"]) and math.isfinite(r["lambda_min"]) for r in monitor.history)
    assert jsonl_steps(tmp_path / "hessian" / "hessian.jsonl") == steps
