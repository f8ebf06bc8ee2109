"""HessianMonitor's logic, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` flavours.

Imports neither Lightning package: everything Lightning-specific is reached through the
``trainer`` and ``pl_module`` the hooks receive. What is measured lives in
:mod:`lightning_hessian.instruments`; when, in :mod:`lightning_hessian.scheduler` (with the
budget's wall clock in :mod:`lightning_hessian._budget_clock`); where it goes, in
:mod:`lightning_hessian._publisher` (routing), :mod:`lightning_hessian.run_files` and
:mod:`lightning_hessian.sinks`; failures are contained by :mod:`lightning_hessian._isolation`.
The probe's objectives are kept by :mod:`lightning_hessian._objectives`, the budget is planned by
:mod:`lightning_hessian._budget_planner`, and what is said once by :mod:`lightning_hessian._announcer`.
This module connects them to Lightning's hooks.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_hessian import _isolation as isolation
from lightning_hessian import _validate, sinks
from lightning_hessian._agreement import AgreedCollectives
from lightning_hessian._announcer import Announcer
from lightning_hessian._budget_clock import BudgetClock
from lightning_hessian._budget_planner import BudgetPlanner
from lightning_hessian._objectives import ProbeObjectives
from lightning_hessian._params import select_parameters
from lightning_hessian._probe import load_probe_dataloader, resolve_loss_fn
from lightning_hessian._probe_set import ProbeSet
from lightning_hessian._progress import progress_bar
from lightning_hessian._publisher import Publisher
from lightning_hessian.instruments import (
    Eigenvalues,
    Instrument,
    StepResult,
    eigen_provider,
    ordered,
    share_products,
)
from lightning_hessian.instruments.base import InstrumentOutput, StepContext
from lightning_hessian.instruments.landscape import Landscape
from lightning_hessian.instruments.optimizer import StepCurvature
from lightning_hessian.objective import HvpEngine, default_batch_size
from lightning_hessian.run_files import RunFiles
from lightning_hessian.scheduler import Scheduler, cadence_for, names_of
from lightning_hessian.snapshots import Snapshot

_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
_STATE_VERSION = 2
_ENGINES = ("auto", "cached", "double_backward", "forward_over_reverse", "finite_difference")


class _HessianMonitorCore:
    """Measure the loss geometry (eigenvalues, traces, landscapes, ...) while a model trains, within a time budget.

    What is measured are the ``instruments``; when, the schedule and the ``budget``. Measurements
    run on a fixed probe set after optimizer steps, never touch training (weights, gradients,
    buffers, optimizer state, RNG streams, module modes, loaders and metrics are left as they
    were), and are logged at ``trainer.global_step`` as ``{prefix}/lambda_max``,
    ``{prefix}/trace``, ... (landscape scalars under ``landscape/``), with a record per measured
    step in ``<run dir>/hessian/<prefix>.jsonl``.

    Args:
        instruments: what to measure (:mod:`lightning_hessian.instruments`); default
            ``[Eigenvalues(), StepCurvature()]``: lambda_max every time, lambda_min every fourth time
            (the cheapest curve that still shows the saddle signal), and the curvature along the
            gradient and the optimizer's step (one or two HVPs). Add ``Trace()``, ``Landscape()``,
            ``OptimizerCurvature()``... as needed; each gets a share of the budget in proportion to
            its ``budget_weight`` (1, and 0.1 for the cheap ``StepCurvature``).
        every_n_steps: the instruments' cadence in optimizer steps (an instrument's own cadence
            takes precedence); ``None``: not on a step schedule.
        every_n_epochs: cadence in epochs; ``"auto"`` (default): every epoch when ``every_n_steps``
            is not given, else none.
        log_spaced: also measure at steps 1, 2, 4, 8, ... where the geometry changes fastest;
            ``"auto"``: when ``every_n_steps`` is not given.
        budget: fraction of the training wall time so far that measuring may take (per process,
            decided identically on every rank); a measurement due earlier is postponed to the first
            step where it fits, and counted in ``{prefix}/skipped``. An instrument's first run is
            planned from its expected HVPs, an HVP taken to cost 2.5 training steps on as many
            samples until one is measured. ``None``: honour the schedule exactly.
        at_fit_start: measure before the first optimizer step (or at the resumed step); with a probe
            captured from training, once it is complete (step ``probe_batches - 1``). With a budget
            this is a request like any other: it runs once the training time has paid for it.
        at_fit_end: measure when training ends (with a budget, if it fits).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar Tensor``, a module-level function (it must
            pickle for ``ddp_spawn`` and load from a LightningCLI config). Default: the module's
            ``hessian_loss(batch)`` if it has one, else its ``training_step`` with logging silenced
            and stateful metrics restored (automatic optimization only).
        probe_dataloader: batches that define the probe set; they go through the training batch
            pipeline and are split across processes. Default: the first ``probe_batches`` batches
            the training loop sees, captured without disturbing it.
        probe_batches: number of training batches captured as the probe set. One batch is the
            cheapest; the top eigenvalues of a small batch's Hessian are biased upward (more so the
            smaller the batch), so compare curves measured on the same probe size.
        params: glob or list of globs on parameter names restricting the Hessian to those
            parameters (default: every trainable parameter).
        hvp: HVP engine of :class:`lightning_hessian.Objective` (``"auto"``, ``"cached"``, ...).
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"batch_stats"``.
        seed: seeds every random vector; the same for every measurement so curves are comparable.
        prefix: metric namespace (distinct prefixes let several monitors coexist).
        on_error: ``"warn"``: a failing measurement becomes one warning and a skipped step;
            ``"raise"``: re-raise it.
        allow_untested: run under strategies other than single-device and DDP (FSDP, DeepSpeed,
            ...) instead of refusing them at setup.

    Attributes:
        last_measurement: the latest :class:`lightning_hessian.instruments.StepResult` (or ``None``).
        last_snapshot: the latest landscape :class:`lightning_hessian.snapshots.Snapshot` (or ``None``).
        history: every measured step's metrics with its ``step`` and ``epoch``.

    Raises:
        ValueError: at construction for invalid arguments; at setup for an unsupported strategy,
            parameters that do not fit the instruments, or a manual-optimization module without
            ``loss_fn`` or ``hessian_loss``.
    """

    def __init__(
        self,
        instruments: Sequence[Instrument] | None = None,
        every_n_steps: int | None = None,
        every_n_epochs: int | Literal["auto"] | None = "auto",
        log_spaced: bool | Literal["auto"] = "auto",
        budget: float | None = 0.05,
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        loss_fn: Callable[..., Any] | None = None,
        probe_dataloader: Iterable[Any] | None = None,
        probe_batches: int = 1,
        params: str | Sequence[str] | None = None,
        hvp: HvpEngine = "auto",
        mode: Literal["eval", "batch_stats"] = "eval",
        seed: int = 0,
        prefix: str = "hessian",
        on_error: Literal["warn", "raise"] = "warn",
        allow_untested: bool = False,
    ) -> None:
        super().__init__()
        if instruments is None:
            instruments = [Eigenvalues(), StepCurvature()]
        self.instruments = ordered(_validate.instruments(instruments, Instrument))
        self.every_n_steps = _validate.optional_positive_int("every_n_steps", every_n_steps)
        if every_n_epochs == "auto":  # every epoch unless a step cadence is given
            every_n_epochs = 1 if every_n_steps is None else None
        self.every_n_epochs = _validate.optional_positive_int("every_n_epochs", every_n_epochs, also="'auto'")
        if log_spaced != "auto":
            _validate.flag("log_spaced", log_spaced)
        self.log_spaced = every_n_steps is None if log_spaced == "auto" else bool(log_spaced)
        self.budget = None if budget is None else _validate.positive_float("budget", budget, below=1.0)
        self.at_fit_start = _validate.flag("at_fit_start", at_fit_start)
        self.at_fit_end = _validate.flag("at_fit_end", at_fit_end)
        self.allow_untested = _validate.flag("allow_untested", allow_untested)
        self.loss_fn = _validate.optional_callable("loss_fn", loss_fn, "loss_fn(pl_module, batch)")
        self.probe_dataloader = _validate.batches_source("probe_dataloader", probe_dataloader)
        self.probe_batches = _validate.positive_int("probe_batches", probe_batches)
        self.params = _validate.param_globs(params)
        self.hvp: HvpEngine = _validate.choice("hvp", hvp, _ENGINES)  # type: ignore[assignment]
        self.mode: Literal["eval", "batch_stats"] = _validate.choice(  # type: ignore[assignment]
            "mode", mode, ("eval", "batch_stats")
        )
        self.seed = _validate.seed(seed)
        self.on_error = _validate.choice("on_error", on_error, ("warn", "raise"))
        self.prefix = _validate.prefix(prefix)
        self.landscape_prefix = "landscape" if prefix == "hessian" else f"{prefix}_landscape"
        self._clock: Callable[[], float] = time.perf_counter  # wall clock of the budget (a test can fake it)
        self._names = names_of(self.instruments)
        self._by_name = dict(zip(self._names, self.instruments))
        self._reset_fit_state()

    # ------------------------------------------------------------------ per-fit state
    def _new_scheduler(self) -> Scheduler:
        cadences = {
            name: cadence_for(
                (ins.every_n_steps, ins.every_n_epochs), self.every_n_steps, self.every_n_epochs, self.log_spaced
            )
            for name, ins in self._by_name.items()
        }
        weights = {name: float(ins.budget_weight) for name, ins in self._by_name.items()}
        return Scheduler(cadences, self.budget, weights)

    def _reset_fit_state(self) -> None:
        """Everything one fit accumulates; a second ``fit`` starts afresh unless a checkpoint restores it."""
        self.last_measurement: StepResult | None = None
        self.last_snapshot: Snapshot | None = None
        self.history: list[dict[str, float]] = []
        self.scheduler = self._new_scheduler()
        self.probe = ProbeSet(self.probe_dataloader, self.probe_batches, self.prefix)
        self.files = RunFiles(self.prefix, self.landscape_prefix)
        self.publisher = Publisher(self.prefix, self.files, self._by_name)
        for ins in self.instruments:
            ins.reset()
        self._n_failed = 0
        self._last_frame_step = -1
        self._resumed_at: int | None = None
        self.announcer = Announcer(self.prefix, self.budget)
        self._pl_module: Any = None
        self.objectives = ProbeObjectives(self.params, self.hvp, self.mode)
        self._collectives: AgreedCollectives | None = None
        self.budget_clock = BudgetClock(self._now)
        self.planner = BudgetPlanner(self.budget, self._by_name, self.scheduler, self.budget_clock, self.probe)

    def _now(self) -> float:
        """The budget's wall clock (``_clock``, which a test can fake); a method, so the monitor pickles."""
        return self._clock()

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)  # type: ignore[attr-defined,no-any-return]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Reset per-fit state, validate the strategy, the parameters and the probe loss (fit only)."""
        if stage != "fit":
            return
        self._reset_fit_state()  # a checkpoint's state, if any, is loaded after this
        strategy = type(trainer.strategy)
        if not any(cls.__name__ in _SUPPORTED_STRATEGIES for cls in strategy.__mro__):
            message = (
                f"HessianMonitor supports single-device and DDP training (strategies {_SUPPORTED_STRATEGIES} and "
                f"their subclasses); got {strategy.__name__}. Sharded or model-parallel strategies need a "
                "full-parameter HVP that is not implemented. Pass allow_untested=True to run anyway at your own risk."
            )
            if not self.allow_untested:
                raise ValueError(message)
            rank_zero_warn(message)
        self.objectives.loss = resolve_loss_fn(self.loss_fn, pl_module)
        self._check_parameters(pl_module)

    def _check_parameters(self, pl_module: Any) -> None:
        """What is knowable before the first measurement: the selection, its dtype, its size for each instrument."""
        selected = select_parameters(pl_module, self.params)  # raises: a glob that matches nothing
        dtypes = {p.dtype for _, p in selected}
        if any(d.is_complex for d in dtypes):
            raise ValueError(
                f"HessianMonitor: the selected parameters include complex ones ({sorted(map(str, dtypes))}); the "
                "Hessian is taken over real parameters only. Select real ones with params=[...]"
            )
        n = sum(p.numel() for _, p in selected)
        for ins in self.instruments:
            ins.check(n)
        if dtypes & {torch.float16, torch.bfloat16}:
            rank_zero_warn(
                f"HessianMonitor: parameters are {sorted(map(str, dtypes))}; Hessian-vector products "
                "in half precision are noisy (mixed precision keeps float32 weights and is fine)."
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._pl_module = pl_module
        self.budget_clock.start()
        with self.budget_clock.monitoring():  # the probe's loading and the files count as the monitor's time
            self._start_fit(trainer, pl_module)

    def _start_fit(self, trainer: Any, pl_module: Any) -> None:
        self.objectives.release()
        self._collectives = None
        if int(trainer.world_size) > 1:
            strategy = trainer.strategy
            self._collectives = AgreedCollectives(
                lambda t: strategy.reduce(t, reduce_op="sum"),
                pl_module.device,
            )
        self.objectives.all_reduce_sum = None if self._collectives is None else self._collectives.all_reduce_sum
        self.probe.load(trainer, pl_module)
        for name, ins in self._by_name.items():
            if isinstance(ins, Landscape):
                ins.to_device(pl_module.device)
                if ins.val_dataloader is not None:
                    self.objectives.val_probes[name] = load_probe_dataloader(ins.val_dataloader, trainer, pl_module)
        if trainer.is_global_zero:
            self._guarded_io("preparing the run directory", lambda: self._prepare_files(trainer))

    def _prepare_files(self, trainer: Any) -> None:
        monitors = [c for c in trainer.callbacks if isinstance(c, _HessianMonitorCore)]
        if monitors and monitors[0] is self:
            sinks.write_tensorboard_layout(trainer.loggers, [m._chart_set() for m in monitors])
        self.files.prepare(self._run_dir(trainer), self._resumed_at, self._last_frame_step)

    def _chart_set(self) -> sinks.ChartSet:
        landscape = any(isinstance(i, Landscape) for i in self.instruments)
        return sinks.ChartSet(
            prefix=self.prefix,
            instruments=frozenset(self._names),
            budgeted=self.budget is not None,
            landscape_prefix=self.landscape_prefix if landscape else None,
        )

    # Every training hook's time, less its measurements, is the monitor's overhead, which the budget pays.
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        with self.budget_clock.monitoring():
            if self.at_fit_start and self.probe.complete:
                self._run(trainer, pl_module, self.scheduler.at_fit_start(int(trainer.global_step)))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        with self.budget_clock.monitoring():
            self.budget_clock.train_batch_size = default_batch_size(batch)
            if self.probe.capture(trainer, batch) and self.at_fit_start:
                # before this batch's update: the start of training
                self._run(trainer, pl_module, self.scheduler.at_fit_start(int(trainer.global_step)))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.sanity_checking:
            return
        with self.budget_clock.monitoring():
            if self.scheduler.needs_replan:  # the fit-start measurement was planned before any step was timed
                self.planner.plan(trainer, int(trainer.global_step))
            names = self.due_instruments(trainer, step=int(trainer.global_step))
            self._run(trainer, pl_module, self.planner.confirm(trainer, names))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        with self.budget_clock.monitoring():
            self._settle_probe(trainer, f"the end of epoch {trainer.current_epoch}")
            names = self.due_instruments(trainer, epoch=int(trainer.current_epoch))
            self._run(trainer, pl_module, self.planner.confirm(trainer, names))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._settle_probe(trainer, "the end of training")
        if self.at_fit_end and self.probe.complete:
            step = int(trainer.global_step)
            if self.scheduler.needs_replan or any(slot.runs == 0 for slot in self.scheduler.slots.values()):
                self.planner.plan(trainer, step)
            self._run(trainer, pl_module, self.scheduler.at_fit_end(step))
        if trainer.is_global_zero:
            run_dir = functools.partial(self._run_dir, trainer)
            self.publisher.finish(run_dir, trainer.loggers, int(trainer.global_step), self._guarded_io)
        self.objectives.release()
        self._pl_module = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.objectives.release()

    def due_instruments(self, trainer: Any, step: int | None = None, epoch: int | None = None) -> list[str]:
        """The scheduling predicate: names of the instruments to run now; override it for another schedule.

        Called with ``step`` after every optimizer step (``global_step == step``) and with
        ``epoch`` at the end of a training epoch. Nothing runs twice at a step.
        """
        if step is not None:
            return self.scheduler.after_step(step)
        if epoch is not None:
            return self.scheduler.at_epoch_end(epoch, int(trainer.global_step))
        return []

    def _settle_probe(self, trainer: Any, where: str) -> None:
        self.announcer.warn_once(self.probe.settle(trainer, where))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "scheduler": self.scheduler.state_dict(),
            "train_seconds": self.budget_clock.train_seconds(),
            "overhead_seconds": self.budget_clock.overhead_seconds(),
            "instruments": {name: ins.state_dict() for name, ins in self._by_name.items()},
            "n_failed": self._n_failed,
            "last_measured_step": self._last_measured_step(),
            "last_frame_step": self._last_frame_step,
            **self.probe.state_dict(),
            "history": list(self.history),
            "files": self.files.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if int(state_dict.get("version", 1)) < _STATE_VERSION:
            rank_zero_warn(
                f"HessianMonitor({self.prefix}): the checkpoint holds a monitor state of an earlier version "
                "(before instruments); the schedule and warm starts start afresh."
            )
            return
        self.scheduler.load_state_dict(state_dict.get("scheduler") or {})
        self.budget_clock.before = float(state_dict.get("train_seconds", 0.0))
        self.budget_clock.overhead_before = float(state_dict.get("overhead_seconds", 0.0))
        for name, state in (state_dict.get("instruments") or {}).items():
            if name in self._by_name:
                self._by_name[name].load_state_dict(state)
        self._n_failed = int(state_dict.get("n_failed", 0))
        self._resumed_at = int(state_dict.get("last_measured_step", -1))
        self._last_frame_step = int(state_dict.get("last_frame_step", -1))
        self.probe.load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self.files.load_state_dict(state_dict.get("files") or {})

    def _last_measured_step(self) -> int:
        return int(self.history[-1]["step"]) if self.history else -1

    # ------------------------------------------------------------------ measuring
    def _run_dir(self, trainer: Any) -> Path:
        return sinks.run_directory(trainer.loggers, trainer.default_root_dir)

    def _run(self, trainer: Any, pl_module: Any, names: Sequence[str]) -> None:
        """Run the named instruments at this step on one shared context; log what they return.

        Each instrument runs under the DDP agreement (it succeeds or fails on every rank together)
        and its own error isolation; files and loggers are written by rank zero afterwards.
        """
        if not names or trainer.sanity_checking or not self.probe.complete:
            return
        step = int(trainer.global_step)
        started = self._clock()
        hvp_before = self.objectives.hvp_count()
        ctx: StepContext | None = None
        outputs: dict[str, InstrumentOutput] = {}
        seconds: dict[str, float] = {}
        # One session for the whole step: the instruments share one gradient graph (freed at its end).
        with contextlib.ExitStack() as session:
            for name in [n for n in self._names if n in names]:
                ins = self._by_name[name]
                expected = float(ins.expected_hvps())  # of this run, before it counts itself
                t0 = self._clock()
                if ctx is None:
                    ok, ctx = self._guarded(
                        trainer,
                        "preparing the measurement",
                        lambda: self._agreed(lambda: self._new_context(trainer, pl_module, step)),
                    )
                    if not ok:
                        self.scheduler.ran(name, step, self._clock() - t0, expected)
                        break
                    share_products(ctx, [self._by_name[n] for n in names if n in self._by_name])
                    session.enter_context(ctx.objective.session())
                one = functools.partial(self._one, ctx, name, ins)
                ok, out = self._guarded(trainer, f"the {name} measurement", functools.partial(self._agreed, one))
                seconds[name] = self._clock() - t0
                realized = ins.last_run_hvps() if ok else None
                self.scheduler.ran(name, step, seconds[name], expected if realized is None else realized)
                if ok:
                    outputs[name] = out
                else:
                    self.objectives.release()  # rebuilt from scratch next time, on every rank alike
                    ctx = None
        self.budget_clock.measuring += self._clock() - started
        self.planner.plan(trainer, step)
        next_allowed = {name: slot.next_allowed for name, slot in self.scheduler.slots.items()}
        step_seconds = self.budget_clock.step_seconds(step)
        self.announcer.spacing(trainer, step, {n: seconds[n] for n in outputs}, step_seconds, next_allowed)
        if outputs:
            self._record(trainer, step, outputs, seconds, hvp_before, ctx)

    def _new_context(self, trainer: Any, pl_module: Any, step: int) -> StepContext:
        """One shared context per measured step: the objective (one gradient graph), the optimizers, the seed."""
        objective = self.objectives.for_module(pl_module, self.probe.batches)
        ctx = StepContext(
            objective,
            step=step,
            epoch=int(trainer.current_epoch),
            optimizers=list(getattr(trainer, "optimizers", [])),
            seed=self.seed,
        )
        ctx.eigen_provider = eigen_provider(self.instruments)
        if trainer.is_global_zero and getattr(trainer, "progress_bar_callback", None) is not None:
            ctx.progress_factory = progress_bar
        return ctx

    def _one(self, ctx: StepContext, name: str, ins: Instrument) -> InstrumentOutput:
        ctx.val_objective = self.objectives.validation(name)
        with ctx.objective.session():
            out = ins.run(ctx)
        for artifact in out.artifacts:
            if artifact.kind == "snapshot":
                self.last_snapshot = artifact.data
                self._last_frame_step = ctx.step
        return out

    def _record(
        self,
        trainer: Any,
        step: int,
        outputs: dict[str, InstrumentOutput],
        seconds: dict[str, float],
        hvp_before: int,
        ctx: StepContext | None,
    ) -> None:
        metrics: dict[str, float] = {}
        landscape: dict[str, float] = {}
        for name, out in outputs.items():
            target = landscape if self._by_name[name].namespace == "landscape" else metrics
            target.update(out.metrics)
        if metrics:
            metrics["hvp_count"] = float(self.objectives.hvp_count() - hvp_before)
            metrics["seconds"] = float(sum(seconds.values()))
            if metrics["hvp_count"] > 0:  # what the next first runs are planned with
                self.budget_clock.hvp_seconds = metrics["seconds"] / metrics["hvp_count"]
            metrics["skipped"] = float(self.scheduler.skipped)
        eigen = None if ctx is None else ctx.shared.get("eigen")
        self.last_measurement = StepResult(metrics=dict(metrics), outputs=outputs, seconds=seconds, eigen=eigen)
        if metrics:
            self.history.append({"step": float(step), "epoch": float(trainer.current_epoch), **metrics})
        self.announcer.skips(self.scheduler.take_new_skips())
        if ctx is not None:
            self.announcer.allocator(ctx.objective.device.type)
        if trainer.is_global_zero:
            self._guarded_io(
                f"writing the measurement at step {step}",
                lambda: self._publish(trainer, step, outputs, metrics),
            )

    def _publish(
        self, trainer: Any, step: int, outputs: dict[str, InstrumentOutput], metrics: dict[str, float]
    ) -> None:
        """Rank zero: the measured step to the run files and loggers (through the publisher)."""
        entry: dict[str, Any] = dict(self.history[-1]) if metrics else {}
        objective = self.objectives.training
        if metrics and objective is not None:  # which HVP engine "auto" chose, and its memory plan
            entry["engine"] = objective.active_engine
        num_params = None if objective is None else objective.num_params
        self.publisher.measurement(self._run_dir(trainer), trainer.loggers, step, outputs, metrics, entry, num_params)

    # ------------------------------------------------------------------ failures
    def _agreed(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` under DDP's agreement: it succeeds on every rank or fails on every rank."""
        if self._collectives is None:
            return fn()
        with self._collectives.agreement():
            return fn()

    def _guarded(self, trainer: Any, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``fn`` with its failure isolated from training (:func:`lightning_hessian._isolation.guarded`)."""
        return isolation.guarded(trainer, self.prefix, self.on_error, what, fn, self._failed)

    def _failed(self, err: BaseException) -> None:
        self._n_failed += 1
        if isolation.is_out_of_memory(err):
            self.objectives.release()

    def _guarded_io(self, what: str, fn: Callable[[], Any]) -> None:
        isolation.guarded_io(self.prefix, self.on_error, what, fn)
