"""HessianMonitor's guarantees: training untouched, the schedule, the probe loss, errors isolated, config checked."""

from __future__ import annotations

import csv
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor

from lightning_hessian import HessianMonitor
from lightning_models import (
    BNDropoutModule,
    ManualOptimModule,
    TanhModule,
    dense_spectrum_at,
    probe_loader,
    probe_loss,
    train_loader,
    trainer_kwargs,
)


def _fit(tmp_path: Path, module: pl.LightningModule, callbacks: list[Any], **overrides: Any) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=callbacks)
    trainer.fit(module, train_loader())
    return trainer


def _steps(monitor: HessianMonitor) -> list[int]:
    return [int(h["step"]) for h in monitor.history]


@pytest.mark.parametrize(
    "monitor_kwargs",
    [
        {},  # probe batches captured from the training loop, eval-mode operator
        {"probe_dataloader": "probe", "mode": "batch_stats", "every_n_steps": 2},
        {
            "quantities": ["eigenvalues", "lambda_min", "trace", "slope_fit"],
            "every_n_steps": 3,
            "hvp": "double_backward",
        },
    ],
)
def test_training_is_bit_identical_with_monitor(tmp_path: Path, monitor_kwargs: dict[str, Any]) -> None:
    """BatchNorm, dropout, a shuffled loader, momentum SGD: weights and buffers equal bit for bit."""
    kwargs = dict(monitor_kwargs)
    if kwargs.get("probe_dataloader") == "probe":
        kwargs["probe_dataloader"] = probe_loader()

    def run(callbacks: list[Any]) -> dict[str, Tensor]:
        pl.seed_everything(7, verbose=False)
        module = BNDropoutModule()
        _fit(tmp_path, module, callbacks, max_epochs=3)
        return {k: v.clone() for k, v in module.state_dict().items()}

    without = run([])
    monitor = HessianMonitor(**kwargs)
    with_monitor = run([monitor])
    assert len(monitor.history) >= 3, "the monitor must actually have measured"
    assert without.keys() == with_monitor.keys()
    for key, value in without.items():
        assert torch.equal(value, with_monitor[key]), f"{key} differs with the monitor"


def test_schedule_counts_optimizer_steps_under_gradient_accumulation(tmp_path: Path) -> None:
    monitor = HessianMonitor(
        every_n_steps=2,
        every_n_epochs=None,
        at_fit_start=True,
        at_fit_end=True,
        probe_batches=1,
        quantities=["eigenvalues"],
    )
    trainer = _fit(tmp_path, TanhModule(), [monitor], max_epochs=2, accumulate_grad_batches=2)
    # 6 batches per epoch, 3 optimizer steps per epoch: steps 0 (start), 2, 4, 6 (end = 6, already measured).
    assert trainer.global_step == 6
    assert _steps(monitor) == [0, 2, 4, 6]


def test_schedule_with_two_manual_optimizers_uses_step_distance(tmp_path: Path) -> None:
    monitor = HessianMonitor(
        every_n_steps=3,
        every_n_epochs=None,
        at_fit_start=False,
        at_fit_end=False,
        probe_batches=1,
        quantities=["eigenvalues"],
        loss_fn=probe_loss,
    )
    trainer = _fit(tmp_path, ManualOptimModule(), [monitor], max_epochs=1)
    # global_step advances by 2 per batch (two optimizers): 2, 4, 6, ... ; distance >= 3 from the last slot.
    assert trainer.global_step == 12
    assert _steps(monitor) == [4, 8, 12]


def test_manual_optimization_without_a_loss_fails_at_setup_with_a_hint(tmp_path: Path) -> None:
    class NoLoss(ManualOptimModule):
        pass

    with pytest.raises(ValueError, match=r"manual optimization.*loss_fn=.*hessian_loss"):
        _fit(tmp_path, NoLoss(), [HessianMonitor()], max_epochs=1)


def test_hessian_loss_method_is_used_under_manual_optimization(tmp_path: Path) -> None:
    class WithLoss(ManualOptimModule):
        def hessian_loss(self, batch: Any) -> Tensor:
            return probe_loss(self, batch)

    monitor = HessianMonitor(every_n_epochs=1, probe_dataloader=probe_loader())
    module = WithLoss()
    _fit(tmp_path, module, [monitor], max_epochs=1)
    lmax, lmin = dense_spectrum_at(module, probe_loader())
    assert monitor.history[-1]["lambda_max"] == pytest.approx(lmax, rel=1e-4)
    assert abs(monitor.history[-1]["lambda_min"] - lmin) <= 1e-3 * (lmax - lmin)


def test_epoch_schedule_is_the_default_only_without_a_step_schedule() -> None:
    assert HessianMonitor().every_n_epochs == 1
    assert HessianMonitor(every_n_steps=10).every_n_epochs is None
    assert HessianMonitor(every_n_steps=10, every_n_epochs=2).every_n_epochs == 2
    assert HessianMonitor(every_n_epochs=None).every_n_epochs is None  # explicit: fit start and end only


def test_every_n_epochs_and_fit_end_do_not_repeat_a_step(tmp_path: Path) -> None:
    monitor = HessianMonitor(every_n_epochs=2, at_fit_start=False, probe_batches=2, quantities=["eigenvalues"])
    _fit(tmp_path, TanhModule(), [monitor], max_epochs=3)
    assert _steps(monitor) == [12, 18]  # end of epoch 2 (12 steps), then fit end


def test_never_measures_during_sanity_check_validate_or_test(tmp_path: Path) -> None:
    class WithValidation(TanhModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", probe_loss(self, batch))

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test_loss", probe_loss(self, batch))

    monitor = HessianMonitor(
        every_n_epochs=None,
        at_fit_start=False,
        at_fit_end=False,
        every_n_steps=100,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
    )
    module = WithValidation()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, num_sanity_val_steps=2), callbacks=[monitor])
    trainer.fit(module, train_loader(), probe_loader())
    trainer.validate(module, probe_loader(), verbose=False)
    trainer.test(module, probe_loader(), verbose=False)
    assert monitor.history == []


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_training_step_fallback_leaves_the_users_logged_metrics_identical(tmp_path: Path) -> None:
    def run(callbacks: list[Any], name: str) -> list[dict[str, str]]:
        pl.seed_everything(3, verbose=False)
        logger = CSVLogger(tmp_path, name=name)
        _fit(tmp_path, BNDropoutModule(), callbacks, max_epochs=2, logger=logger)
        rows = _read_csv(Path(logger.log_dir) / "metrics.csv")
        return [{k: v for k, v in r.items() if k.startswith("train_loss") and v} for r in rows]

    reference = run([], "plain")
    monitor = HessianMonitor(every_n_steps=2)  # no loss_fn, no hessian_loss: training_step, silenced
    observed = run([monitor], "monitored")
    assert len(monitor.history) > 3
    assert [r for r in observed if r] == [r for r in reference if r]


def _failing_loss(module: Any, batch: Any) -> Tensor:
    raise RuntimeError("boom in the probe loss")


def test_a_failing_measurement_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    pl.seed_everything(1, verbose=False)
    plain = BNDropoutModule()
    _fit(tmp_path, plain, [], max_epochs=1)
    pl.seed_everything(1, verbose=False)
    module = BNDropoutModule()
    monitor = HessianMonitor(every_n_epochs=1, at_fit_start=True, loss_fn=_failing_loss)
    with pytest.warns(UserWarning, match=r"failed and was skipped \(RuntimeError: boom in the probe loss\)"):
        _fit(tmp_path, module, [monitor], max_epochs=1)
    assert monitor.history == []
    for (k, a), b in zip(plain.state_dict().items(), module.state_dict().values()):
        assert torch.equal(a, b), k


def test_on_error_raise_re_raises(tmp_path: Path) -> None:
    monitor = HessianMonitor(loss_fn=_failing_loss, on_error="raise")
    with pytest.raises(RuntimeError, match="boom in the probe loss"):
        _fit(tmp_path, TanhModule(), [monitor], max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"every_n_epochs": -1}, "every_n_epochs must be a positive integer, None or 'auto'"),
        ({"every_n_epochs": "often"}, "every_n_epochs must be a positive integer, None or 'auto'"),
        ({"quantities": "trace"}, "quantities must be a list of names"),
        ({"quantities": None}, "quantities must be a list of names"),
        ({"quantities": ["eigenvalues", "hessian_norm"]}, "quantities must be a non-empty subset"),
        ({"quantities": ["lambda_min"]}, "'lambda_min' needs 'eigenvalues'"),
        ({"probe_batches": 0}, "probe_batches must be an integer >= 1"),
        ({"probe_batches": True}, r"probe_batches must be an integer >= 1, got True \(bool\)"),
        ({"loss_fn": "not callable"}, "loss_fn must be callable"),
        ({"hvp": "exact"}, "hvp must be one of 'auto'"),
        ({"mode": "train"}, "mode must be one of 'eval', 'batch_stats'"),
        ({"max_overhead": 0}, "max_overhead must be a finite positive number"),
        ({"max_overhead": True}, r"max_overhead must be a positive number, got True \(bool\)"),
        ({"on_error": "ignore"}, "on_error must be one of 'warn', 'raise'"),
        ({"prefix": "hessian/"}, "prefix must be a non-empty string"),
        ({"tol": 0.0}, "tol must be a finite positive number"),
        ({"tol": float("inf")}, "tol must be a finite positive number below 1.0, got inf"),
        ({"tol": "1e-3"}, r"tol must be a positive number, got '1e-3' \(str\)"),
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": True}, r"k must be an integer >= 1, got True \(bool\)"),
        ({"k": 10**6}, "cannot find k=1000000 eigenvalues.*lower k or raise max_hvp"),
        ({"trace_hvp": 2}, "trace_hvp must be an integer >= 3"),
        ({"seed": "a"}, "seed must be a non-negative integer, got 'a'"),
        ({"params": 3}, "params must be None .*, a glob string .*or a non-empty list of glob strings; got 3"),
        ({"params": []}, "params must be None .*got \\[\\]"),
        ({"probe_dataloader": 5}, "probe_dataloader must be an iterable of batches .*got int"),
        ({"probe_dataloader": []}, "probe_dataloader is empty"),
        ({"landscape_val_dataloader": 5}, "landscape_val_dataloader must be an iterable of batches"),
        ({"landscape_resolution": 100001}, "landscape_resolution must be an integer >= 3 and <= 201"),
        ({"landscape_planes": ["random", "pca"]}, "landscape_planes has unknown entries"),
        ({"at_fit_start": "yes"}, "at_fit_start must be True or False"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HessianMonitor(**kwargs)


def _fake_trainer(strategy_name: str) -> Any:
    strategy = type(strategy_name, (), {})()
    return types.SimpleNamespace(strategy=strategy)


def test_unsupported_strategies_are_refused_at_setup_unless_allowed() -> None:
    module = TanhModule()
    with pytest.raises(ValueError, match=r"supports single-device and DDP.*got FSDPStrategy.*allow_untested=True"):
        HessianMonitor().setup(_fake_trainer("FSDPStrategy"), module, "fit")
    with pytest.raises(ValueError, match="got DeepSpeedStrategy"):
        HessianMonitor().setup(_fake_trainer("DeepSpeedStrategy"), module, "fit")
    with pytest.warns(UserWarning, match="got FSDPStrategy"):
        HessianMonitor(allow_untested=True).setup(_fake_trainer("FSDPStrategy"), module, "fit")
    HessianMonitor().setup(_fake_trainer("FSDPStrategy"), module, "validate")  # only fit is checked


class _UnloggedTanh(TanhModule):
    """torch 2.13's dynamo cannot compile Lightning's self.log, with or without the monitor."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return probe_loss(self, batch)


def test_compiled_module_is_measured_eagerly(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = _UnloggedTanh()
    monitor = HessianMonitor(every_n_epochs=1, probe_dataloader=probe_loader(), loss_fn=probe_loss)
    compiled = torch.compile(module, backend="aot_eager")
    _fit(tmp_path, compiled, [monitor], max_epochs=1)
    reference = _UnloggedTanh()  # an uncompiled twin with the trained weights, for the dense Hessian
    reference.load_state_dict(module.state_dict())
    lmax, lmin = dense_spectrum_at(reference, probe_loader())
    assert monitor.history[-1]["lambda_max"] == pytest.approx(lmax, rel=1e-4)
    assert abs(monitor.history[-1]["lambda_min"] - lmin) <= 1e-3 * (lmax - lmin)


def test_mixed_precision_training_is_measured_in_float32(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = TanhModule()
    monitor = HessianMonitor(every_n_epochs=1, probe_dataloader=probe_loader(), loss_fn=probe_loss)
    _fit(tmp_path, module, [monitor], max_epochs=1, precision="bf16-mixed")
    assert next(module.parameters()).dtype == torch.float32
    lmax, _ = dense_spectrum_at(module, probe_loader())
    # bfloat16 would give about 3 significant digits; float32 gives the dense value to 1e-4.
    assert monitor.history[-1]["lambda_max"] == pytest.approx(lmax, rel=1e-4)


def test_overhead_budget_skips_measurements_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monitor = HessianMonitor(every_n_steps=1, max_overhead=1e-9, probe_batches=1)
    with caplog.at_level("INFO"):
        trainer = _fit(tmp_path, TanhModule(), [monitor], max_epochs=1)
    assert _steps(monitor) == [0]  # the first is free (nothing to predict from), the rest exceed the budget
    # Every later attempt was skipped: the 6 step slots, then the fit end (at step 6).
    assert monitor._n_skipped == trainer.global_step + 1
    assert "skipped the measurement at step 1" in caplog.text


def test_results_are_available_on_the_callback(tmp_path: Path) -> None:
    monitor = HessianMonitor(every_n_epochs=1, probe_dataloader=probe_loader(), loss_fn=probe_loss, k=2)
    module = TanhModule()
    _fit(tmp_path, module, [monitor], max_epochs=1)
    last = monitor.last_measurement
    assert last is not None and last.eigen is not None and last.trace is not None
    assert last.metrics["lambda_max"] == monitor.history[-1]["lambda_max"] == last.eigen.lambda_max
    assert last.metrics["lambda_2"] == last.eigen.eigenvalues[1] <= last.eigen.lambda_max
    assert last.metrics["mean_curvature"] == pytest.approx(last.trace.value / last.num_params)
    assert last.num_params == sum(p.numel() for p in module.parameters())
    jsonl = Path(tmp_path) / "hessian" / "hessian.jsonl"
    assert len(jsonl.read_text().splitlines()) == len(monitor.history)


def test_unified_lightning_flavour_trains_and_measures(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning")
    from lightning_hessian.unified import HessianMonitor as UnifiedMonitor

    class Unified(lightning.pytorch.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TanhModule().net

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return probe_loss(self, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = UnifiedMonitor(every_n_epochs=1, probe_dataloader=probe_loader(), loss_fn=probe_loss)
    assert isinstance(monitor, lightning.pytorch.Callback) and not isinstance(monitor, pl.Callback)
    assert monitor.state_key == HessianMonitor().state_key  # checkpoints are interchangeable
    module = Unified()
    trainer = lightning.pytorch.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_loader())
    lmax, _ = dense_spectrum_at(module, probe_loader())
    assert monitor.history[-1]["lambda_max"] == pytest.approx(lmax, rel=1e-4)
