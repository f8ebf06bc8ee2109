"""Whole-spectrum instruments: the spectral density (SLQ) over training, and per-block lambda_max and traces.

Thin wrappers over :func:`lightning_hessian.density.spectral_density` and
:func:`lightning_hessian.blocks.block_spectrum` (the math and its evidence live there). Each
measurement returns its scalars, a record for the step's JSONL entry, an image (drawn by
:mod:`lightning_hessian.render_density`; the instrument only hands the finished pixels to the
monitor) and a ``"save"`` artifact that writes the plain data files of
:mod:`lightning_hessian.spectra_files` into ``<run dir>/spectra/<prefix>/``, where
``python -m lightning_hessian render RUN_DIR`` finds and re-draws them.

The density over training (step against eigenvalue, density as colour) is drawn at the end of
fit from the measurements of this fit *and* the density files already in the run directory, so
a resumed fit continues the picture without keeping any spectrum in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch import Tensor

from lightning_hessian import _validate
from lightning_hessian.blocks import BlockSpec, BlockStats, block_spectrum
from lightning_hessian.blocks import BlockSpectrum as BlockResult
from lightning_hessian.density import DensityEstimate, Distribution, spectral_density
from lightning_hessian.instruments.base import Artifact, Instrument, InstrumentOutput, StepContext
from lightning_hessian.spectra_files import DensityRecord, list_densities, load_density, save_blocks, save_density

#: the artifact name of both instruments' files: ``<run dir>/spectra/<prefix>/``
SPECTRA_DIR = "spectra"
#: block count assumed by :meth:`BlockSpectrum.expected_hvps` before the first run with ``blocks=None``
_GUESSED_BLOCKS = 4


def _rgb(fig: Any) -> np.ndarray:
    """A finished matplotlib figure as HxWx3 uint8 pixels (imported here: the math never needs matplotlib)."""
    from lightning_hessian.render import figure_to_rgb

    return figure_to_rgb(fig)


def _finite(value: float | None) -> float | None:
    return value if value is not None and np.isfinite(value) else None


class SpectralDensity(Instrument):
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature, its negative mass, outliers and pictures.

    :func:`lightning_hessian.density.spectral_density` with ``max_hvp`` products split over
    ``n_starts`` random starts (the same starts at every step, from the monitor's seed: the
    curves then show how the Hessian changes, not how the probes do). ``lambda_min`` and
    ``lambda_max`` are marked on the pictures: those of the step's shared eigenpairs when an
    :class:`~lightning_hessian.instruments.Eigenvalues` instrument (or a Hessian landscape plane)
    already computed them, combined with the extreme Ritz values of the density (both are bounds
    from inside the spectrum, so the outer one is kept); never an extra Lanczos run.

    Args:
        max_hvp: HVP budget of one measurement (``max_hvp // n_starts`` Lanczos steps per start).
        n_starts: random start vectors (at least 2 for a standard error).
        distribution: ``"rademacher"`` or ``"gaussian"`` start vectors.
        image: log the density (log scale, ``lambda_min``/``lambda_max`` marked) as an image at each
            measurement; the picture over training is logged at the end of fit either way.
        every_n_steps, every_n_epochs: this instrument's own cadence (default: the monitor's).

    Metrics: ``negative_mass`` (fraction of the spectral mass below zero; the two nodes next to
    zero count by half), ``negative_mass_stderr`` (across starts), ``n_outliers`` (eigenvalues
    above the bulk; logged when the Lanczos basis was reorthogonalised, which it is whenever one
    start's vectors fit 2 GiB) and ``bulk_edge`` (upper edge of the bulk; logged when there are
    outliers). The record (``"spectral_density"`` in the step's JSONL entry) adds the quadrature
    bracket of the negative mass, the first two moments, the extreme Ritz values and the cost.

    Files: ``<run dir>/spectra/<prefix>/step_<step>.npz`` per measurement (nodes and weights per
    start, :func:`lightning_hessian.spectra_files.save_density`) and, at the end of fit,
    ``density_evolution.png`` next to them. Images: ``{prefix}/spectral_density`` per measurement
    and ``{prefix}/spectral_density_over_training`` at the end of fit.

    Memory: the nodes and weights of this fit's measurements stay in memory for the end-of-fit
    picture (about ``24 * max_hvp`` bytes each); the checkpoint keeps none of them (the picture
    re-reads the files of the run directory after a resume).
    """

    name = "spectral_density"

    def __init__(
        self,
        max_hvp: int = 160,
        n_starts: int = 4,
        distribution: str = "rademacher",
        image: bool = True,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.n_starts = _validate.positive_int("n_starts", n_starts)
        self.max_hvp = _validate.positive_int("max_hvp", max_hvp)
        if self.max_hvp < 2 * self.n_starts:
            raise ValueError(
                f"max_hvp={max_hvp} is too small for n_starts={n_starts}: each start needs at least 2 Lanczos steps, "
                f"so max_hvp must be >= 2 * n_starts = {2 * n_starts}"
            )
        chosen = _validate.choice("distribution", distribution, ("rademacher", "gaussian"))
        self.distribution = cast(Distribution, chosen)
        self.image = _validate.flag("image", image)
        self._records: dict[int, DensityRecord] = {}
        self._directory: Path | None = None

    def expected_hvps(self) -> float:
        return float((self.max_hvp // self.n_starts) * self.n_starts)

    def run(self, ctx: StepContext) -> InstrumentOutput:
        estimate = spectral_density(
            ctx.objective, max_hvp=self.max_hvp, n_starts=self.n_starts, distribution=self.distribution, seed=ctx.seed
        )
        lambda_min, lambda_max = self._marks(ctx, estimate)
        record = DensityRecord(ctx.step, estimate, lambda_min, lambda_max, {"epoch": ctx.epoch})
        self._records[ctx.step] = record
        metrics = {"negative_mass": estimate.negative_mass, "negative_mass_stderr": estimate.negative_mass_stderr}
        if estimate.n_outliers is not None:
            metrics["n_outliers"] = float(estimate.n_outliers)
        if np.isfinite(estimate.bulk_edge):
            metrics["bulk_edge"] = estimate.bulk_edge
        m1, m1_err = estimate.moment(1)
        m2, m2_err = estimate.moment(2)
        details = {
            **estimate.scalars(),
            "mean_eigenvalue": m1,
            "mean_eigenvalue_stderr": m1_err,
            "mean_squared_eigenvalue": m2,
            "mean_squared_eigenvalue_stderr": m2_err,
            "lambda_min_ritz": estimate.lambda_min_ritz,
            "lambda_max_ritz": estimate.lambda_max_ritz,
            "lambda_min_marked": lambda_min,
            "lambda_max_marked": lambda_max,
        }
        artifacts = [
            Artifact("record", "spectral_density", {"spectral_density": details}),
            Artifact("save", SPECTRA_DIR, self._saver(record)),
        ]
        if self.image:
            from lightning_hessian.render_density import density_figure

            artifacts.append(Artifact("image", "spectral_density", _rgb(density_figure(record))))
        return InstrumentOutput(metrics, tuple(artifacts))

    @staticmethod
    def _marks(ctx: StepContext, estimate: DensityEstimate) -> tuple[float | None, float | None]:
        """``lambda_min``/``lambda_max`` of the step's shared eigenpairs, if computed, widened by the Ritz extremes."""
        eigen = ctx.shared.get("eigen")
        if eigen is None:
            return None, None
        top = _finite(float(eigen.lambda_max))
        bottom = _finite(float(eigen.lambda_min)) if eigen.vector_min is not None else None
        lambda_max = None if top is None else max(top, estimate.lambda_max_ritz)
        lambda_min = None if bottom is None else min(bottom, estimate.lambda_min_ritz)
        return lambda_min, lambda_max

    def _saver(self, record: DensityRecord) -> Callable[[Path], None]:
        def write(directory: Path) -> None:
            save_density(
                directory,
                record.step,
                record.estimate,
                lambda_min=record.lambda_min,
                lambda_max=record.lambda_max,
                meta=record.meta,
            )
            self._directory = Path(directory)

        return write

    def measurements(self, directory: Path | str | None = None) -> list[DensityRecord]:
        """What the picture over training draws, by step: the density files in ``directory`` (default: the
        directory this fit saved to, if any), overridden by this fit's own measurements."""
        found: dict[int, DensityRecord] = {}
        source = Path(directory) if directory is not None else self._directory
        if source is not None and source.is_dir():
            for path in list_densities(source):
                rec = load_density(path)
                found[rec.step] = rec
        found.update(self._records)
        return [found[step] for step in sorted(found)]

    def summary(self) -> InstrumentOutput | None:
        """The density over training as an image and as ``density_evolution.png`` in the spectra directory."""
        from lightning_hessian.render_density import density_evolution_figure, save_figure

        records = self.measurements()
        if not records:
            return None
        seen = self._directory
        figure = density_evolution_figure(records)

        def write(directory: Path) -> None:
            fig = figure
            if seen is None or Path(directory) != seen:  # another directory: draw what it holds
                fig = density_evolution_figure(self.measurements(directory))
            save_figure(fig, Path(directory) / "density_evolution.png")

        return InstrumentOutput(
            artifacts=(
                Artifact("image", "spectral_density_over_training", _rgb(figure)),
                Artifact("save", SPECTRA_DIR, write),
            )
        )

    def reset(self) -> None:
        self._records = {}
        self._directory = None


class BlockSpectrum(Instrument):
    """Per-block ``lambda_max`` (of the diagonal block H_bb) and traces: which part of the model is sharp.

    :func:`lightning_hessian.blocks.block_spectrum`. A block's ``lambda_max`` is the top eigenvalue
    of the Hessian's diagonal block ``H_bb`` (the curvature if only that block moves), *not* the
    global top eigenvector projected on the block; by Cauchy interlacing it never exceeds the
    global ``lambda_max``. Block traces come from the same Rademacher products as their total, so
    they add up to it exactly.

    Args:
        blocks: ``None`` (one block per module that owns parameters, named by its path; the
            model's own parameters are ``"_root"``), a mapping ``{name: glob or [globs]}`` or a list
            of globs on parameter names (the unmatched parameters form ``"_rest"``).
        n_trace: Rademacher products for all traces together (0: no traces).
        tol: residual tolerance of each block's ``lambda_max``, relative to its value.
        max_hvp_per_block: budget of one block's Lanczos run.
        max_hvp: total budget of the blocks' ``lambda_max`` per measurement (``None``: every block,
            each within ``max_hvp_per_block``). With a budget, each measurement continues where the
            previous one stopped, so the blocks are measured in turn (the rotation is kept across
            checkpoints); a block not measured this time logs no ``lambda_max``.
        image: log a bar chart of the blocks' ``lambda_max`` and traces at each measurement.
        every_n_steps, every_n_epochs: this instrument's own cadence (default: the monitor's).

    Metrics: ``block/<name>/lambda_max`` (measured blocks) and ``block/<name>/trace``, logged by the
    monitor as ``{prefix}/block/<name>/...``. The record (``"block_spectrum"`` in the step's JSONL
    entry) adds each block's size, trace standard error, error bound, convergence and products.
    Warm starts: each block's Lanczos starts from its previous top eigenvector (CPU tensors in the
    checkpoint, one parameter-sized vector in all). Files: ``<run dir>/spectra/<prefix>/blocks_<step>.json``
    (:func:`lightning_hessian.spectra_files.save_blocks`). Image: ``{prefix}/block_spectrum``.
    """

    name = "block_spectrum"

    def __init__(
        self,
        blocks: BlockSpec = None,
        n_trace: int = 30,
        tol: float = 1e-3,
        max_hvp_per_block: int = 20,
        max_hvp: int | None = None,
        image: bool = True,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.blocks = _block_spec(blocks)
        if isinstance(n_trace, bool) or not isinstance(n_trace, int) or n_trace < 0:
            raise ValueError(f"n_trace must be a non-negative integer (0: no traces), got {n_trace!r}")
        self.n_trace = n_trace
        self.tol = _validate.positive_float("tol", tol, below=1.0)
        self.max_hvp_per_block = _validate.positive_int("max_hvp_per_block", max_hvp_per_block, minimum=2)
        self.max_hvp = None if max_hvp is None else _validate.positive_int("max_hvp", max_hvp)
        self.image = _validate.flag("image", image)
        self._last: BlockResult | None = None
        self._param_names: list[str] | None = None
        self._n_blocks: int | None = None

    def expected_hvps(self) -> float:
        if self._n_blocks is not None:
            n_blocks = self._n_blocks
        elif self.blocks is None:
            n_blocks = _GUESSED_BLOCKS
        else:
            n_blocks = len(self.blocks) + 1  # the patterns and, perhaps, "_rest"
        eigen = n_blocks * self.max_hvp_per_block
        if self.max_hvp is not None:
            eigen = min(eigen, self.max_hvp)
        return float(self.n_trace + eigen)

    def run(self, ctx: StepContext) -> InstrumentOutput:
        objective = ctx.objective
        names = list(objective.param_names)
        init = self._last if self._param_names == names else None
        result = block_spectrum(
            objective,
            self.blocks,
            n_trace=self.n_trace,
            tol=self.tol,
            max_hvp_per_block=self.max_hvp_per_block,
            max_hvp=self.max_hvp,
            init=init,
            seed=ctx.seed,
        )
        self._last, self._param_names, self._n_blocks = result, names, len(result.blocks)
        metrics = result.metrics()
        if self.n_trace == 0:
            metrics = {k: v for k, v in metrics.items() if not k.endswith("/trace")}
        record = {
            "block_spectrum": {
                "trace": result.trace if self.n_trace else None,
                "trace_stderr": result.trace_stderr if self.n_trace > 1 else None,
                "n_samples": result.n_samples,
                "n_hvp": result.n_hvp,
                "n_hvp_trace": result.n_hvp_trace,
                "next_block": result.next_block,
                "warm_started": init is not None,
                "blocks": [
                    {
                        "name": b.name,
                        "num_params": b.num_params,
                        "trace": b.trace if self.n_trace else None,
                        "trace_stderr": b.trace_stderr if self.n_trace > 1 else None,
                        "lambda_max": b.lambda_max if b.measured else None,
                        "error_bound": b.error_bound if b.measured else None,
                        "converged": b.converged,
                        "n_hvp": b.n_hvp,
                    }
                    for b in result.blocks
                ],
            }
        }
        step = ctx.step

        def write(directory: Path) -> None:
            save_blocks(directory, step, result)

        artifacts = [Artifact("record", "block_spectrum", record), Artifact("save", SPECTRA_DIR, write)]
        if self.image:
            from lightning_hessian.render_density import blocks_figure

            artifacts.append(Artifact("image", "block_spectrum", _rgb(blocks_figure(result, step=step))))
        return InstrumentOutput(metrics, tuple(artifacts))

    def reset(self) -> None:
        self._last, self._param_names, self._n_blocks = None, None, None

    def state_dict(self) -> dict[str, Any]:
        last = self._last
        if last is None:
            return {"warm_start": None, "warm_start_params": None, "block_names": None, "next_block": 0}
        return {
            "warm_start": {b.name: None if b.vector is None else b.vector.detach().cpu().clone() for b in last.blocks},
            "warm_start_params": list(self._param_names or []),
            "block_names": list(last.names),
            "next_block": int(last.next_block),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vectors = state.get("warm_start")
        names = state.get("block_names")
        if not vectors or not names:
            self._last, self._param_names, self._n_blocks = None, None, None
            return
        nan = float("nan")
        stats = []
        for name in names:
            vec = vectors.get(name)
            vec = vec if isinstance(vec, Tensor) else None
            n = 0 if vec is None else int(vec.numel())
            stats.append(BlockStats(name, (), n, nan, nan, nan, nan, False, False, 0, vec))
        self._last = BlockResult(
            blocks=tuple(stats),
            trace=nan,
            trace_stderr=nan,
            n_samples=0,
            n_hvp=0,
            n_hvp_trace=0,
            next_block=int(state.get("next_block", 0)),
            tol=self.tol,
            seconds=0.0,
        )
        params = state.get("warm_start_params")
        self._param_names = list(params) if params is not None else None
        self._n_blocks = len(names)


def _block_spec(blocks: Any) -> BlockSpec:
    """Check the shape of a block specification at construction (names are matched at the first run)."""
    if blocks is None:
        return None
    if isinstance(blocks, Mapping):
        if not blocks:
            raise ValueError("blocks is empty; pass None for one block per module")
        for key, value in blocks.items():
            globs = [value] if isinstance(value, str) else value
            if (
                not isinstance(key, str)
                or not isinstance(globs, Sequence)
                or not globs
                or not all(isinstance(g, str) for g in globs)
            ):
                raise ValueError(
                    f"blocks must map block names to a glob string or a non-empty list of globs, got {key!r}: {value!r}"
                )
        return {str(k): (v if isinstance(v, str) else list(v)) for k, v in blocks.items()}
    if isinstance(blocks, (list, tuple)) and blocks and all(isinstance(g, str) for g in blocks):
        return list(blocks)
    raise ValueError(
        "blocks must be None (one block per module that owns parameters), a mapping {name: glob or [globs]} "
        f"or a non-empty list of glob strings; got {blocks!r}"
    )
