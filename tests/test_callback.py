"""HessianMonitor's guarantees: training untouched, the schedule, the probe loss, errors isolated, config checked."""

from __future__ import annotations

import csv
import platform
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
from lightning_hessian.instruments import Eigenvalues, Instrument, InstrumentOutput, Landscape, SlopeFitTrace, Trace
from lightning_hessian.instruments.base import StepContext
from lightning_models import (
    BNDropoutModule,
    ManualOptimModule,
    TanhModule,
    dense_hessian_at,
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
        {"budget": None},  # probe batches captured from the training loop, eval-mode operator, log-spaced
        {"budget": 0.5},  # a budget (thins the schedule, times an HVP, plans), captured probe
        {"probe_dataloader": "probe", "mode": "batch_stats", "every_n_steps": 2, "budget": None},
        {
            "instruments": [Eigenvalues(), Trace(), SlopeFitTrace()],
            "every_n_steps": 3,
            "hvp": "double_backward",
            "budget": None,
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
    if kwargs.get("budget") is None:
        assert len(monitor.history) >= 3, "the monitor must actually have measured"
    else:  # on a toy model 18 steps of training earn no measurement; the budget still planned and postponed
        assert monitor.scheduler.skipped > 0
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
        instruments=[Eigenvalues(lambda_min=False)],
        budget=None,
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
        instruments=[Eigenvalues(lambda_min=False)],
        loss_fn=probe_loss,
        budget=None,
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

    monitor = HessianMonitor(
        instruments=[Eigenvalues(tol=1e-5, lambda_min_every=1)],
        every_n_epochs=1,
        probe_dataloader=probe_loader(),
        budget=None,
    )
    module = WithLoss()
    _fit(tmp_path, module, [monitor], max_epochs=1)
    lmax, lmin = dense_spectrum_at(module, probe_loader())
    assert monitor.history[-1]["lambda_max"] == pytest.approx(lmax, rel=1e-4)
    assert abs(monitor.history[-1]["lambda_min"] - lmin) <= 1e-3 * (lmax - lmin)


def test_epoch_and_log_spaced_schedules_are_the_default_only_without_a_step_schedule() -> None:
    assert HessianMonitor().every_n_epochs == 1 and HessianMonitor().log_spaced
    assert HessianMonitor(every_n_steps=10).every_n_epochs is None
    assert not HessianMonitor(every_n_steps=10).log_spaced
    assert HessianMonitor(every_n_steps=10, every_n_epochs=2).every_n_epochs == 2
    assert HessianMonitor(every_n_epochs=None).every_n_epochs is None  # explicit: no epoch schedule


def test_every_n_epochs_and_fit_end_do_not_repeat_a_step(tmp_path: Path) -> None:
    monitor = HessianMonitor(
        every_n_epochs=2,
        log_spaced=False,
        at_fit_start=False,
        probe_batches=2,
        instruments=[Eigenvalues(lambda_min=False)],
        budget=None,
    )
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
    monitor = HessianMonitor(every_n_steps=2, budget=None)  # no loss_fn, no hessian_loss: training_step, silenced
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
    monitor = HessianMonitor(every_n_epochs=1, at_fit_start=True, loss_fn=_failing_loss, budget=None)
    with pytest.warns(UserWarning, match=r"failed and was skipped \(RuntimeError: boom in the probe loss\)"):
        _fit(tmp_path, module, [monitor], max_epochs=1)
    assert monitor.history == []
    for (k, a), b in zip(plain.state_dict().items(), module.state_dict().values()):
        assert torch.equal(a, b), k


def test_on_error_raise_re_raises(tmp_path: Path) -> None:
    monitor = HessianMonitor(loss_fn=_failing_loss, on_error="raise", budget=None)
    with pytest.raises(RuntimeError, match="boom in the probe loss"):
        _fit(tmp_path, TanhModule(), [monitor], max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"every_n_epochs": -1}, "every_n_epochs must be a positive integer, None or 'auto'"),
        ({"every_n_epochs": "often"}, "every_n_epochs must be a positive integer, None or 'auto'"),
        ({"instruments": []}, "instruments must be a non-empty list of instruments"),
        ({"instruments": Eigenvalues()}, "instruments must be a non-empty list"),
        ({"instruments": ["trace"]}, "instruments must be Instrument objects"),
        ({"probe_batches": 0}, "probe_batches must be an integer >= 1"),
        ({"probe_batches": True}, r"probe_batches must be an integer >= 1, got True \(bool\)"),
        ({"loss_fn": "not callable"}, "loss_fn must be callable"),
        ({"hvp": "exact"}, "hvp must be one of 'auto'"),
        ({"mode": "train"}, "mode must be one of 'eval', 'batch_stats'"),
        ({"budget": 0}, "budget must be a finite positive number below 1.0"),
        ({"budget": True}, r"budget must be a positive number, got True \(bool\)"),
        ({"on_error": "ignore"}, "on_error must be one of 'warn', 'raise'"),
        ({"prefix": "hessian/"}, "prefix must be a non-empty string"),
        ({"seed": "a"}, "seed must be a non-negative integer, got 'a'"),
        ({"params": 3}, "params must be None .*, a glob string .*or a non-empty list of glob strings; got 3"),
        ({"params": []}, "params must be None .*got \\[\\]"),
        ({"probe_dataloader": 5}, "probe_dataloader must be an iterable of batches .*got int"),
        ({"probe_dataloader": []}, "probe_dataloader is empty"),
        ({"log_spaced": "yes"}, "log_spaced must be True or False"),
        ({"at_fit_start": "yes"}, "at_fit_start must be True or False"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HessianMonitor(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Eigenvalues(tol=0.0), "tol must be a finite positive number"),
        (lambda: Eigenvalues(tol=float("inf")), "tol must be a finite positive number below 1.0, got inf"),
        (lambda: Eigenvalues(tol="1e-3"), r"tol must be a positive number, got '1e-3' \(str\)"),
        (lambda: Eigenvalues(k=0), "k must be an integer >= 1"),
        (lambda: Eigenvalues(k=True), r"k must be an integer >= 1, got True \(bool\)"),
        (lambda: Eigenvalues(k=10**6), "cannot find k=1000000 eigenvalues.*lower k or raise max_hvp"),
        (lambda: Eigenvalues(lambda_min="yes"), "lambda_min must be True or False"),
        (lambda: Trace(n_hvp=2), "n_hvp must be an integer >= 3"),
        (lambda: Trace(method="exact"), "method must be one of 'hutch\\+\\+', 'hutchinson'"),
        (lambda: SlopeFitTrace(directions=1), "directions must be an integer >= 2"),
        (lambda: Landscape(val_dataloader=5), "val_dataloader must be an iterable of batches"),
        (lambda: Landscape(resolution=100001), "resolution must be an integer >= 3 and <= 201"),
        (lambda: Landscape(planes=["random", "pca"]), "planes has unknown entries"),
        (lambda: Landscape(log_scale="maybe"), "log_scale must be 'auto', True or False"),
        (lambda: Trace(every_n_steps=0), "every_n_steps must be an integer >= 1"),
    ],
)
def test_bad_instrument_options_fail_at_construction(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


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
    monitor = HessianMonitor(
        instruments=[Eigenvalues(tol=1e-5, lambda_min_every=1)],
        every_n_epochs=1,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
        budget=None,
    )
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
    monitor = HessianMonitor(
        instruments=[Eigenvalues(tol=1e-5, lambda_min_every=1)],
        every_n_epochs=1,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
        budget=None,
    )
    _fit(tmp_path, module, [monitor], max_epochs=1, precision="bf16-mixed")
    assert next(module.parameters()).dtype == torch.float32
    lmax, _ = dense_spectrum_at(module, probe_loader())
    # bfloat16 would give about 3 significant digits; float32 gives the dense value to 1e-4.
    assert monitor.history[-1]["lambda_max"] == pytest.approx(lmax, rel=1e-4)


class _FakeClock:
    """The monitor's wall clock, advanced by hand: the budget's arithmetic becomes exact on any machine."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _SlowInstrument(Instrument):
    """Takes ``seconds`` of the fake clock per run."""

    name = "slow"

    def __init__(self, clock: _FakeClock, seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock, self.seconds = clock, seconds

    def expected_hvps(self) -> float:
        return 0.1  # planned at 0.1 HVP x 2.5 steps x (128 probe / 32 batch samples) = 1.0 s before its first run

    def run(self, ctx: StepContext) -> InstrumentOutput:
        self.clock.now += self.seconds
        return InstrumentOutput({"slow_value": float(ctx.step)})


class _SlowSteps(pl.Callback):
    """Every training step takes one second of the fake clock."""

    def __init__(self, clock: _FakeClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock.now += 1.0


def _budgeted_on(clock: _FakeClock, instrument: Instrument) -> HessianMonitor:
    """A monitor of one instrument, due at every step, with a 25 % budget measured on the fake clock."""
    monitor = HessianMonitor(
        instruments=[instrument],
        every_n_steps=1,
        budget=0.25,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
        at_fit_end=False,
    )
    monitor._clock = clock
    return monitor


def test_budget_postpones_measurements_counts_them_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _FakeClock()
    monitor = _budgeted_on(clock, _SlowInstrument(clock, 2.0))
    with caplog.at_level("INFO"):
        trainer = _fit(tmp_path, TanhModule(), [_SlowSteps(clock), monitor], max_epochs=5)
    assert trainer.global_step == 30
    # Steps take 1 s, a measurement 2 s, the budget 25 %. The fit-start request waits for the first timed
    # step; its estimated cost (1.0 s) fits once 1.0 / 0.25 = 4 s of training have passed: step 4. The next
    # fits once (2 + 2) / 0.25 = 16 s have passed, the one after at (4 + 2) / 0.25 = 24 s, then
    # (6 + 2) / 0.25 = 32 s is past the end of the run.
    assert _steps(monitor) == [4, 16, 24]
    assert monitor.scheduler.slots["slow"].spent == 6.0 <= 0.25 * 30
    # Every step that was due (1..30) and not measured at its own step is counted as skipped.
    assert monitor.scheduler.skipped == 27
    assert monitor.history[-1]["skipped"] == 21  # logged with the step-24 measurement: 1-3, 5-15 and 17-23
    assert "postponed" in caplog.text and "hessian/skipped" in caplog.text


def test_the_first_run_says_what_it_cost_in_steps_and_when_the_budget_allows_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The curve's density is told, not left to be discovered: once per instrument, after its first run."""
    clock = _FakeClock()
    monitor = _budgeted_on(clock, _SlowInstrument(clock, 2.0))
    with caplog.at_level("INFO"):
        _fit(tmp_path, TanhModule(), [_SlowSteps(clock), monitor], max_epochs=5)
    assert _steps(monitor) == [4, 16, 24]
    # Steps of 1 s, a run of 2 s at step 4; the next fits at (2 + 2) / 0.25 = 16 s: 12 steps on; 6 steps an epoch.
    line = "slow took 2 s at step 4, about 2 training steps; within budget=0.25 its next run is planned from step 16"
    assert caplog.text.count(line) == 1
    assert "(12 steps on; an epoch is 6 steps)" in caplog.text
    assert caplog.text.count("its next run is") == 1  # not again at steps 16 and 24


def test_no_spacing_line_without_a_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = _FakeClock()
    monitor = _budgeted_on(clock, _SlowInstrument(clock, 2.0))
    monitor.budget = None
    monitor.scheduler = monitor._new_scheduler()
    with caplog.at_level("INFO"):
        _fit(tmp_path, TanhModule(), [_SlowSteps(clock), monitor], max_epochs=1)
    assert len(monitor.history) >= 6 and "its next run is" not in caplog.text


def test_the_monitors_own_time_outside_measurements_is_paid_from_the_budget(tmp_path: Path) -> None:
    """Writing a measurement (files, loggers) is the monitor's time too: it is not training time, and the
    budget pays it before the instrument's share."""
    clock = _FakeClock()
    monitor = _budgeted_on(clock, _SlowInstrument(clock, 2.0))
    publish = monitor._publish

    def slow_publish(*args: Any) -> None:
        publish(*args)
        clock.now += 1.0  # every write takes one second

    monitor._publish = slow_publish  # type: ignore[method-assign]
    _fit(tmp_path, TanhModule(), [_SlowSteps(clock), monitor], max_epochs=5)
    # First run (planned at 1.0 s) at 1.0 / 0.25 = 4 s: step 4, then 1 s of writing. The next fits at
    # (2 + 2) / 0.25 + 1 / 0.25 = 20 s of training (16 s if the writing were free), the one after at
    # (4 + 2) / 0.25 + 2 / 0.25 = 32 s: past the end.
    assert _steps(monitor) == [4, 20]
    assert monitor.budget_clock.overhead == 2.0
    assert monitor.budget_clock.train_seconds() == 30.0  # the 30 steps; neither measuring nor writing counts
    state = monitor.state_dict()
    assert state["overhead_seconds"] == 2.0
    resumed = _budgeted_on(clock, _SlowInstrument(clock, 2.0))
    resumed.load_state_dict(state)  # carried across a resume, like the training time
    assert resumed.budget_clock.overhead_seconds() == 2.0 and resumed.budget_clock.train_seconds() == 30.0


class _LargerThanExpected(_SlowInstrument):
    """Expects 0.1 HVP per run, and each run reports that it turned out to take 0.2."""

    name = "larger"

    def last_run_hvps(self) -> float | None:
        return 0.2


def test_the_budget_plans_the_next_run_from_what_the_last_one_turned_out_to_be(tmp_path: Path) -> None:
    clock = _FakeClock()
    monitor = _budgeted_on(clock, _LargerThanExpected(clock, 2.0))
    _fit(tmp_path, TanhModule(), [_SlowSteps(clock), monitor], max_epochs=5)
    # The first run (planned at 1.0 s) at step 4 costs 2 s for what it reports as 0.2 HVP; the next is
    # expected at 0.1, so it is planned at 2 x 0.1 / 0.2 = 1 s: (2 + 1) / 0.25 = 12 s, then 20 and 28 s.
    # With the expectation alone (0.1 / 0.1) it would be planned at 2 s: steps 4, 16, 24.
    assert _steps(monitor) == [4, 12, 20, 28]
    assert monitor.scheduler.slots["larger"].last_expected == 0.2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("env", [None, "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD"])
def test_cpu_training_on_dynamic_glibc_thresholds_is_told_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    """The allocator effect on later CPU steps is named once, and not when the thresholds are fixed or replaced."""
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("lightning_hessian.allocator._pinned", False)
    if env is not None:
        monkeypatch.setenv(env, "/usr/lib/libjemalloc.so.2" if env == "LD_PRELOAD" else "268435456")
    monitor = HessianMonitor(
        instruments=[Eigenvalues(lambda_min=False)],
        every_n_steps=3,
        budget=None,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
    )
    with caplog.at_level("INFO"):
        _fit(tmp_path, TanhModule(), [monitor], max_epochs=1)
    assert len(monitor.history) >= 2
    assert caplog.text.count("glibc's dynamic malloc thresholds") == (1 if env is None else 0)


class _AlternatingInstrument(_SlowInstrument):
    """Runs alternate between a cheap kind (1 s, expected 0.1 HVP) and an expensive one (4 s, expected 0.4)."""

    name = "alternating"

    def __init__(self, clock: _FakeClock) -> None:
        super().__init__(clock, 1.0)
        self.runs = 0

    def expected_hvps(self) -> float:
        return 0.4 if self.runs % 2 else 0.1

    def run(self, ctx: StepContext) -> InstrumentOutput:
        self.seconds = 4.0 if self.runs % 2 else 1.0
        self.runs += 1
        return super().run(ctx)


def test_budget_plans_a_cheap_run_after_an_expensive_one_as_cheap(tmp_path: Path) -> None:
    """The next run's cost is the last one's scaled by the expected HVPs (lambda_max after a lambda_min run)."""
    clock = _FakeClock()
    monitor = _budgeted_on(clock, _AlternatingInstrument(clock))
    _fit(tmp_path, TanhModule(), [_SlowSteps(clock), monitor], max_epochs=5)
    # First run (cheap, planned at 1.0 s) fits at 1.0 / 0.25 = 4 s: step 4. The next is expensive: 1 s x 4 = 4 s,
    # fits at (1 + 4) / 0.25 = 20 s. The next is cheap again: 4 s x 0.1 / 0.4 = 1 s, fits at (5 + 1) / 0.25 = 24 s
    # (planned with the expensive run's 4 s it would wait until 36 s, past the end). The next: (6 + 4) / 0.25 = 40 s.
    assert _steps(monitor) == [4, 20, 24]
    assert monitor.scheduler.slots["alternating"].spent == 6.0 <= 0.25 * 30


def test_budget_none_honours_the_schedule_exactly(tmp_path: Path) -> None:
    monitor = HessianMonitor(
        instruments=[_SlowInstrument(_FakeClock(), 0.01)],
        every_n_steps=1,
        budget=None,
        probe_dataloader=probe_loader(),
    )
    _fit(tmp_path, TanhModule(), [monitor], max_epochs=1, max_steps=6)
    assert _steps(monitor) == [0, 1, 2, 3, 4, 5, 6]


def test_instruments_keep_their_own_cadence(tmp_path: Path) -> None:
    monitor = HessianMonitor(
        instruments=[Eigenvalues(lambda_min=False), Trace(every_n_steps=4)],
        every_n_steps=2,
        budget=None,
        at_fit_start=False,
        at_fit_end=False,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
    )
    _fit(tmp_path, TanhModule(), [monitor], max_epochs=2)
    assert _steps(monitor) == [2, 4, 6, 8, 10, 12]
    with_trace = [int(h["step"]) for h in monitor.history if "trace" in h]
    assert with_trace == [4, 8, 12]


def test_log_spaced_tracking_measures_densely_early(tmp_path: Path) -> None:
    monitor = HessianMonitor(
        instruments=[Eigenvalues(lambda_min=False)],
        budget=None,
        at_fit_end=False,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
    )
    _fit(tmp_path, TanhModule(), [monitor], max_epochs=3)  # 6 steps per epoch
    assert _steps(monitor) == [0, 1, 2, 4, 6, 8, 12, 16, 18]  # 2^k, and epoch ends (6, 12, 18)


def test_a_hessian_plane_reuses_the_steps_eigenvectors(tmp_path: Path) -> None:
    eig = Eigenvalues(tol=1e-5)
    monitor = HessianMonitor(
        instruments=[Landscape(planes=["hessian"], resolution=3, every_n_steps=2), eig],
        every_n_steps=2,
        budget=None,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
        at_fit_end=False,
    )
    _fit(tmp_path, TanhModule(), [monitor], max_steps=2, max_epochs=-1)
    last = monitor.last_measurement
    assert last is not None and last.eigen is not None
    # One Lanczos run at the step: the landscape spent no more than its 2 plane-curvature HVPs (a Lanczos
    # run of its own would take 20 or more at this tolerance) and drew the eigenvectors Eigenvalues measured.
    assert last.outputs["landscape"].metrics["hvp_count"] <= 2
    assert last.metrics["lanczos_hvp_count"] >= 10
    snap = monitor.last_snapshot
    assert snap is not None and snap.step == 2
    assert snap.planes["hessian"].eigenvalues == (last.eigen.lambda_max, last.eigen.lambda_min)


class QuadraticForm(Instrument):
    """A user-defined instrument: the curvature u'Hu along a fixed unit direction u."""

    name = "quadratic_form"

    def __init__(self, seed: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed

    def run(self, ctx: StepContext) -> InstrumentOutput:
        gen = torch.Generator().manual_seed(self.seed)
        u = torch.randn(ctx.objective.num_params, generator=gen, dtype=torch.float64)
        u = (u / u.norm()).to(ctx.objective.dtype)
        return InstrumentOutput({"curvature_along_u": float(u @ ctx.objective.hvp(u))})


def test_a_user_defined_instrument_is_measured_logged_and_right(tmp_path: Path) -> None:
    monitor = HessianMonitor(
        instruments=[QuadraticForm()], every_n_steps=3, budget=None, probe_dataloader=probe_loader(), loss_fn=probe_loss
    )
    logger = CSVLogger(tmp_path, name="csv", version=0)
    module = TanhModule()
    _fit(tmp_path, module, [monitor], max_epochs=1, logger=logger)
    rows = [r for r in _read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("hessian/curvature_along_u")]
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    # Independent ground truth: u'Hu with the dense float64 Hessian at the final weights.
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(sum(p.numel() for p in module.parameters()), generator=gen, dtype=torch.float64)
    u = u / u.norm()
    dense = dense_hessian_at(module, probe_loader())
    assert float(rows[-1]["hessian/curvature_along_u"]) == pytest.approx(float(u @ dense @ u), rel=1e-4)


def test_results_are_available_on_the_callback(tmp_path: Path) -> None:
    monitor = HessianMonitor(
        instruments=[Eigenvalues(k=2), Trace()],
        every_n_epochs=1,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
        budget=None,
    )
    module = TanhModule()
    _fit(tmp_path, module, [monitor], max_epochs=1)
    last = monitor.last_measurement
    assert last is not None and last.eigen is not None and "trace" in last.outputs
    assert last.metrics["lambda_max"] == monitor.history[-1]["lambda_max"] == last.eigen.lambda_max
    assert last.metrics["lambda_2"] == last.eigen.eigenvalues[1] <= last.eigen.lambda_max
    n = sum(p.numel() for p in module.parameters())
    assert last.metrics["mean_curvature"] == pytest.approx(last.metrics["trace"] / n)
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

    monitor = UnifiedMonitor(
        instruments=[Eigenvalues(tol=1e-5)],
        every_n_epochs=1,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
        budget=None,
    )
    assert isinstance(monitor, lightning.pytorch.Callback) and not isinstance(monitor, pl.Callback)
    assert monitor.state_key == HessianMonitor().state_key  # checkpoints are interchangeable
    module = Unified()
    trainer = lightning.pytorch.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_loader())
    lmax, _ = dense_spectrum_at(module, probe_loader())
    assert monitor.history[-1]["lambda_max"] == pytest.approx(lmax, rel=1e-4)


def test_the_instruments_of_a_step_share_one_gradient_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_hessian.objective import Objective

    builds: list[int] = []
    original = Objective._build_graph

    def counting(self: Any, chunk: Any) -> Any:
        builds.append(len(chunk))
        return original(self, chunk)

    monkeypatch.setattr(Objective, "_build_graph", counting)
    monitor = HessianMonitor(
        instruments=[Eigenvalues(lambda_min_every=1), Trace(), SlopeFitTrace()],
        every_n_steps=2,
        budget=None,
        at_fit_start=False,
        at_fit_end=False,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
    )
    _fit(tmp_path, TanhModule(), [monitor], max_steps=2, max_epochs=-1)
    assert _steps(monitor) == [2] and monitor.history[0]["hvp_count"] > 30
    # the symmetry check's slice of the first batch, then the whole probe set's graph, once for Lanczos and Hutch++
    assert builds == [1, 4]
