"""HessianMonitor's logic, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` flavours.

Imports neither Lightning package: everything Lightning-specific is reached through the
``trainer`` and ``pl_module`` the hooks receive. The callback decides *when* to measure (one
overridable predicate, :meth:`should_measure`), *on what* (a fixed probe set), runs
:func:`lightning_hessian.measure.measure` and hands the numbers to the sinks.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_hessian import sinks
from lightning_hessian._probe import detached_copy, load_probe_dataloader, resolve_loss_fn, to_cpu, to_device
from lightning_hessian.frames import FrameState, LandscapeConfig, landscape_frame
from lightning_hessian.measure import QUANTITIES, MeasureConfig, Measurement, measure
from lightning_hessian.objective import HvpEngine, Objective
from lightning_hessian.snapshots import Snapshot, list_snapshots, save_snapshot
from lightning_hessian.spectrum import EigenResult

_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
_STATE_VERSION = 1


class _HessianMonitorCore:
    """Measure Hessian eigenvalues and traces of the training loss while a model trains.

    Measurements run after optimizer steps on a fixed probe set, never touch training (weights,
    gradients, BatchNorm statistics, RNG streams and module modes are left bit-identical), and are
    logged at ``trainer.global_step`` to every logger as ``{prefix}/lambda_max``,
    ``{prefix}/lambda_min``, ``{prefix}/negative_ratio``, ``{prefix}/trace``,
    ``{prefix}/mean_curvature``, ``{prefix}/hvp_count``, ``{prefix}/seconds`` and more.

    Args:
        every_n_steps: measure every this many optimizer steps (``None``: not on a step schedule).
        every_n_epochs: measure at the end of every this many training epochs (``None``: never).
            ``"auto"`` (default): once per epoch when ``every_n_steps`` is not given, else never
            (an epoch end a few steps from a step-scheduled measurement nearly doubles the cost).
        at_fit_start: measure before the first optimizer step (or at the resumed step). With a probe
            set captured from training batches, this waits until the set is complete: the
            measurement comes before the update of batch ``probe_batches - 1`` (step
            ``probe_batches - 1``); give a ``probe_dataloader`` (or ``probe_batches=1``) for step 0.
        at_fit_end: measure when training ends.
        quantities: any of ``"eigenvalues"`` (lambda_max and the top ``k``), ``"lambda_min"`` (the
            most negative eigenvalue, from the same Lanczos run), ``"trace"`` (Hutch++) and
            ``"slope_fit"`` (the HVP-free trace estimate).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar Tensor``; a module-level function (so that it
            pickles for ``ddp_spawn`` and reloads from a LightningCLI config). Default: the module's
            ``hessian_loss(batch)`` if it has one, else its ``training_step`` with logging silenced
            (automatic optimization only).
        probe_dataloader: batches that define the probe set; they go through the training batch
            pipeline and are split across processes. Default: the first ``probe_batches`` batches
            the training loop sees, captured without disturbing it.
        probe_batches: number of training batches captured as the probe set.
        params: glob or list of globs on parameter names restricting the Hessian to those
            parameters (default: every trainable parameter).
        k: number of top eigenvalues (``lambda_2``... are logged too).
        tol: Lanczos residual tolerance (relative to lambda_max; to the spectral width for lambda_min).
        max_hvp: Lanczos budget of Hessian-vector products per measurement.
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        trace_hvp: HVP budget of the trace estimate.
        slope_directions: directions of the slope-fit trace.
        hvp: HVP engine of :class:`lightning_hessian.Objective` (``"auto"``, ``"cached"``, ...).
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"batch_stats"``.
        seed: seeds every random vector; the same for every measurement so curves are comparable.
        warm_start: start Lanczos from the previous measurement's eigenvectors; kept across
            checkpoint resume. It pays when the eigenvectors move little between measurements
            (2 HVPs instead of 17 at unchanged weights, about half after one small step); when
            they rotate a lot in between, as 25 momentum-SGD steps apart in the quickstart, it
            makes no difference (24.6 HVPs per measurement warm, 24.2 cold).
        max_overhead: skip a measurement when the time spent measuring would exceed this fraction
            of the training time so far (the skip is logged); ``None`` for no budget.
        prefix: metric namespace (distinct prefixes let several monitors coexist).
        on_error: ``"warn"``: a failing measurement becomes one warning and a skipped metric;
            ``"raise"``: re-raise it.
        allow_untested: run under strategies other than single-device and DDP (FSDP, DeepSpeed,
            ...) instead of refusing them at setup.
        landscape_every_n_steps: take a loss-landscape snapshot every this many optimizer steps.
        landscape_every_n_epochs: take one at the end of every this many epochs (both ``None``:
            no landscapes). A snapshot evaluates ``landscape_resolution**2`` grid points per plane,
            one forward pass of the probe set each.
        landscape_planes: ``"random"`` (filter-normalised Gaussian directions, fixed for the run)
            and/or ``"hessian"`` (eigenvectors of lambda_max and lambda_min), drawn side by side.
        landscape_resolution: odd number of grid points per axis (the weights sit at the centre).
        landscape_span: half-width of the planes; ``None``: 1 filter unit for random planes and the
            curvature scale for Hessian planes (recorded with every snapshot).
        landscape_normalization: of the random directions: ``"filter"`` (Li et al.; biases and
            normalisation parameters get zero), ``"layer"`` or ``"none"``.
        landscape_orthogonalize: make the second random direction orthogonal to the first.
        landscape_val_dataloader: validation batches evaluated on the same planes.
        landscape_log_scale: draw log10 of the loss.
        landscape_animation: ``"end"``: an animated GIF of all frames at the end of fit;
            ``"always"``: also refreshed after every snapshot; ``"never"``.

    Attributes:
        last_measurement: the latest :class:`lightning_hessian.measure.Measurement` (or ``None``).
        last_snapshot: the latest landscape :class:`lightning_hessian.snapshots.Snapshot` (or ``None``).
        history: every measurement's metrics with its ``step`` and ``epoch``.

    Raises:
        ValueError: at construction for invalid arguments; at setup for an unsupported strategy
            or a manual-optimization module without ``loss_fn`` or ``hessian_loss``.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | Literal["auto"] | None = "auto",
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        quantities: Sequence[str] = ("eigenvalues", "lambda_min", "trace"),
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        probe_dataloader: Iterable[Any] | None = None,
        probe_batches: int = 4,
        params: str | Sequence[str] | None = None,
        k: int = 1,
        tol: float = 1e-4,
        max_hvp: int = 100,
        trace_method: Literal["hutch++", "hutchinson"] = "hutch++",
        trace_hvp: int = 30,
        slope_directions: int = 20,
        hvp: HvpEngine = "auto",
        mode: Literal["eval", "batch_stats"] = "eval",
        seed: int = 0,
        warm_start: bool = True,
        max_overhead: float | None = None,
        prefix: str = "hessian",
        on_error: Literal["warn", "raise"] = "warn",
        allow_untested: bool = False,
        landscape_every_n_steps: int | None = None,
        landscape_every_n_epochs: int | None = None,
        landscape_planes: Sequence[str] = ("random", "hessian"),
        landscape_resolution: int = 21,
        landscape_span: float | None = None,
        landscape_normalization: Literal["filter", "layer", "none"] = "filter",
        landscape_orthogonalize: bool = False,
        landscape_val_dataloader: Iterable[Any] | None = None,
        landscape_log_scale: bool = False,
        landscape_animation: Literal["end", "always", "never"] = "end",
    ) -> None:
        super().__init__()
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("every_n_epochs", None if every_n_epochs == "auto" else every_n_epochs),
            ("landscape_every_n_steps", landscape_every_n_steps),
            ("landscape_every_n_epochs", landscape_every_n_epochs),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                allowed = (
                    "a positive integer, None or 'auto'" if name == "every_n_epochs" else "a positive integer or None"
                )
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        if isinstance(quantities, str):
            raise ValueError(f"quantities must be a list of names from {QUANTITIES}, not the string {quantities!r}")
        if not isinstance(probe_batches, int) or probe_batches < 1:
            raise ValueError(f"probe_batches must be a positive integer, got {probe_batches!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(pl_module, batch), got {loss_fn!r}")
        if hvp not in ("auto", "cached", "double_backward", "forward_over_reverse", "finite_difference"):
            raise ValueError(
                f"hvp must be 'auto', 'cached', 'double_backward', 'forward_over_reverse' or "
                f"'finite_difference', got {hvp!r}"
            )
        if mode not in ("eval", "batch_stats"):
            raise ValueError(f"mode must be 'eval' or 'batch_stats', got {mode!r}")
        if max_overhead is not None and not (isinstance(max_overhead, (int, float)) and max_overhead > 0):
            raise ValueError(f"max_overhead must be a positive fraction of training time or None, got {max_overhead!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty string without a trailing '/', got {prefix!r}")
        if landscape_animation not in ("end", "always", "never"):
            raise ValueError(f"landscape_animation must be 'end', 'always' or 'never', got {landscape_animation!r}")
        if isinstance(landscape_planes, str):
            raise ValueError(f"landscape_planes must be a list such as ['random', 'hessian'], not {landscape_planes!r}")
        self.landscape_config = LandscapeConfig(
            planes=tuple(landscape_planes),
            resolution=landscape_resolution,
            span=landscape_span,
            normalization=landscape_normalization,
            orthogonalize=landscape_orthogonalize,
            seed=seed,
        )
        self.landscape_every_n_steps = landscape_every_n_steps
        self.landscape_every_n_epochs = landscape_every_n_epochs
        self.landscape_val_dataloader = landscape_val_dataloader
        self.landscape_log_scale = landscape_log_scale
        self.landscape_animation = landscape_animation
        self.landscape_prefix = "landscape" if prefix == "hessian" else f"{prefix}_landscape"
        self.config = MeasureConfig(
            quantities=tuple(quantities),
            k=k,
            tol=tol,
            max_hvp=max_hvp,
            trace_method=trace_method,
            trace_hvp=trace_hvp,
            slope_directions=slope_directions,
            seed=seed,
        )
        self.every_n_steps = every_n_steps
        if every_n_epochs == "auto":
            every_n_epochs = 1 if every_n_steps is None else None
        self.every_n_epochs: int | None = every_n_epochs
        self.at_fit_start = at_fit_start
        self.at_fit_end = at_fit_end
        self.loss_fn = loss_fn
        self.probe_dataloader = probe_dataloader
        self.probe_batches = probe_batches
        self.params = params
        self.hvp = hvp
        self.mode = mode
        self.warm_start = warm_start
        self.max_overhead = max_overhead
        self.prefix = prefix
        self.on_error = on_error
        self.allow_untested = allow_untested
        self.last_measurement: Measurement | None = None
        self.history: list[dict[str, float]] = []
        # Resumable state (state_dict).
        self._last_step = 0  # step of the last slot of the every_n_steps schedule
        self._last_measured_step = -1
        self._n_skipped = 0
        self._n_failed = 0
        self._probe: list[Any] = []  # this process's probe batches, on the module's device
        self._probe_from_training = False
        self._warm: EigenResult | Tensor | None = None
        self._warm_names: list[str] | None = None
        self.last_snapshot: Snapshot | None = None
        self._ls_slot = 0
        self._ls_last_step = -1
        self._ls_state = FrameState()
        self._ls_files: list[str] = []
        self._ls_limits: tuple[float, float] | None = None
        self._val_probe: list[Any] = []
        # Per-fit bookkeeping.
        self._objective: Objective | None = None
        self._objective_names: list[str] = []
        self._val_objective: Objective | None = None
        self._loss: Callable[[Any, Any], Tensor] | None = None
        self._fit_started_at = 0.0
        self._measure_seconds = 0.0

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)  # type: ignore[attr-defined,no-any-return]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Validate the strategy and the probe loss before anything runs (fit only)."""
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if strategy not in _SUPPORTED_STRATEGIES:
            message = (
                f"HessianMonitor supports single-device and DDP training (strategies {_SUPPORTED_STRATEGIES}); "
                f"got {strategy}. Sharded or model-parallel strategies need a full-parameter HVP that is not "
                "implemented. Pass allow_untested=True to run anyway at your own risk."
            )
            if not self.allow_untested:
                raise ValueError(message)
            rank_zero_warn(message)
        self._loss = resolve_loss_fn(self.loss_fn, pl_module)
        dtypes = {p.dtype for p in pl_module.parameters() if p.requires_grad}
        if dtypes & {torch.float16, torch.bfloat16}:
            rank_zero_warn(
                f"HessianMonitor: parameters are {sorted(map(str, dtypes))}; Hessian-vector products "
                "in half precision are noisy (mixed precision keeps float32 weights and is fine)."
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_started_at = time.perf_counter()
        self._measure_seconds = 0.0
        self._objective = None
        if self.probe_dataloader is not None:
            self._probe = load_probe_dataloader(self.probe_dataloader, trainer, pl_module)
            self._probe_from_training = False
        elif self._probe:
            self._probe = [to_device(b, pl_module.device) for b in self._probe]  # restored from a checkpoint
        if self.landscape_val_dataloader is not None and self._landscapes_on:
            self._val_probe = load_probe_dataloader(self.landscape_val_dataloader, trainer, pl_module)
        self._val_objective = None
        self._ls_state.random_plane = _to_device_pair(self._ls_state.random_plane, pl_module.device)
        self._ls_state.hessian_plane = _to_device_pair(self._ls_state.hessian_plane, pl_module.device)
        if trainer.is_global_zero:
            monitors = [c for c in trainer.callbacks if isinstance(c, _HessianMonitorCore)]
            if monitors and monitors[0] is self:
                sinks.write_tensorboard_layout(trainer.loggers, [m.prefix for m in monitors])
            if self._landscapes_on:
                self._carry_over_frames(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.at_fit_start and self._probe_complete():
            self._measure(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.probe_dataloader is not None or self._probe_complete():
            return
        self._probe.append(detached_copy(batch))
        self._probe_from_training = True
        if self._probe_complete() and self.at_fit_start:
            self._measure(trainer, pl_module)  # before this batch's update: the start of training

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > self._last_step and self.should_measure(trainer, step=step):
            self._last_step = step
            self._measure(trainer, pl_module)
        n = self.landscape_every_n_steps
        if n is not None and step > self._ls_slot and step - self._ls_slot >= n:
            self._ls_slot = step
            self._snapshot(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_n_epochs is not None and self.should_measure(trainer, epoch=trainer.current_epoch):
            self._measure(trainer, pl_module)
        n = self.landscape_every_n_epochs
        if n is not None and (trainer.current_epoch + 1) % n == 0:
            self._snapshot(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.at_fit_end:
            self._measure(trainer, pl_module)
        if self._landscapes_on and self.landscape_animation != "never" and trainer.is_global_zero:
            self._guarded(trainer, "the landscape animation", lambda: self._animate(trainer))
        self._objective = None
        self._val_objective = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._objective = None

    def should_measure(self, trainer: Any, step: int | None = None, epoch: int | None = None) -> bool:
        """The scheduling predicate: override it for another schedule.

        Called with ``step`` after an optimizer step (only when the step advanced) and with
        ``epoch`` at the end of a training epoch. Measurements never repeat a step.
        """
        if step is not None:
            return self.every_n_steps is not None and step - self._last_step >= self.every_n_steps
        if epoch is not None:
            return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0
        return False

    def state_dict(self) -> dict[str, Any]:
        warm = self._warm
        if isinstance(warm, EigenResult):
            parts = [*warm.eigenvectors, *([] if warm.vector_min is None else [warm.vector_min])]
            warm = torch.stack(parts).sum(0)
        return {
            "version": _STATE_VERSION,
            "last_step": self._last_step,
            "last_measured_step": self._last_measured_step,
            "n_skipped": self._n_skipped,
            "n_failed": self._n_failed,
            "warm_start": None if warm is None else warm.detach().cpu(),
            "warm_start_params": self._warm_names,
            "probe": [to_cpu(b) for b in self._probe] if self._probe_from_training else [],
            "history": list(self.history),
            "landscape": {
                "slot": self._ls_slot,
                "last_step": self._ls_last_step,
                "files": list(self._ls_files),
                "limits": self._ls_limits,
                "random_plane": _to_device_pair(self._ls_state.random_plane, torch.device("cpu")),
                "hessian_plane": _to_device_pair(self._ls_state.hessian_plane, torch.device("cpu")),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        self._last_measured_step = int(state_dict["last_measured_step"])
        self._n_skipped = int(state_dict.get("n_skipped", 0))
        self._n_failed = int(state_dict.get("n_failed", 0))
        self._warm = state_dict.get("warm_start")
        self._warm_names = state_dict.get("warm_start_params")
        self._probe = list(state_dict.get("probe", []))
        self._probe_from_training = bool(self._probe)
        self.history = list(state_dict.get("history", []))
        landscape = state_dict.get("landscape") or {}
        self._ls_slot = int(landscape.get("slot", 0))
        self._ls_last_step = int(landscape.get("last_step", -1))
        self._ls_files = list(landscape.get("files", []))
        limits = landscape.get("limits")
        self._ls_limits = None if limits is None else (float(limits[0]), float(limits[1]))
        self._ls_state = FrameState(
            random_plane=landscape.get("random_plane"), hessian_plane=landscape.get("hessian_plane")
        )

    # ------------------------------------------------------------------ measuring
    def _probe_complete(self) -> bool:
        if self.probe_dataloader is not None:
            return bool(self._probe)
        return len(self._probe) >= self.probe_batches

    def _make_objective(self, trainer: Any, pl_module: Any) -> Objective:
        names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        if self._objective is None or self._objective_names != names:
            self._objective = self._build_objective(trainer, pl_module, self._probe)
            self._val_objective = None
            self._objective_names = names
        return self._objective

    def _build_objective(self, trainer: Any, pl_module: Any, batches: list[Any]) -> Objective:
        all_reduce = None
        if int(trainer.world_size) > 1:
            strategy = trainer.strategy

            def all_reduce(t: Tensor) -> Tensor:
                return strategy.reduce(t, reduce_op="sum")  # type: ignore[no-any-return]

        assert self._loss is not None
        return Objective(
            pl_module, self._loss, batches, params=self.params, hvp=self.hvp, mode=self.mode, all_reduce_sum=all_reduce
        )

    def _within_budget(self, trainer: Any) -> bool:
        """Rank zero decides (wall clocks differ across ranks), every rank follows; no budget, no collective."""
        if self.max_overhead is None:
            return True
        ok = True
        if self.last_measurement is not None:
            predicted = self.last_measurement.metrics.get("seconds", 0.0)
            training = time.perf_counter() - self._fit_started_at - self._measure_seconds
            ok = self._measure_seconds + predicted <= self.max_overhead * max(training, 0.0)
        return bool(trainer.strategy.broadcast(ok, src=0))

    def _learning_rate(self, trainer: Any) -> float | None:
        optimizers = getattr(trainer, "optimizers", [])
        if len(optimizers) == 1 and len(optimizers[0].param_groups) == 1:
            lr = optimizers[0].param_groups[0].get("lr")
            return float(lr) if isinstance(lr, (int, float)) else None
        return None

    def _measure(self, trainer: Any, pl_module: Any) -> None:
        self._run_scheduled(
            trainer,
            "measurement",
            self._last_measured_step,
            lambda step: self._take_measurement(trainer, pl_module, step),
        )

    def _run_scheduled(self, trainer: Any, what: str, last_step: int, work: Callable[[int], None]) -> None:
        """Run one measurement or snapshot: never twice at a step, within the overhead budget, errors isolated."""
        step = int(trainer.global_step)
        if trainer.sanity_checking or step == last_step or not self._probe_complete():
            return
        if not self._within_budget(trainer):
            self._n_skipped += 1
            rank_zero_info(
                f"HessianMonitor({self.prefix}): skipped the {what} at step {step}: it would push the measuring "
                f"time past max_overhead={self.max_overhead} of the training time ({self._n_skipped} skipped so far)"
            )
            if trainer.is_global_zero:
                sinks.log_scalars(trainer.loggers, {f"{self.prefix}/skipped_total": self._n_skipped}, step)
            return
        started = time.perf_counter()
        try:
            if not self._guarded(trainer, f"the {what}", lambda: work(step)):
                self._objective = None  # rebuilt from scratch next time
        finally:
            self._measure_seconds += time.perf_counter() - started

    def _take_measurement(self, trainer: Any, pl_module: Any, step: int) -> None:
        objective = self._make_objective(trainer, pl_module)
        warm = self._warm if self.warm_start and self._warm_names == objective.param_names else None
        result = measure(objective, self.config, warm_start=warm, learning_rate=self._learning_rate(trainer))
        self._last_measured_step = step
        if result.eigen is not None:
            self._warm, self._warm_names = result.eigen, objective.param_names
        self.last_measurement = result
        record = {"step": float(step), "epoch": float(trainer.current_epoch), **result.metrics}
        self.history.append(record)
        if trainer.is_global_zero:
            metrics = {f"{self.prefix}/{k}": v for k, v in result.metrics.items()}
            metrics[f"{self.prefix}/num_params"] = float(result.num_params)
            sinks.log_scalars(trainer.loggers, metrics, step)
            self._write_files(trainer, result, record)

    def _write_files(self, trainer: Any, result: Measurement, record: dict[str, float]) -> None:
        """Append the measurement, spectrum included, to ``<run dir>/hessian/<prefix>.jsonl``.

        Plain data next to the logs, so curves can be re-plotted later without re-measuring; a
        resumed run appends to the same file.
        """
        entry: dict[str, Any] = dict(record)
        if result.eigen is not None:
            entry["eigenvalues"] = list(result.eigen.eigenvalues)
            entry["ritz_values"] = list(result.eigen.ritz_values)
        name = self.prefix.replace("/", "_") + ".jsonl"
        sinks.append_jsonl(sinks.run_directory(trainer.loggers, trainer.default_root_dir) / "hessian" / name, entry)

    # ------------------------------------------------------------------ landscapes
    @property
    def _landscapes_on(self) -> bool:
        return self.landscape_every_n_steps is not None or self.landscape_every_n_epochs is not None

    def _landscape_dir(self, trainer: Any) -> Path:
        return sinks.run_directory(trainer.loggers, trainer.default_root_dir) / "landscape" / self.prefix

    def _guarded(self, trainer: Any, what: str, fn: Callable[[], Any]) -> bool:
        """Run ``fn``; a failure becomes one warning (or is re-raised with ``on_error="raise"``)."""
        try:
            fn()
        except Exception as err:
            self._n_failed += 1
            if self.on_error == "raise":
                raise
            rank_zero_warn(
                f"HessianMonitor({self.prefix}): {what} at step {trainer.global_step} failed and was "
                f"skipped ({type(err).__name__}: {err}); training goes on. Pass on_error='raise' to "
                "stop instead."
            )
            return False
        return True

    def _snapshot(self, trainer: Any, pl_module: Any) -> None:
        self._run_scheduled(
            trainer,
            "landscape snapshot",
            self._ls_last_step,
            lambda step: self._take_snapshot(trainer, pl_module, step),
        )

    def _take_snapshot(self, trainer: Any, pl_module: Any, step: int) -> None:
        objective = self._make_objective(trainer, pl_module)
        if self._val_probe and self._val_objective is None:
            self._val_objective = self._build_objective(trainer, pl_module, self._val_probe)
        eigen = None
        last = self.last_measurement
        if last is not None and self._last_measured_step == step and last.eigen is not None:
            eigen = last.eigen if last.eigen.vector_min is not None else None
        snap = landscape_frame(
            objective,
            self.landscape_config,
            self._ls_state,
            step=step,
            epoch=int(trainer.current_epoch),
            eigen=eigen,
            val_objective=self._val_objective,
            max_hvp=self.config.max_hvp,
        )
        self._ls_last_step = step
        self.last_snapshot = snap
        if trainer.is_global_zero:
            self._publish(trainer, snap)

    def _publish(self, trainer: Any, snap: Snapshot) -> None:
        """Rank zero: the .npz file, the scalars, the pictures (and the animation if asked for)."""
        import lightning_hessian.render as render

        path = save_snapshot(self._landscape_dir(trainer), snap)
        self._ls_files.append(str(path))
        lp = self.landscape_prefix
        sinks.log_scalars(trainer.loggers, {f"{lp}/{k}": v for k, v in snap.scalars.items()}, snap.step)
        if not any(sinks.is_tensorboard(lg) or sinks.is_wandb(lg) for lg in trainer.loggers):
            return
        try:
            lo, hi = render.color_limits(snap.planes.values(), log_scale=self.landscape_log_scale)
            if self._ls_limits is not None:  # one colour scale for all frames so far
                lo, hi = min(lo, self._ls_limits[0]), max(hi, self._ls_limits[1])
            self._ls_limits = (lo, hi)
        except ValueError:  # no finite loss on any plane (a diverged model): keep the scale so far
            pass
        limits = self._ls_limits
        figures = {f"{lp}/planes": snap}
        for kind, surface in snap.planes.items():
            figures[f"{lp}/{kind}"] = Snapshot(
                step=snap.step, epoch=snap.epoch, planes={kind: surface}, scalars=snap.scalars, meta=snap.meta
            )
        for tag, frame in figures.items():
            fig = render.snapshot_figure(frame, limits=limits, log_scale=self.landscape_log_scale)
            sinks.log_image(trainer.loggers, tag, render.figure_to_rgb(fig), snap.step)
        if self.landscape_animation == "always":
            self._animate(trainer)

    def _animate(self, trainer: Any) -> None:
        """Re-render every frame of the run on one colour scale and log the animated GIF."""
        import lightning_hessian.render as render

        directory = self._landscape_dir(trainer)
        if not list_snapshots(directory):
            return
        written = render.render_run(directory, log_scale=self.landscape_log_scale)
        gif = next((p for p in written if p.suffix == ".gif"), None)
        if gif is not None:
            sinks.log_animation(trainer.loggers, f"{self.landscape_prefix}/animation", gif, int(trainer.global_step))

    def _carry_over_frames(self, trainer: Any) -> None:
        """After a resume into a new log directory, copy the earlier frames so the animation stays whole."""
        directory = self._landscape_dir(trainer)
        for name in self._ls_files:
            source = Path(name)
            target = directory / source.name
            if source.exists() and not target.exists():
                directory.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


def _to_device_pair(pair: tuple[Tensor, Tensor] | None, device: torch.device) -> tuple[Tensor, Tensor] | None:
    return None if pair is None else (pair[0].to(device), pair[1].to(device))
