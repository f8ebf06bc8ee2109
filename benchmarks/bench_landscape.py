#!/usr/bin/env python
"""Landscape benchmark: the cost of a 21x21 loss plane per grid point, against one forward pass.

On the same model, probe batches and 21x21 grid (span 1), in one run, it times:

1. **ours**: :func:`lightning_hessian.landscape.loss_surface` on an :class:`Objective`
   (filter-normalised random directions from :func:`random_direction`, span 1, resolution 21);
2. **plain in-place loop**: eval mode, ``torch.no_grad()``, ``p.copy_(w0 + a*d1 + b*d2)`` for every
   point, the loss over the same batches, weights and modes restored in ``finally``. Same
   directions as ours, so the two grids must agree (checked to 1e-5, typically ~1e-7);
3. **loss-landscapes** 3.0.6 (PyPI, ``pip install --no-deps loss-landscapes``):
   ``random_plane(model, metric, distance=1, steps=21, normalization="filter",
   deepcopy_model=True)``. Its directions are its own (uniform [0, 1), then filter-normalised).
   They change the cost only through the data: on the CNN they switch every ReLU on, which makes
   its forward passes ~5 % faster than at our points (measured separately), so its CNN ratio
   below 1 forward pass per point is not a faster loop. Two metrics: a
   ``loss_landscapes.metrics.Loss`` subclass that evaluates the same batches as ours (same work),
   and the stock ``Loss`` on the whole probe set as one batch (how the package is normally used).
   Its time includes its deep copy of the model and its direction sampling (a few milliseconds).

Each is reported per grid point relative to ONE forward pass of the probe set (all batches, eval
mode, ``no_grad``; the median of several, measured in every round). Everything runs on one torch
thread; methods are interleaved over ``--rounds`` rounds (order rotated each round) and the
minimum per method is used for the ratios (medians are printed too). Wall and process CPU seconds
are both shown: on a shared machine CPU seconds are the steadier measure.

Also checked: ours equals the plain loop, ours' centre cell equals ``Objective.loss()``, and
whether each method leaves the model unchanged (parameters, buffers, ``requires_grad``, module
modes), for loss-landscapes with and without ``deepcopy_model``, in eval and in train mode.

Models: an MLP 784-256-128-10 (235,146 parameters; 512 random samples in 4 batches of 128) and a
small CNN with BatchNorm (3 conv+BN+ReLU blocks, max-pooling, 2 linear layers; 89,946 parameters;
256 random 3x16x16 images in 2 batches of 128), each after 10 SGD steps so that BN running
statistics are real, and in eval mode for the timings.

Run: ``python benchmarks/bench_landscape.py [--rounds 3] [--wait-load 1.5]`` (about 70 s
on an idle 2-core CPU machine). ``--wait-load X`` first waits (30 s steps, at most 10 minutes)
until the 1-minute load average is below X. Prints readable tables and writes the raw numbers to
``benchmarks/results/landscape.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_hessian
from lightning_hessian import Objective
from lightning_hessian.landscape import loss_surface, random_direction

try:
    import loss_landscapes
    from loss_landscapes.metrics import Loss as LLLoss

    LL_VERSION: str | None = importlib.metadata.version("loss-landscapes")
except ImportError:  # pragma: no cover - optional anchor
    loss_landscapes = None
    LLLoss = object
    LL_VERSION = None

RESULTS = Path(__file__).resolve().parent / "results" / "landscape.json"
RESOLUTION = 21
SPAN = 1.0
SEED = 0

Batch = tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------- problems
def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def make_cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def make_problem(name: str) -> tuple[nn.Module, list[Batch], str]:
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    if name == "mlp":
        model, n, bs, shape = make_mlp(), 512, 128, (784,)
        desc = "MLP 784-256-128-10, 512 random samples in 4 batches of 128"
    else:
        model, n, bs, shape = make_cnn(), 256, 128, (3, 16, 16)
        desc = "CNN 3x(conv+BN+ReLU) + 2 linear, 256 random 3x16x16 images in 2 batches of 128"
    x = torch.randn(n, *shape, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    batches = [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]
    # A few SGD steps in train mode, so that BatchNorm running statistics are real.
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(10):
        xb, yb = batches[step % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model, batches, desc


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# ----------------------------------------------------------------------------- methods
def forward_pass(model: nn.Module, batches: list[Batch]) -> float:
    """One forward pass of the probe set (eval mode is set by the caller), sample-weighted mean loss."""
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            total += len(batch[1]) * float(loss_fn(model, batch))
    return total / sum(len(b[1]) for b in batches)


def run_ours(objective: Objective, d1: Tensor, d2: Tensor) -> np.ndarray:
    surface = loss_surface(objective, d1, d2, span=SPAN, resolution=RESOLUTION)
    assert surface.n_loss == RESOLUTION**2, surface.n_loss
    return surface.losses


def run_plain(
    model: nn.Module, batches: list[Batch], d1: Tensor, d2: Tensor, resolution: int = RESOLUTION
) -> np.ndarray:
    """The straightforward loop: write ``w0 + a d1 + b d2`` into the parameters in place, restore in ``finally``."""
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    d1s, d2s, offset = [], [], 0
    for p in params:
        d1s.append(d1[offset : offset + p.numel()].view_as(p))
        d2s.append(d2[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    coords = np.linspace(-SPAN, SPAN, resolution)
    coords[resolution // 2] = 0.0
    modes = [(m, m.training) for m in model.modules()]
    out = np.empty((resolution, resolution))
    model.eval()
    try:
        with torch.no_grad():
            for i, b in enumerate(coords):
                for j, a in enumerate(coords):
                    for p, w, u, v in zip(params, w0, d1s, d2s):
                        p.copy_(w + float(a) * u + float(b) * v)
                    out[i, j] = forward_pass(model, batches)
    finally:
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
        for m, training in modes:
            m.training = training
    return out


class BatchedLoss(LLLoss):  # type: ignore[misc, valid-type]
    """``loss_landscapes.metrics.Loss`` over the same probe batches as ours (sample-weighted mean)."""

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor], batches: list[Batch]) -> None:
        super().__init__(loss, torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        self.batches = batches
        self.n = sum(len(y) for _, y in batches)

    def __call__(self, model_wrapper: Any) -> float:
        total = 0.0
        for x, y in self.batches:
            total += len(y) * self.loss_fn(model_wrapper.forward(x), y).item()
        return total / self.n


def run_ll(model: nn.Module, metric: Any, deepcopy_model: bool = True, steps: int = RESOLUTION) -> np.ndarray:
    torch.manual_seed(SEED)  # its directions come from the global RNG
    out: np.ndarray = loss_landscapes.random_plane(
        model, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=deepcopy_model
    )
    assert out.shape == (steps, steps), out.shape
    return out


# ----------------------------------------------------------------------------- side effects
def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "grads": {n: p.grad is None for n, p in model.named_parameters()},
    }


def compare(before: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    after = snapshot(model)
    moved = [n for n, p in before["params"].items() if not torch.equal(p, after["params"][n])]
    num = sum(float((after["params"][n] - before["params"][n]).norm() ** 2) for n in moved)
    den = sum(float(p.norm() ** 2) for p in before["params"].values())
    res = {
        "params_changed": len(moved),
        "params_rel_change": (num / den) ** 0.5 if den else 0.0,
        "buffers_changed": sum(not torch.equal(b, after["buffers"][n]) for n, b in before["buffers"].items()),
        "requires_grad_flipped": sum(v != after["requires_grad"][n] for n, v in before["requires_grad"].items()),
        "modes_changed": sum(v != after["training"][n] for n, v in before["training"].items()),
        "grads_changed": sum(v != after["grads"][n] for n, v in before["grads"].items()),
    }
    res["unchanged"] = not any(v for k, v in res.items() if k != "params_rel_change")
    return res


def describe(res: dict[str, Any]) -> str:
    if res["unchanged"]:
        return "none (bit-identical)"
    parts = []
    if res["params_changed"]:
        parts.append(f"{res['params_changed']} params moved (rel. norm {res['params_rel_change']:.2f})")
    if res["buffers_changed"]:
        parts.append(f"{res['buffers_changed']} buffers changed")
    if res["requires_grad_flipped"]:
        parts.append(f"requires_grad off on {res['requires_grad_flipped']}")
    if res["modes_changed"]:
        parts.append(f"{res['modes_changed']} module modes changed")
    if res["grads_changed"]:
        parts.append(f"{res['grads_changed']} .grad changed")
    return "; ".join(parts)


def side_effects(model: nn.Module, batches: list[Batch], d1: Tensor, d2: Tensor) -> list[dict[str, Any]]:
    """Each method on a copy of the model, 5x5 grid, with the copy in eval and in train mode."""
    rows = []
    for mode in ("eval", "train"):
        runs: list[tuple[str, Callable[[nn.Module], Any]]] = [
            (
                "ours",
                lambda m: loss_surface(Objective(m, loss_fn, batches), d1, d2, span=SPAN, resolution=5),
            ),
            ("plain in-place loop", lambda m: run_plain(m, batches, d1, d2, resolution=5)),
        ]
        if loss_landscapes is not None:
            runs += [
                (
                    "loss-landscapes deepcopy_model=True",
                    lambda m: run_ll(m, BatchedLoss(F.cross_entropy, batches), True, steps=5),
                ),
                (
                    "loss-landscapes deepcopy_model=False",
                    lambda m: run_ll(m, BatchedLoss(F.cross_entropy, batches), False, steps=5),
                ),
            ]
        for name, fn in runs:
            m = copy.deepcopy(model).train(mode == "train")
            before = snapshot(m)
            fn(m)
            rows.append({"mode": mode, "method": name, **compare(before, m)})
    return rows


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def run_model(name: str, rounds: int, n_forward: int) -> dict[str, Any]:
    model, batches, desc = make_problem(name)
    n_params = sum(p.numel() for p in model.parameters())
    objective = Objective(model, loss_fn, batches)
    d1 = random_direction(objective, seed=1, normalization="filter")
    d2 = random_direction(objective, seed=2, normalization="filter")
    x_all, y_all = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    methods: dict[str, Callable[[], Any]] = {
        "ours (loss_surface)": lambda: run_ours(objective, d1, d2),
        "plain in-place loop": lambda: run_plain(model, batches, d1, d2),
    }
    if loss_landscapes is not None:
        batched, stock = BatchedLoss(F.cross_entropy, batches), LLLoss(F.cross_entropy, x_all, y_all)
        methods["loss-landscapes (same batches)"] = lambda: run_ll(model, batched)
        methods["loss-landscapes (stock Loss, 1 batch)"] = lambda: run_ll(model, stock)

    before = snapshot(model)
    forward_pass(model, batches)  # warm-up
    fwd_wall: list[float] = []
    fwd_cpu: list[float] = []
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in methods}
    outputs: dict[str, Any] = {}
    names = list(methods)
    for r in range(rounds):
        for _ in range(n_forward):
            w, c, _ = timed(lambda: forward_pass(model, batches))
            fwd_wall.append(w)
            fwd_cpu.append(c)
        for k in names[r % len(names) :] + names[: r % len(names)]:
            w, c, out = timed(methods[k])
            times[k]["wall"].append(w)
            times[k]["cpu"].append(c)
            outputs[k] = out
        print(f"  [{name}] round {r + 1}/{rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)
    after = compare(before, model)  # ours, plain loop and loss-landscapes (deepcopy) on the real model

    ours, plain = outputs["ours (loss_surface)"], outputs["plain in-place loop"]
    max_diff = float(np.abs(ours - plain).max())
    centre_diff = abs(float(ours[RESOLUTION // 2, RESOLUTION // 2]) - objective.loss())
    assert max_diff < 1e-5, f"ours and the plain loop differ by {max_diff}"
    assert centre_diff < 1e-6, f"centre cell differs from Objective.loss() by {centre_diff}"

    fw, fc = statistics.median(fwd_wall), statistics.median(fwd_cpu)
    pts = RESOLUTION**2
    ref = min(times["ours (loss_surface)"]["cpu"]), min(times["ours (loss_surface)"]["wall"])
    summary = {}
    for k, t in times.items():
        cmin, wmin = min(t["cpu"]), min(t["wall"])
        summary[k] = {
            "wall_min_s": wmin,
            "wall_median_s": statistics.median(t["wall"]),
            "cpu_min_s": cmin,
            "cpu_median_s": statistics.median(t["cpu"]),
            "cpu_ms_per_point": 1e3 * cmin / pts,
            "wall_ms_per_point": 1e3 * wmin / pts,
            "point_per_forward_cpu": cmin / pts / fc,
            "point_per_forward_wall": wmin / pts / fw,
            "vs_ours_cpu": cmin / ref[0],
            "vs_ours_wall": wmin / ref[1],
        }
    return {
        "description": desc,
        "n_params": n_params,
        "n_samples": len(y_all),
        "n_batches": len(batches),
        "grid": f"{RESOLUTION}x{RESOLUTION}",
        "points": pts,
        "forward": {
            "wall_median_s": fw,
            "cpu_median_s": fc,
            "wall_s": fwd_wall,
            "cpu_s": fwd_cpu,
        },
        "times": times,
        "summary": summary,
        "checks": {
            "max_abs_diff_ours_vs_plain": max_diff,
            "centre_minus_objective_loss": centre_diff,
            "centre_loss": float(ours[RESOLUTION // 2, RESOLUTION // 2]),
            "model_after_timed_runs": after,
        },
        "side_effects": side_effects(model, batches, d1, d2),
    }


# ----------------------------------------------------------------------------- reporting
def table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A plain-text table; the first ``left`` columns are left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) if i < left else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(line.rstrip() for line in out)


def report(name: str, res: dict[str, Any], rounds: int) -> None:
    fwd = res["forward"]
    print(f"\n=== {name}: {res['description']}; {res['n_params']:,} parameters, {res['grid']} grid ===")
    print(
        f"one forward pass of the probe set (median of {len(fwd['cpu_s'])}): "
        f"{1e3 * fwd['wall_median_s']:.2f} ms wall, {1e3 * fwd['cpu_median_s']:.2f} ms CPU"
    )
    headers = [
        "method",
        "wall s min/med",
        "CPU s min/med",
        "CPU ms/point",
        "point/fwd CPU",
        "point/fwd wall",
        "/ours CPU",
        "/ours wall",
    ]
    rows = []
    for k, s in res["summary"].items():
        rows.append(
            [
                k,
                f"{s['wall_min_s']:.2f}/{s['wall_median_s']:.2f}",
                f"{s['cpu_min_s']:.2f}/{s['cpu_median_s']:.2f}",
                f"{s['cpu_ms_per_point']:.2f}",
                f"{s['point_per_forward_cpu']:.3f}",
                f"{s['point_per_forward_wall']:.3f}",
                f"{s['vs_ours_cpu']:.2f}x",
                f"{s['vs_ours_wall']:.2f}x",
            ]
        )
    print(f"(min over {rounds} interleaved rounds; point/fwd = time per grid point / one forward pass)")
    print(table(headers, rows))
    c = res["checks"]
    print(
        f"check: max |ours - plain loop| = {c['max_abs_diff_ours_vs_plain']:.2e} (same directions); "
        f"|centre - Objective.loss()| = {c['centre_minus_objective_loss']:.2e} (centre loss {c['centre_loss']:.6f})"
    )
    print(f"check: model after all timed runs: {describe(c['model_after_timed_runs'])}")
    print("side effects on a copy of the model, 5x5 grid:")
    print(
        table(
            ["mode", "method", "side effects"],
            [[r["mode"], r["method"], describe(r)] for r in res["side_effects"]],
            left=3,
        )
    )


def wait_for_load(threshold: float, max_wait: float) -> float:
    waited = 0.0
    while os.getloadavg()[0] >= threshold and waited < max_wait:
        print(f"load {os.getloadavg()[0]:.2f} >= {threshold}; waiting 30 s ({waited:.0f} s so far)", flush=True)
        time.sleep(30)
        waited += 30
    return waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forward-reps", type=int, default=7, help="forward passes timed per round")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--wait-load", type=float, default=0.0, help="wait until the 1-min load is below this")
    parser.add_argument("--max-wait", type=float, default=600.0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    waited = wait_for_load(args.wait_load, args.max_wait) if args.wait_load > 0 else 0.0
    load_run = os.getloadavg()
    print(f"lightning_hessian {lightning_hessian.__version__}, torch {torch.__version__}, loss-landscapes {LL_VERSION}")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(
        f"load average at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}; "
        f"waited {waited:.0f} s; at the run {load_run[0]:.2f}/{load_run[1]:.2f}/{load_run[2]:.2f}"
    )
    if loss_landscapes is None:
        print("loss-landscapes is not installed (pip install --no-deps loss-landscapes): its rows are skipped")
    start = time.perf_counter()
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name, args.rounds, args.forward_reps)
    for name, res in results.items():
        report(name, res, args.rounds)
    load_end = os.getloadavg()
    total = time.perf_counter() - start
    print(f"\nload average at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}; total {total:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "versions": {
            "lightning_hessian": lightning_hessian.__version__,
            "torch": torch.__version__,
            "loss_landscapes": LL_VERSION,
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "load_start": load_start,
        "load_run": load_run,
        "load_end": load_end,
        "waited_s": waited,
        "total_s": total,
        "models": results,
    }
    RESULTS.write_text(json.dumps(payload, indent=1))
    print(f"raw numbers: {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")


if __name__ == "__main__":
    main()
