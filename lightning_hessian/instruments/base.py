"""What an instrument is: options, an optional cadence, and one method from the step's shared context to results.

An instrument never logs, never touches Lightning and never decides *when* it runs: the monitor
(or :func:`lightning_hessian.instruments.run_instruments` in a notebook) builds one
:class:`StepContext` per measured step, runs every instrument due at that step on it, and
logs, saves and budgets what they return. Results that several instruments need at one step (the
extremal eigenpairs above all) are computed once, by whichever instrument asks first, and shared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lightning_hessian import _validate
from lightning_hessian.objective import Objective


@dataclass(frozen=True)
class Artifact:
    """Something an instrument produced besides scalars: ``kind`` says what the monitor does with it.

    ``"snapshot"``: a landscape :class:`~lightning_hessian.snapshots.Snapshot` (saved as ``.npz``,
    drawn as images, animated); ``"image"``: an HxWx3 uint8 array logged as an image under
    ``{prefix}/{name}``; ``"record"``: JSON-able data added to the step's record in the run's JSONL
    file; ``"save"``: a function ``data(directory: Path) -> None`` that writes the instrument's own
    data files into ``<run dir>/<name>/<prefix>/`` (rank zero; the monitor picks the directory);
    ``"lines"``: ``{"title", "x", "series": {name: values}}``, a multi-line chart for loggers that
    draw one from data (W&B; TensorBoard has its custom-scalars layout).
    """

    kind: str
    name: str
    data: Any


@dataclass(frozen=True)
class InstrumentOutput:
    """Named scalar metrics (names without the monitor's prefix) and optional artifacts."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: tuple[Artifact, ...] = ()


class StepContext:
    """Everything the instruments of one step share.

    Attributes:
        objective: the probe loss as a function of the parameters (one gradient graph per step).
        step, epoch: where training is.
        optimizers: the trainer's optimizers (empty outside a trainer); read, never changed.
        val_objective: a validation objective (landscapes draw it on the same planes), or ``None``.
        seed: the monitor's seed; instruments derive their random vectors from it.
        shared: results computed at this step, by name (``"eigen"``: the :class:`EigenResult`,
            ``"gradient"``: the probe gradient).
    """

    def __init__(
        self,
        objective: Objective,
        *,
        step: int = 0,
        epoch: int = 0,
        optimizers: Sequence[Any] = (),
        val_objective: Objective | None = None,
        seed: int = 0,
    ) -> None:
        self.objective = objective
        self.step = step
        self.epoch = epoch
        self.optimizers = list(optimizers)
        self.val_objective = val_objective
        self.seed = seed
        self.shared: dict[str, Any] = {}
        self.eigen_provider: Callable[[StepContext, bool], Any] | None = None
        self.progress_factory: Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], Any]]] | None = (
            None
        )

    @contextlib.contextmanager
    def progress(self, what: str, total: int) -> Iterator[Callable[[int], Any]]:
        """A progress reporter for long work (``update(n)``); the monitor shows it in a progress bar."""
        if self.progress_factory is None:
            yield lambda n: None
            return
        with self.progress_factory(what, total) as update:
            yield update

    def gradient(self) -> Tensor:
        """The probe loss's gradient at this step (a flat vector), computed once for every instrument."""
        if "gradient" not in self.shared:
            self.shared["gradient"] = self.objective.grad()
        return self.shared["gradient"]  # type: ignore[no-any-return]

    def eigenpairs(self, both_ends: bool = True) -> Any:
        """The extremal eigenpairs at this step (an :class:`~lightning_hessian.EigenResult`), computed once.

        The :class:`~lightning_hessian.instruments.Eigenvalues` instrument of the monitor computes
        them with its own options; without one, a default Lanczos run is used. A Hessian plane
        therefore always uses the eigenvectors measured at the same step. ``both_ends`` asks for
        ``lambda_min`` too: a top-only result of this step is then continued from its vectors.
        """
        eigen = self.shared.get("eigen")
        if eigen is None or (both_ends and eigen.vector_min is None):
            if self.eigen_provider is None:
                from lightning_hessian.instruments.curvature import Eigenvalues

                self.eigen_provider = Eigenvalues().compute_eigen
            self.eigen_provider(self, both_ends)
        return self.shared["eigen"]


class Instrument:
    """Base class of a measurement: override :meth:`run` (and ``name``); everything else is optional.

    Args:
        every_n_steps: this instrument's own cadence in optimizer steps (``None``: the monitor's).
        every_n_epochs: its own cadence in epochs (``None``: the monitor's, unless ``every_n_steps``
            is given, in which case it is not on an epoch schedule).

    A user-defined instrument is a small class::

        class GradientNorm(Instrument):
            name = "gradient_norm"

            def run(self, ctx: StepContext) -> InstrumentOutput:
                return InstrumentOutput({"grad_norm": float(ctx.objective.grad().norm())})
    """

    name: str = "instrument"
    #: where the monitor logs the metrics: ``"hessian"`` (its prefix) or ``"landscape"`` (the landscape prefix)
    namespace: str = "hessian"
    #: relative share of the monitor's time budget (cheap instruments need less to run as often)
    budget_weight: float = 1.0

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = None) -> None:
        self.every_n_steps = _validate.optional_positive_int("every_n_steps", every_n_steps)
        self.every_n_epochs = _validate.optional_positive_int("every_n_epochs", every_n_epochs)

    @property
    def has_own_cadence(self) -> bool:
        return self.every_n_steps is not None or self.every_n_epochs is not None

    def run(self, ctx: StepContext) -> InstrumentOutput:
        """Measure at this step; return named metrics and optional artifacts."""
        raise NotImplementedError(f"{type(self).__name__} must implement run(ctx)")

    def expected_hvps(self) -> float:
        """Rough cost of the next run in Hessian-vector products (a forward pass counts about 1/3).

        The budget plans an instrument's first run with it, before its real cost is known; later
        runs with the last run's seconds scaled by this value over what that run turned out to be
        (:meth:`last_run_hvps`, else this value at that run), so an instrument whose runs differ
        in kind (``Eigenvalues``' ``lambda_min`` runs) should say so.
        """
        return 10.0

    def last_run_hvps(self) -> float | None:
        """What the run that just ended turned out to cost, in the unit of :meth:`expected_hvps`.

        The budget scales that run's seconds by ``expected_hvps() / last_run_hvps()`` to plan the
        next run, so an instrument whose product count varies from run to run can report its
        measured count here. ``None`` (the default): the run cost what it expected.
        """
        return None

    def check(self, num_params: int) -> None:
        """Fail early (at the monitor's setup) when the options cannot work for this many parameters."""

    def summary(self) -> InstrumentOutput | None:
        """At the end of fit: artifacts that summarise the whole run (e.g. a picture over training)."""
        return None

    def reset(self) -> None:
        """Forget what one fit accumulated (warm starts, fixed planes); called at the start of each fit."""

    def state_dict(self) -> dict[str, Any]:
        """What must survive a checkpoint (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
