"""The loss-landscape instrument: the random and the Hessian plane around the current weights, as a snapshot."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch

from lightning_hessian import _validate
from lightning_hessian.frames import PLANES, FrameState, LandscapeConfig, landscape_frame
from lightning_hessian.instruments.base import Artifact, Instrument, InstrumentOutput, StepContext

MAX_RESOLUTION = 201  # 201**2 probe-set passes per plane is already hours on a real model


class Landscape(Instrument):
    """2-D loss surfaces along random (Li et al.) and dominant Hessian directions (Böttcher & Wheeler).

    A snapshot costs ``resolution**2`` forward passes of the probe set per plane (and per
    validation set), plus the 1-D cuts; the Hessian plane uses the eigenvectors measured at the
    same step (shared with :class:`Eigenvalues`, never a second Lanczos run).

    Args:
        planes: ``"random"`` (filter-normalised Gaussian directions, fixed for the run) and/or
            ``"hessian"`` (eigenvectors of lambda_max and lambda_min), drawn side by side.
        resolution: odd number of grid points per axis (the weights sit at the centre).
        span: half-width of the planes; ``None``: 1 filter unit for random planes and the curvature
            scale (capped) for Hessian planes, recorded with every snapshot.
        normalization: of the random directions: ``"filter"``, ``"layer"`` or ``"none"``.
        orthogonalize: make the second random direction orthogonal to the first.
        val_dataloader: validation batches evaluated on the same planes.
        max_span: cap of a Hessian plane's curvature-scale half-width, as a fraction of the weights'
            norm (``None``: no cap); what was chosen is recorded in every snapshot.
        log_scale: colour scale of the pictures: ``"auto"`` (log when the losses span more than
            about 1.5 decades), ``True`` or ``False``.
        shared_scale: one colour scale for both planes (to compare their values) instead of one per
            plane (the default: the planes span different distances, and a shared scale can paint
            the Hessian plane in one colour).
        animation: ``"end"``: an animated GIF of all frames at the end of fit; ``"always"``: also
            refreshed after every snapshot; ``"never"``.
        every_n_steps, every_n_epochs: cadence (default: every epoch).

    Scalars (under the landscape prefix): the planes' curvatures, minima found on the grids, cost.
    """

    name = "landscape"
    namespace = "landscape"

    def __init__(
        self,
        planes: Sequence[str] = PLANES,
        resolution: int = 21,
        span: float | None = None,
        normalization: str = "filter",
        orthogonalize: bool = False,
        max_span: float | None = 0.5,
        val_dataloader: Iterable[Any] | None = None,
        log_scale: bool | str = "auto",
        shared_scale: bool = False,
        animation: str = "end",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
    ) -> None:
        if every_n_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        super().__init__(every_n_steps, every_n_epochs)
        _validate.names("planes", planes, PLANES)
        _validate.positive_int("resolution", resolution, minimum=3, maximum=MAX_RESOLUTION)
        if span is not None:
            _validate.positive_float("span", span)
        _validate.choice("normalization", normalization, ("filter", "layer", "none"))
        _validate.flag("orthogonalize", orthogonalize)
        self.val_dataloader = _validate.batches_source("val_dataloader", val_dataloader)
        if log_scale != "auto" and not isinstance(log_scale, bool):
            raise ValueError(f"log_scale must be 'auto', True or False, got {log_scale!r}")
        self.log_scale = log_scale
        self.shared_scale = _validate.flag("shared_scale", shared_scale)
        if max_span is not None:
            _validate.positive_float("max_span", max_span)
        self.max_span = max_span
        self.animation = _validate.choice("animation", animation, ("end", "always", "never"))
        self.planes = tuple(planes)
        self.resolution = resolution
        self.span = span
        self.normalization = normalization
        self.orthogonalize = orthogonalize
        self.config = LandscapeConfig(
            planes=self.planes,
            resolution=resolution,
            span=span,
            normalization=normalization,  # type: ignore[arg-type]
            orthogonalize=orthogonalize,
            max_span=max_span,
        )
        self.state = FrameState()

    def expected_hvps(self) -> float:
        grids = len(self.planes) * self.resolution**2 * (2 if self.val_dataloader is not None else 1)
        return grids / 3 + (30.0 if "hessian" in self.planes else 0.0)

    def run(self, ctx: StepContext) -> InstrumentOutput:
        eigen = ctx.eigenpairs(both_ends=True) if "hessian" in self.planes else None
        config = self.config if self.config.seed == ctx.seed else _with_seed(self.config, ctx.seed)
        with ctx.progress(f"landscape at step {ctx.step}", self._points(ctx)) as update:
            snap = landscape_frame(
                ctx.objective,
                config,
                self.state,
                step=ctx.step,
                epoch=ctx.epoch,
                eigen=eigen,
                val_objective=ctx.val_objective,
                progress=update,
            )
        return InstrumentOutput(dict(snap.scalars), (Artifact("snapshot", "landscape", snap),))

    def _points(self, ctx: StepContext) -> int:
        """Grid and cut points this snapshot evaluates (each one probe-set forward pass)."""
        per_set = len(self.planes) * self.resolution**2
        if "hessian" in self.planes and self.config.lines:
            per_set += 2 * self.config.line_resolution
        return per_set * (2 if ctx.val_objective is not None else 1)

    def reset(self) -> None:
        self.state = FrameState()

    def to_device(self, device: torch.device) -> None:
        """Move the run's fixed planes to the model's device (after a resume)."""
        self.state.random_plane = _pair_to(self.state.random_plane, device)
        self.state.hessian_plane = _pair_to(self.state.hessian_plane, device)

    def state_dict(self) -> dict[str, Any]:
        cpu = torch.device("cpu")
        return {
            "random_plane": _pair_to(self.state.random_plane, cpu),
            "hessian_plane": _pair_to(self.state.hessian_plane, cpu),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = FrameState(random_plane=state.get("random_plane"), hessian_plane=state.get("hessian_plane"))


def _with_seed(config: LandscapeConfig, seed: int) -> LandscapeConfig:
    return replace(config, seed=seed)


def _pair_to(pair: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device) -> Any:
    return None if pair is None else (pair[0].to(device), pair[1].to(device))
