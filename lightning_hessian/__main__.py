"""Command line: ``python -m lightning_hessian render RUN_DIR [--out DIR] [--log-scale | --linear] [--clip X] ...``.

``render`` re-draws saved landscape snapshots (PNG per snapshot plus ``animation.gif``, one
colour scale across frames) and saved spectra (spectral densities, the density over training,
block spectra: :func:`lightning_hessian.render_density.render_spectra`) without touching a model:
rendering never computes.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _percentile(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be a percentile between 0 and 100, got {text!r}")
    return value


def _levels(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got {text!r}")
    return value


def spectra_dirs(directory: Path) -> list[Path]:
    """Folders with saved spectra: ``directory`` and its sub-folders down to two levels (``spectra/<prefix>/``).

    A folder counts when it holds ``blocks_*.json`` files or ``step_*.npz`` files that are
    spectral densities (they have ``nodes``; landscape snapshots, named alike, do not).
    """
    import numpy as np

    from lightning_hessian.spectra_files import list_blocks, list_densities

    def holds_spectra(folder: Path) -> bool:
        if list_blocks(folder):
            return True
        densities = list_densities(folder)
        if not densities:
            return False
        with np.load(densities[0], allow_pickle=False) as data:
            return "nodes" in data.files

    directory = Path(directory)
    if not directory.is_dir():
        return []
    candidates = [directory, *sorted(p for p in directory.glob("*") if p.is_dir())]
    candidates += sorted(p for p in directory.glob("*/*") if p.is_dir())
    return [folder for folder in candidates if holds_spectra(folder)]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lightning_hessian`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hessian",
        description="lightning_hessian tools that work on saved results.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    render = commands.add_parser(
        "render",
        help="re-render saved landscape snapshots to PNGs and an animated GIF, and saved spectra",
        description=(
            "Render every landscape snapshot (step_*.npz) of RUN_DIR to a PNG, plus animation.gif, "
            "with each plane's colour scale and extent fixed across all frames. RUN_DIR is a "
            "snapshot directory or a run directory with landscape/<prefix>/ folders (each prefix "
            "is rendered). Saved spectra (spectral densities and block spectra in RUN_DIR or in its "
            "sub-folders up to two levels down, such as spectra/<prefix>/) are re-drawn too: a PNG "
            "per file and density_evolution.png; the landscape options do not apply to them."
        ),
    )
    render.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="snapshot directory or run directory")
    render.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="output folder (default: next to the snapshots)"
    )
    scale = render.add_mutually_exclusive_group()
    scale.add_argument(
        "--log-scale",
        dest="log_scale",
        action="store_const",
        const=True,
        default="auto",
        help="colour by log10(loss); losses <= 0 are masked (default: log when the losses span > 1.5 decades)",
    )
    scale.add_argument(
        "--linear", dest="log_scale", action="store_const", const=False, help="colour by the loss itself"
    )
    render.add_argument(
        "--shared-scale", action="store_true", help="one colour scale for all planes (default: one per plane)"
    )
    render.add_argument(
        "--percentiles",
        type=_percentile,
        nargs=2,
        default=(1.0, 98.0),
        metavar=("LOW", "HIGH"),
        help="colour limits at these percentiles of the finite losses (default 1 98; 0 100: the extremes)",
    )
    render.add_argument("--clip", type=_finite_float, default=None, metavar="X", help="cap the colour scale at loss X")
    render.add_argument(
        "--fps", type=_positive_float, default=2.0, metavar="F", help="animation frames per second (default 2)"
    )
    render.add_argument(
        "--levels", type=_levels, default=20, metavar="N", help="maximum number of colour bands (default 20)"
    )
    render.add_argument("--show-val", action="store_true", help="add the validation planes as a second row")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (2 for usage errors and when no snapshot is found)."""
    args = build_parser().parse_args(argv)
    if args.command == "render":
        from lightning_hessian.render import NoSnapshotsError, render_run, snapshot_dirs
        from lightning_hessian.render_density import render_spectra

        def landscape(directory: Path, out: Path | None) -> list[Path]:
            return render_run(
                directory,
                out=out,
                log_scale=args.log_scale,
                clip=args.clip,
                fps=args.fps,
                levels=args.levels,
                show_val=args.show_val,
                shared_scale=args.shared_scale,
                percentiles=tuple(args.percentiles),
            )

        spectra = spectra_dirs(args.run_dir)
        landscapes = snapshot_dirs(args.run_dir)
        kept = [d for d in landscapes if d not in spectra]  # density files are step_*.npz too
        try:
            if kept == landscapes and (landscapes or not spectra):
                paths = landscape(args.run_dir, args.out)
            else:
                paths = []
                for source in kept:
                    target = None if args.out is None else args.out / source.name
                    paths += landscape(source, target)
            for source in spectra:
                target = None if args.out is None else args.out / source.relative_to(args.run_dir)
                paths += render_spectra(source, target)
        except NoSnapshotsError as exc:
            print(f"error: {exc}; no spectra (step_*.npz densities, blocks_*.json) either", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for path in paths:
            print(path)
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
