"""Training steps after a measurement, on CPU: glibc's allocator, not the monitor's hooks, makes them slower.

Issue 8's ResNet runs were slower on the wall than the monitor's own measuring clock says. This
script isolates the cause: it trains the CIFAR-shaped ResNet of ``bench_memory.py`` (batch 128,
momentum SGD, one torch thread) in blocks of steps and, between blocks, either runs a default
``lambda_max`` measurement (``Objective`` with ``hvp="auto"`` + ``extremal_eigenpairs``) or sleeps
(control). It prints the median step time and the minor page faults per step of each block.

Each configuration runs in its own process, so the allocator starts fresh; ``--malloc-env`` also
runs both with glibc's dynamic mmap threshold replaced by fixed, large thresholds
(``MALLOC_MMAP_THRESHOLD_=256 MiB``, ``MALLOC_TRIM_THRESHOLD_=1 GiB``), which keeps freed memory in
the heap instead of returning it to the system and faulting it in again.

Run: ``python benchmarks/bench_allocator.py`` (about 3-4 minutes on one core; add ``--malloc-env``
for the fixed-threshold pair). Writes ``results/allocator.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lightning_hessian.allocator import DEFAULT_MMAP_THRESHOLD, DEFAULT_TRIM_THRESHOLD

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "allocator.json"
# the thresholds lightning_hessian.pin_malloc_thresholds() sets (256 MiB, 1 GiB)
FIXED_THRESHOLDS = {
    "MALLOC_MMAP_THRESHOLD_": str(DEFAULT_MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(DEFAULT_TRIM_THRESHOLD),
}


def worker(action: str, blocks: int, steps: int) -> dict[str, Any]:
    """Train ``blocks + 1`` blocks of ``steps``; between blocks measure (``action="measure"``) or sleep."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    from bench_memory import ResNet, ce_loss
    from bench_overhead import BATCH, upscaled_digits

    from lightning_hessian import Objective, extremal_eigenpairs

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ResNet()
    x_all, y_all = upscaled_digits(BATCH * 40)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def block(n: int) -> tuple[float, float]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for j in range(n):
            k = j % 40
            x, y = x_all[k * BATCH : (k + 1) * BATCH], y_all[k * BATCH : (k + 1) * BATCH]
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n

    block(5)  # warm-up
    rows = [block(steps)]
    for _ in range(blocks):
        if action == "measure":
            objective = Objective(model, ce_loss, [(x_all[:BATCH], y_all[:BATCH])])
            extremal_eigenpairs(objective, which="top", tol=1e-3)
            del objective
        else:
            time.sleep(8.0)
        rows.append(block(steps))
    return {"action": action, "step_seconds": [r[0] for r in rows], "faults_per_step": [r[1] for r in rows]}


def run(action: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", action, "--blocks", str(args.blocks), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env={**os.environ, **env}, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="measurements (or pauses) between blocks")
    parser.add_argument("--steps", type=int, default=30, help="training steps per block")
    parser.add_argument("--malloc-env", action="store_true", help="also run with fixed glibc thresholds")
    parser.add_argument("--worker", choices=("measure", "control"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.blocks, args.steps)))
        return
    print(f"load average at start: {os.getloadavg()}; one torch thread per process; {args.steps} steps per block")
    settings = {"glibc default": {}}
    if args.malloc_env:
        settings["fixed thresholds"] = FIXED_THRESHOLDS
    results = []
    print(f"{'allocator':<16} {'between blocks':<15} {'median step seconds per block':<36} minor page faults per step")
    for label, env in settings.items():
        for action in ("control", "measure"):
            r = run(action, env, args)
            r["allocator"] = label
            results.append(r)
            secs = " ".join(f"{s:.3f}" for s in r["step_seconds"])
            faults = " ".join(f"{f:,.0f}" for f in r["faults_per_step"])
            print(f"{label:<16} {action:<15} {secs:<36} {faults}", flush=True)
    print(
        "blocks: before any measurement, then after each measurement (or pause); a slower block after a measurement "
        "with more page faults, and none after a pause, is the allocator's doing"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"load": os.getloadavg(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
