"""HessianMonitor's logic, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` flavours.

Imports neither Lightning package: everything Lightning-specific is reached through the
``trainer`` and ``pl_module`` the hooks receive. The callback decides *when* to measure (one
overridable predicate, :meth:`should_measure`), *on what* (a fixed probe set), runs
:func:`lightning_hessian.measure.measure` and hands the numbers to the sinks.
"""

from __future__ import annotations

import gc
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_hessian import _validate, sinks
from lightning_hessian._agreement import AgreedCollectives, PeerFailedError
from lightning_hessian._batch_codec import UnsupportedBatchError, decode, encode_batches
from lightning_hessian._files import remove_leftover_temporaries
from lightning_hessian._params import select_parameters
from lightning_hessian._probe import detached_copy, load_probe_dataloader, resolve_loss_fn, to_device
from lightning_hessian.frames import FrameState, LandscapeConfig, landscape_frame
from lightning_hessian.measure import QUANTITIES, MeasureConfig, Measurement, measure
from lightning_hessian.objective import HvpEngine, Objective
from lightning_hessian.snapshots import Snapshot, list_snapshots, save_snapshot
from lightning_hessian.spectrum import EigenResult

_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
_MAX_RESOLUTION = 201  # 201**2 probe-set passes per plane is already hours on a real model
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
            ("landscape_every_n_steps", landscape_every_n_steps),
            ("landscape_every_n_epochs", landscape_every_n_epochs),
        ):
            _validate.optional_positive_int(name, value)
        if every_n_epochs not in ("auto", None) and (
            not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1
        ):
            raise ValueError(f"every_n_epochs must be a positive integer, None or 'auto', got {every_n_epochs!r}")
        for name, flag in (
            ("at_fit_start", at_fit_start),
            ("at_fit_end", at_fit_end),
            ("warm_start", warm_start),
            ("allow_untested", allow_untested),
            ("landscape_orthogonalize", landscape_orthogonalize),
            ("landscape_log_scale", landscape_log_scale),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if quantities is None or isinstance(quantities, str):
            raise ValueError(f"quantities must be a list of names from {QUANTITIES}, got {quantities!r}")
        _validate.positive_int("probe_batches", probe_batches)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(pl_module, batch), got {loss_fn!r}")
        probe_dataloader = _validate.batches_source("probe_dataloader", probe_dataloader)
        landscape_val_dataloader = _validate.batches_source("landscape_val_dataloader", landscape_val_dataloader)
        params = _validate.param_globs(params)
        _validate.choice("hvp", hvp, ("auto", "cached", "double_backward", "forward_over_reverse", "finite_difference"))
        _validate.choice("mode", mode, ("eval", "batch_stats"))
        if max_overhead is not None:
            _validate.positive_float("max_overhead", max_overhead)
        _validate.choice("on_error", on_error, ("warn", "raise"))
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty string without a trailing '/', got {prefix!r}")
        _validate.choice("landscape_animation", landscape_animation, ("end", "always", "never"))
        _validate.names("landscape_planes", landscape_planes, ("random", "hessian"))
        _validate.positive_int("landscape_resolution", landscape_resolution, minimum=3, maximum=_MAX_RESOLUTION)
        if landscape_span is not None:
            _validate.positive_float("landscape_span", landscape_span)
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
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        """Everything one fit accumulates; a second ``fit`` starts afresh unless a checkpoint restores it."""
        self.last_measurement: Measurement | None = None
        self.history: list[dict[str, float]] = []
        # Resumable state (state_dict).
        self._last_step = 0  # step of the last slot of the every_n_steps schedule
        self._last_measured_step = -1
        self._n_skipped = 0
        self._n_failed = 0
        self._probe: list[Any] = []  # this process's probe batches, on the module's device
        self._probe_from_training = False
        self._probe_settled = False  # an incomplete captured probe accepted as it is (short runs)
        self._probe_shards: list[list[Any]] | None = None  # every rank's encoded shard (rank zero, DDP)
        self._probe_encoded: list[Any] | None = None  # this rank's probe as checkpoint data
        self._probe_note: str | None = None  # why the probe cannot be stored, if it cannot
        self._restored_probe: dict[str, Any] | None = None
        self._warm: EigenResult | Tensor | None = None
        self._warm_names: list[str] | None = None
        self.last_snapshot: Snapshot | None = None
        self._ls_slot = 0
        self._ls_last_step = -1
        self._ls_state = FrameState()
        self._ls_files: list[str] = []
        self._ls_limits: tuple[float, float] | None = None
        self._val_probe: list[Any] = []
        self._resumed = False
        self._warned_once: set[str] = set()
        # Per-fit bookkeeping.
        self._objective: Objective | None = None
        self._objective_names: list[str] = []
        self._val_objective: Objective | None = None
        self._loss: Callable[[Any, Any], Tensor] | None = None
        self._collectives: AgreedCollectives | None = None
        self._fit_started_at = 0.0
        self._measure_seconds = 0.0

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
        self._loss = resolve_loss_fn(self.loss_fn, pl_module)
        self._check_parameters(pl_module)

    def _check_parameters(self, pl_module: Any) -> None:
        """What is knowable before the first measurement: the selection, its dtype, k against its size."""
        selected = select_parameters(pl_module, self.params)  # raises: a glob that matches nothing
        dtypes = {p.dtype for _, p in selected}
        if any(d.is_complex for d in dtypes):
            raise ValueError(
                f"HessianMonitor: the selected parameters include complex ones ({sorted(map(str, dtypes))}); the "
                "Hessian is taken over real parameters only. Select real ones with params=[...]"
            )
        n = sum(p.numel() for _, p in selected)
        if "eigenvalues" in self.config.quantities and self.config.k >= n:
            raise ValueError(f"k={self.config.k} must be smaller than the number of selected parameters ({n})")
        if dtypes & {torch.float16, torch.bfloat16}:
            rank_zero_warn(
                f"HessianMonitor: parameters are {sorted(map(str, dtypes))}; Hessian-vector products "
                "in half precision are noisy (mixed precision keeps float32 weights and is fine)."
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_started_at = time.perf_counter()
        self._measure_seconds = 0.0
        self._objective = None
        self._collectives = None
        if int(trainer.world_size) > 1:
            strategy = trainer.strategy
            self._collectives = AgreedCollectives(
                lambda t: strategy.reduce(t, reduce_op="sum"),  # type: ignore[no-any-return]
                pl_module.device,
            )
        if self.probe_dataloader is not None:
            self._probe = load_probe_dataloader(self.probe_dataloader, trainer, pl_module)
            self._probe_from_training = False
        elif self._restored_probe is not None:
            self._restore_probe(trainer, pl_module, self._restored_probe)
        self._restored_probe = None
        if self.landscape_val_dataloader is not None and self._landscapes_on:
            self._val_probe = load_probe_dataloader(self.landscape_val_dataloader, trainer, pl_module)
        self._val_objective = None
        self._ls_state.random_plane = _to_device_pair(self._ls_state.random_plane, pl_module.device)
        self._ls_state.hessian_plane = _to_device_pair(self._ls_state.hessian_plane, pl_module.device)
        if trainer.is_global_zero:
            self._guarded_io(trainer, "preparing the run directory", lambda: self._prepare_files(trainer))

    def _prepare_files(self, trainer: Any) -> None:
        """Rank zero: the chart layout, and after a resume the files cut back to the checkpoint."""
        monitors = [c for c in trainer.callbacks if isinstance(c, _HessianMonitorCore)]
        if monitors and monitors[0] is self:
            sinks.write_tensorboard_layout(trainer.loggers, [m.prefix for m in monitors])
        remove_leftover_temporaries(self._jsonl_path(trainer).parent)
        remove_leftover_temporaries(self._landscape_dir(trainer))
        if self._resumed:
            # A crash after the checkpoint left records (and frames) that the resumed fit writes again.
            last = self._last_measured_step
            sinks.truncate_jsonl(self._jsonl_path(trainer), lambda r: float(r.get("step", -1)) <= last)
            for path in list_snapshots(self._landscape_dir(trainer)):
                if _snapshot_step(path) > self._ls_last_step:
                    path.unlink(missing_ok=True)
        if self._landscapes_on:
            self._carry_over_frames(trainer)

    def _restore_probe(self, trainer: Any, pl_module: Any, stored: dict[str, Any]) -> None:
        """This rank's share of the checkpoint's probe set; re-captured (with a message) when it cannot be."""
        shards = stored.get("shards") or ([stored["probe"]] if stored.get("probe") else [])
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        reason = stored.get("note")
        mine: list[Any] = []
        if shards:
            # The objective is the sample-weighted mean over every rank's batches, so any split of the
            # same batches over the ranks gives the same operator: re-split when the world size changed.
            if len(shards) != world:
                every = [b for shard in shards for b in shard]
                shards = [every[r::world] for r in range(world)]
            mine = list(shards[rank])
            if not all(shards):
                mine, reason = [], f"the checkpoint's probe set has fewer batches than the {world} processes"
        if mine:
            try:
                self._probe = [to_device(decode(b), pl_module.device) for b in mine]
                self._probe_from_training = True
                self._probe_settled = bool(stored.get("settled", False))
                self._probe_encoded, self._probe_note = mine, None
                self._probe_shards = [list(s) for s in shards] if world > 1 else None
                return
            except Exception as err:  # a batch class that no longer imports
                reason = f"its probe batches could not be rebuilt ({type(err).__name__}: {err})"
        if reason:
            rank_zero_info(
                f"HessianMonitor({self.prefix}): the probe set is captured again from the next training batches "
                f"after the resume: {reason}. Measurements after the resume use different probe batches."
            )
        self._probe, self._probe_from_training, self._probe_shards = [], False, None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.at_fit_start and self._probe_complete():
            self._measure(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.probe_dataloader is not None or self._probe_complete():
            return
        self._probe.append(detached_copy(batch))
        self._probe_from_training = True
        if self._probe_complete():
            self._probe_captured(trainer)
            if self.at_fit_start:
                self._measure(trainer, pl_module)  # before this batch's update: the start of training

    def _probe_captured(self, trainer: Any) -> None:
        """Encode the captured probe for checkpoints; under DDP rank zero collects every rank's shard.

        Rank zero alone writes the checkpoint, so without its peers' shards every rank would measure
        rank zero's batches after a resume (a different operator). Probe completion happens at the
        same batch on every rank, so the one ``all_gather_object`` here is matched on all of them.
        """
        try:
            encoded: list[Any] | None = encode_batches(self._probe)
            self._probe_note = None
        except UnsupportedBatchError as err:
            encoded, self._probe_note = None, str(err)
        self._probe_encoded = encoded
        if int(trainer.world_size) > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * int(trainer.world_size)
            torch.distributed.all_gather_object(gathered, encoded)
            complete = all(g is not None for g in gathered)
            self._probe_shards = gathered if complete and trainer.is_global_zero else None

    def _settle_incomplete_probe(self, trainer: Any, pl_module: Any, where: str) -> None:
        """A run too short to fill the probe set measures with what it captured, and says so once."""
        if self.probe_dataloader is not None or self._probe_complete() or self._probe_settled:
            return
        if not self._probe:
            self._warn_once(
                trainer,
                "no-probe",
                f"HessianMonitor({self.prefix}): nothing was measured: no training batch was seen to capture a probe "
                "set from. Pass probe_dataloader=... to measure anyway.",
            )
            return
        self._warn_once(
            trainer,
            "short-probe",
            f"HessianMonitor({self.prefix}): the run reached {where} after only {len(self._probe)} of "
            f"probe_batches={self.probe_batches} batches (limit_train_batches, fast_dev_run or max_steps cut it "
            f"short); measuring with those {len(self._probe)}. Lower probe_batches or pass probe_dataloader=... "
            "to choose the probe set.",
        )
        self._probe_settled = True
        self._probe_captured(trainer)

    def _warn_once(self, trainer: Any, key: str, message: str) -> None:
        if key not in self._warned_once:
            self._warned_once.add(key)
            rank_zero_warn(message)

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
        self._settle_incomplete_probe(trainer, pl_module, f"the end of epoch {trainer.current_epoch}")
        if self.every_n_epochs is not None and self.should_measure(trainer, epoch=trainer.current_epoch):
            self._measure(trainer, pl_module)
        n = self.landscape_every_n_epochs
        if n is not None and (trainer.current_epoch + 1) % n == 0:
            self._snapshot(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._settle_incomplete_probe(trainer, pl_module, "the end of training")
        if self.at_fit_end:
            self._measure(trainer, pl_module)
        if self._landscapes_on and self.landscape_animation != "never" and trainer.is_global_zero:
            self._guarded_io(trainer, "the landscape animation", lambda: self._animate(trainer))
        self._objective = None
        self._val_objective = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._objective = None
        self._val_objective = None

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
            **self._probe_state(),
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
        self._restored_probe = {
            "raw": {k: v for k, v in state_dict.items() if k.startswith("probe")},
            "probe": list(state_dict.get("probe", [])),
            "shards": state_dict.get("probe_shards"),
            "note": state_dict.get("probe_note"),
            "settled": state_dict.get("probe_settled", False),
        }
        self._resumed = True
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

    def _probe_state(self) -> dict[str, Any]:
        """The captured probe as ``weights_only``-loadable data (tensors and plain containers), or a note why not."""
        if self._restored_probe is not None:  # loaded, not yet used by a fit: hand it back unchanged
            return dict(self._restored_probe["raw"])
        if not self._probe_from_training or not self._probe_complete():
            return {"probe": []}
        if self._probe_encoded is None and self._probe_note is None:
            try:
                self._probe_encoded, self._probe_note = encode_batches(self._probe), None
            except UnsupportedBatchError as err:
                self._probe_encoded, self._probe_note = None, str(err)
        if self._probe_encoded is None:
            return {"probe": [], "probe_note": self._probe_note}
        return {
            "probe": self._probe_encoded,
            "probe_shards": self._probe_shards,
            "probe_settled": self._probe_settled,
        }

    # ------------------------------------------------------------------ measuring
    def _probe_complete(self) -> bool:
        if self.probe_dataloader is not None or self._probe_settled:
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
        """The probe objective; under DDP its all-reduces go through the agreement protocol."""
        assert self._loss is not None
        all_reduce = None if self._collectives is None else self._collectives.all_reduce_sum
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
            lambda step, result: self._publish_measurement(trainer, step, result),
        )

    def _run_scheduled(
        self,
        trainer: Any,
        what: str,
        last_step: int,
        compute: Callable[[int], Any],
        publish: Callable[[int, Any], None],
    ) -> None:
        """Run one measurement or snapshot: never twice at a step, within the overhead budget, errors isolated.

        ``compute`` runs on every rank under one agreement (it succeeds or fails on all of them
        together); ``publish`` (files, loggers) runs on rank zero afterwards, where its errors are
        its own and never undo a measurement.
        """
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
                self._guarded_io(
                    trainer,
                    "logging the skip count",
                    lambda: sinks.log_scalars(trainer.loggers, {f"{self.prefix}/skipped_total": self._n_skipped}, step),
                )
            return
        started = time.perf_counter()
        try:
            ok, result = self._guarded(trainer, f"the {what}", lambda: self._agreed(lambda: compute(step)))
            if not ok:
                self._drop_objectives()  # rebuilt from scratch next time, on every rank alike
            elif trainer.is_global_zero:
                self._guarded_io(trainer, f"writing the {what}", lambda: publish(step, result))
        finally:
            self._measure_seconds += time.perf_counter() - started

    def _agreed(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` under DDP's agreement: it succeeds on every rank or fails on every rank."""
        if self._collectives is None:
            return fn()
        with self._collectives.agreement():
            return fn()

    def _drop_objectives(self) -> None:
        for objective in (self._objective, self._val_objective):
            if objective is not None:
                objective.release()
        self._objective = None
        self._val_objective = None

    def _take_measurement(self, trainer: Any, pl_module: Any, step: int) -> Measurement:
        objective = self._make_objective(trainer, pl_module)
        warm = self._warm if self.warm_start and self._warm_names == objective.param_names else None
        result = measure(objective, self.config, warm_start=warm, learning_rate=self._learning_rate(trainer))
        self._last_measured_step = step
        if result.eigen is not None:
            self._warm, self._warm_names = result.eigen, objective.param_names
        self.last_measurement = result
        self.history.append({"step": float(step), "epoch": float(trainer.current_epoch), **result.metrics})
        return result

    def _publish_measurement(self, trainer: Any, step: int, result: Measurement) -> None:
        """Rank zero: the run's JSONL record first (it never depends on a logger), then the loggers."""
        self._write_files(trainer, result, self.history[-1])
        metrics = {f"{self.prefix}/{k}": v for k, v in result.metrics.items()}
        metrics[f"{self.prefix}/num_params"] = float(result.num_params)
        sinks.log_scalars(trainer.loggers, metrics, step)

    def _jsonl_path(self, trainer: Any) -> Path:
        name = self.prefix.replace("/", "_") + ".jsonl"
        return sinks.run_directory(trainer.loggers, trainer.default_root_dir) / "hessian" / name

    def _write_files(self, trainer: Any, result: Measurement, record: dict[str, float]) -> None:
        """Append the measurement, spectrum included, to ``<run dir>/hessian/<prefix>.jsonl``.

        Plain data next to the logs, so curves can be re-plotted later without re-measuring. Each
        record carries the run's id, so records of different runs never mix; a resumed run appends
        to the same file after cutting it back to the checkpoint (every step appears once).
        """
        entry: dict[str, Any] = {"run": sinks.run_id(trainer.loggers), **record}
        if result.eigen is not None:
            entry["eigenvalues"] = list(result.eigen.eigenvalues)
            entry["ritz_values"] = list(result.eigen.ritz_values)
        sinks.append_jsonl(self._jsonl_path(trainer), entry)

    # ------------------------------------------------------------------ landscapes
    @property
    def _landscapes_on(self) -> bool:
        return self.landscape_every_n_steps is not None or self.landscape_every_n_epochs is not None

    def _landscape_dir(self, trainer: Any) -> Path:
        return sinks.run_directory(trainer.loggers, trainer.default_root_dir) / "landscape" / self.prefix

    def _guarded(self, trainer: Any, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``fn``; a failure becomes one warning (or is re-raised with ``on_error="raise"``).

        Running out of memory (host or accelerator) frees what the measurement held first and
        says what to change. Under DDP the failing rank warns with its own reason; the others
        learn of it through the agreement and rank zero says that the step was skipped everywhere.
        """
        try:
            return True, fn()
        except Exception as err:
            self._n_failed += 1
            out_of_memory = isinstance(err, (torch.OutOfMemoryError, MemoryError))
            if out_of_memory:
                self._free_memory()
            if self.on_error == "raise":
                raise
            where = f"HessianMonitor({self.prefix}): {what} at step {trainer.global_step}"
            if isinstance(err, PeerFailedError):
                rank_zero_warn(f"{where} was skipped on every process: another process failed (its warning says why).")
            elif out_of_memory:
                self._warn_here(
                    trainer,
                    f"{where} ran out of memory and was skipped; training goes on ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}). To fit, use a smaller probe set "
                    "(probe_batches, or smaller batches in probe_dataloader), hvp='double_backward' (the lowest "
                    "memory of the engines), or params=[...] to take the Hessian of a subset of the parameters.",
                )
            else:
                self._warn_here(
                    trainer,
                    f"{where} failed and was skipped ({type(err).__name__}: {err}); training goes on. Pass "
                    "on_error='raise' to stop instead.",
                )
            return False, None

    def _warn_here(self, trainer: Any, message: str) -> None:
        """Warn on this process (a rank's own failure is only known there), naming the rank under DDP."""
        if int(trainer.world_size) > 1:
            warnings.warn(f"[rank {trainer.global_rank}] {message}", UserWarning, stacklevel=3)
        else:
            rank_zero_warn(message)

    def _free_memory(self) -> None:
        self._drop_objectives()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _guarded_io(self, trainer: Any, what: str, fn: Callable[[], Any]) -> None:
        """Rank zero's writing (files, loggers): a failure is reported as such, never as a skipped measurement."""
        try:
            fn()
        except Exception as err:
            if self.on_error == "raise":
                raise
            rank_zero_warn(
                f"HessianMonitor({self.prefix}): {what} at step {trainer.global_step} failed ({type(err).__name__}: "
                f"{err}). What was measured is kept in `history` and in every file and logger that did not fail; "
                "training goes on."
            )

    def _snapshot(self, trainer: Any, pl_module: Any) -> None:
        self._run_scheduled(
            trainer,
            "landscape snapshot",
            self._ls_last_step,
            lambda step: self._take_snapshot(trainer, pl_module, step),
            lambda step, snap: self._publish(trainer, snap),
        )

    def _take_snapshot(self, trainer: Any, pl_module: Any, step: int) -> Snapshot:
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
        return snap

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


def _snapshot_step(path: Path) -> int:
    """The step in a snapshot file's name (``step_000120.npz``), or -1 when it has none."""
    digits = "".join(ch for ch in path.stem if ch.isdigit())
    return int(digits) if digits else -1
