#!/usr/bin/env python
"""Start-vector benchmark: HVPs Lanczos needs for lambda_max from different start vectors during training.

A monitor measures lambda_max again and again along a training run, so the start vector is the
cheapest knob it has: a random vector (a cold start), the previous measurement's eigenvector (a
warm start, ``init=``) or a random vector plus the probe gradient (``guide=``, a guided start: during
training the gradient lies mostly in the top eigenspace). This script trains the CIFAR-shaped
ResNet-14 of ``bench_memory.py`` (175,258 parameters, BatchNorm) on ``bench_overhead.py``'s
upscaled digits (batch 128, momentum SGD lr 0.05 / momentum 0.9, seed 0, cycling through 390
batches: one CIFAR-10-length epoch) with a plain PyTorch loop. At each point of ``--steps`` it
builds ``Objective(model, ce_loss, [probe], hvp="cached")`` on the first training batch and runs
``extremal_eigenpairs(which="top")`` at each of ``--tols`` (default 1e-3 and 1e-2) from four start vectors:

- ``random``: ``init=None`` (seed 0);
- ``gradient-guided``: ``guide=objective.grad()``;
- ``warm``: ``init=`` the previous point's measurement at the first of ``--tols`` (its ``EigenResult``), as a monitor
  with warm starts holds it (the ``warm`` row's; the ``random`` row's at the first point);
- ``warm + gradient``: ``init=`` unit(previous top eigenvector) + unit(gradient), as a tensor.

For each: HVPs and the actual relative error against a tight reference (random start, tol 1e-6,
``max_hvp=200``, same objective). It also prints |cos(g, v1)| and |cos(previous v, v1)|, v1 being the
reference top eigenvector. Warm starts have no previous measurement at the first point (empty rows).

Run: ``nice -n 5 python benchmarks/bench_start_vectors.py [--steps 1 10 100 360 560 725 900] [--tols 1e-3 1e-2]
[--threads 1]``
(about 10-15 minutes on one core). Raw numbers: ``benchmarks/results/start_vectors.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lightning_hessian
from lightning_hessian import EigenResult, Objective, extremal_eigenpairs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import ResNet, ce_loss
from bench_overhead import BATCH, upscaled_digits

RESULTS = Path(__file__).resolve().parent / "results" / "start_vectors.json"
STARTS = ("random", "gradient-guided", "warm", "warm + gradient")
TOLS = (1e-3, 1e-2)
EPOCH_BATCHES = 390
SEED = 0
IMPORTED = ("bench_memory.py", "bench_overhead.py")


def unit(v: Tensor) -> Tensor:
    return v / v.norm()


def abs_cos(a: Tensor, b: Tensor) -> float:
    return float((unit(a.double()) @ unit(b.double())).abs())


def git(*args: str) -> str:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()


def measure(
    model: torch.nn.Module, probe: Any, prev: EigenResult | None, tols: list[float]
) -> tuple[dict[str, Any], EigenResult]:
    """Reference and the four starts at each tolerance; returns the row and the next ``prev`` (at ``tols[0]``)."""
    obj = Objective(model, ce_loss, [probe], hvp="cached")
    t0 = time.perf_counter()
    with obj.session():  # one cached gradient graph for every call at this point
        g = obj.grad()
        ref = extremal_eigenpairs(obj, which="top", tol=1e-6, max_hvp=200)
        v1 = ref.eigenvectors[0]
        inits: dict[str, dict[str, Any]] = {"random": {}, "gradient-guided": {"guide": g}}
        if prev is not None:
            inits["warm"] = {"init": prev}
            inits["warm + gradient"] = {"init": unit(prev.eigenvectors[0]) + unit(g)}
        runs: dict[str, dict[str, Any]] = {}
        results: dict[str, EigenResult] = {}
        for name, kw in inits.items():
            runs[name] = {}
            for tol in tols:
                res = extremal_eigenpairs(obj, which="top", tol=tol, **kw)
                if tol == tols[0]:
                    results[name] = res
                runs[name][str(tol)] = {
                    "n_hvp": res.n_hvp,
                    "lambda_max": res.lambda_max,
                    "rel_error": abs(res.lambda_max - ref.lambda_max) / abs(ref.lambda_max),
                    "error_bound": res.error_bounds[0],
                    "converged": res.converged_max,
                }
    row = {
        "loss": obj.loss(),
        "lambda_max_ref": ref.lambda_max,
        "ref_n_hvp": ref.n_hvp,
        "ref_converged": ref.converged_max,
        "ref_residual": ref.residuals[0],
        "cos_grad_v1": abs_cos(g, v1),
        "cos_prev_v1": None if prev is None else abs_cos(prev.eigenvectors[0], v1),
        "starts": runs,
        "seconds": time.perf_counter() - t0,
    }
    return row, results["warm" if prev is not None else "random"]


def train_and_measure(steps: list[int], tols: list[float]) -> list[dict[str, Any]]:
    torch.manual_seed(SEED)
    model = ResNet()
    x, y = upscaled_digits(EPOCH_BATCHES * BATCH)
    batches = [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(EPOCH_BATCHES)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rows: list[dict[str, Any]] = []
    prev: EigenResult | None = None
    step = 0
    for target in sorted(set(steps)):
        model.train()
        while step < target:
            opt.zero_grad(set_to_none=True)
            ce_loss(model, batches[step % EPOCH_BATCHES]).backward()
            opt.step()
            step += 1
        row, prev = measure(model, batches[0], prev, tols)
        rows.append({"step": step, **row})
        print_point(rows[-1], tols)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_point(row: dict[str, Any], tols: list[float]) -> None:
    print(
        f"\nstep {row['step']}: probe loss {row['loss']:.4f}, lambda_max {row['lambda_max_ref']:.6g} "
        f"(reference: {row['ref_n_hvp']} HVPs, converged {row['ref_converged']}), |cos(g, v1)| "
        f"{row['cos_grad_v1']:.3f}, |cos(prev v, v1)| {_fmt(row['cos_prev_v1'], '.3f')}, {row['seconds']:.0f} s"
    )
    print(f"  {'start':<16}" + "".join(f" {'HVP@' + format(t, 'g'):>8} {'err@' + format(t, 'g'):>9}" for t in tols))
    for name in STARTS:
        r = row["starts"].get(name)
        if r is None:
            print(f"  {name:<16}" + "".join(f" {'-':>8} {'-':>9}" for _ in tols))
            continue
        cells = [r[str(t)] for t in tols]
        print(
            f"  {name:<16}"
            + "".join(f" {c['n_hvp']:>8} {c['rel_error']:>9.1e}" for c in cells)
            + ("" if all(c["converged"] for c in cells) else "  (not converged)")
        )
    sys.stdout.flush()


def summary(rows: list[dict[str, Any]], tols: list[float]) -> dict[str, dict[str, Any]]:
    """Per start vector: mean HVPs over the points where it ran and over the points where every start ran
    (warm starts have no first point), and the largest error."""
    later = [r for r in rows if len(r["starts"]) == len(STARTS)]
    out: dict[str, dict[str, Any]] = {}
    for name in STARTS:
        runs = [r["starts"][name] for r in rows if name in r["starts"]]
        out[name] = {"points": len(runs)}
        for tol in map(str, tols):
            out[name][f"mean_hvp_{tol}"] = sum(r[tol]["n_hvp"] for r in runs) / max(len(runs), 1)
            hvps = [r["starts"][name][tol]["n_hvp"] for r in later]
            out[name][f"mean_hvp_{tol}_warm_points"] = sum(hvps) / max(len(hvps), 1)
            out[name][f"max_error_{tol}"] = max((r[tol]["rel_error"] for r in runs), default=None)
    return out


def print_summary(means: dict[str, dict[str, Any]], tols: list[float]) -> None:
    print("\nmean HVPs per start vector (all points where it ran | the points with a previous measurement)")
    print(f"  {'start':<16} {'points':>6}" + "".join(f" {'HVP@' + format(t, 'g'):>13} {'max err':>8}" for t in tols))
    for name, m in means.items():
        cells = [
            f" {m[f'mean_hvp_{t}']:.2f} | {m[f'mean_hvp_{t}_warm_points']:.2f}".rjust(14)
            + f" {_fmt(m[f'max_error_{t}'], '.1e'):>8}"
            for t in map(str, tols)
        ]
        print(f"  {name:<16} {m['points']:>6}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 10, 100, 360, 560, 725, 900])
    parser.add_argument(
        "--tols", type=float, nargs="+", default=list(TOLS), help="tolerances (warm starts carry the first one's)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, set explicitly)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"lightning_hessian {lightning_hessian.__version__}, torch {torch.__version__}, torch threads "
        f"{torch.get_num_threads()} (set explicitly), {os.cpu_count()} CPUs; load average (1/5/15 min) "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "lightning_hessian", *(f"benchmarks/{f}" for f in IMPORTED)).splitlines()
    t0 = time.perf_counter()
    rows = train_and_measure(args.steps, args.tols)
    means = summary(rows, args.tols)
    print_summary(means, args.tols)
    end = os.getloadavg()
    print(f"{time.perf_counter() - t0:.0f} s; load average at end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    meta = {
        "lightning_hessian": lightning_hessian.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_start": list(load),
        "loadavg_end": list(end),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,  # read at start: the code this run imported
        "uncommitted_files": dirty,
        "seconds": time.perf_counter() - t0,
        "tols": args.tols,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "points": rows, "means": means}, indent=1))
    print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()
