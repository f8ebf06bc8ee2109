#!/usr/bin/env python
"""Memory benchmark: peak memory and time of each measurement with each HVP engine, against a training step.

For each model it runs, each in a **fresh subprocess** (so that one configuration's peak never
hides another's):

- ``train``: one training step, forward and backward of one batch in train mode (the reference);
- ``lambda_max``: :func:`extremal_eigenpairs` (``which="top"``) with a fixed HVP budget;
- ``lambda_min``: the same with ``which="both"`` (both ends from one Krylov space);
- ``trace``: :func:`hutchinson_trace` (Hutch++) with a fixed HVP budget;
- ``landscape``: :func:`loss_surface` on a small random plane (forward passes only, no HVP);

the HVP measurements once per engine (``auto``, ``cached``, ``double_backward``,
``forward_over_reverse``, ``finite_difference``). Peak memory is, on CPU, the peak resident set
size (``ru_maxrss``) minus its value after the model and data were created and one tiny warm-up
step ran (libraries and kernels loaded); on a GPU (``--device cuda``), ``torch.cuda.max_memory_allocated``
minus the memory allocated at that point. Ratios are to the training step's peak. Times are wall
seconds of the whole measurement (``auto`` includes its one-off planning and symmetry check) and
per HVP. With ``auto`` the chosen plan (``Objective.engine_plan``) is printed too.

Models:

- ``resnet``: a CIFAR-shaped ResNet (3 stages of 2 basic blocks, 16/32/64 channels, BatchNorm;
  about 175k parameters), probe set of 4 batches of 128 random 3x32x32 images (the issue's setting);
- ``transformer``: a small pre-norm transformer classifier (token and position embeddings,
  2 encoder layers with multi-head attention and LayerNorm, d=64, 4 heads; about 100k
  parameters), probe set of 4 batches of 64 sequences of 64 tokens.

Run: ``python benchmarks/bench_memory.py [--models resnet transformer] [--hvps 4] [--threads 2]``.
Sizes are configurable (``--batches``, ``--batch-size``, ``--hvps``, ``--grid``). Writes the raw
numbers to ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENGINES = ["auto", "cached", "double_backward", "forward_over_reverse", "finite_difference"]
HVP_JOBS = ["lambda_max", "lambda_min", "trace"]


# ------------------------------------------------------------------ models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    """CIFAR ResNet with 2 basic blocks per stage (ResNet-14): about 175k parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers: list[nn.Module] = []
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class TinyTransformer(nn.Module):
    """Pre-norm transformer classifier: embeddings, 2 encoder layers (attention, LayerNorm), mean pooling."""

    def __init__(self, vocab: int = 512, seq: int = 64, d: int = 64, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]])
        return self.head(self.norm(h).mean(1))


def ce_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_problem(name: str, batches: int, batch_size: int, device: str) -> tuple[nn.Module, list[Any]]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "resnet":
        model: nn.Module = ResNet()
        data = [
            (torch.randn(batch_size, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen))
            for _ in range(batches)
        ]
    elif name == "transformer":
        model = TinyTransformer()
        data = [
            (torch.randint(0, 512, (batch_size, 64), generator=gen), torch.randint(0, 10, (batch_size,), generator=gen))
            for _ in range(batches)
        ]
    else:
        raise ValueError(f"unknown model {name!r}")
    model = model.to(device)
    data = [(x.to(device), y.to(device)) for x, y in data]
    return model, data


# ------------------------------------------------------------------ one configuration (in a subprocess)
def measure(args: argparse.Namespace, obj: Any) -> float:
    """One measurement of ``args.job`` on ``obj``; returns its value."""
    from lightning_hessian import extremal_eigenpairs, hutchinson_trace, loss_surface
    from lightning_hessian.landscape import random_direction

    if args.job == "lambda_max":
        return float(extremal_eigenpairs(obj, which="top", max_hvp=args.hvps, tol=1e-12).lambda_max)
    if args.job == "lambda_min":
        return float(extremal_eigenpairs(obj, which="both", max_hvp=args.hvps, tol=1e-12).lambda_min)
    if args.job == "trace":
        return float(hutchinson_trace(obj, n=max(3, args.hvps)).value)
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    return float(loss_surface(obj, d1, d2, resolution=args.grid).losses.mean())


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    from lightning_hessian import Objective

    device = args.device
    model, data = make_problem(args.model, args.batches, args.batch_size, device)
    # Warm-up: load kernels and libraries on two samples, so that the baseline includes them.
    small = (data[0][0][:2], data[0][1][:2])
    ce_loss(model, small).backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_peak_bytes()
    out: dict[str, Any] = {"model": args.model, "job": args.job, "engine": args.engine}
    out["num_params"] = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    if args.job == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ce_loss(model, data[0]).backward()
        opt.step()
    else:
        engine = "auto" if args.engine == "-" else args.engine
        obj = Objective(model, ce_loss, data, hvp=engine, memory_budget=args.memory_budget)
        obj.grad()  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        obj.grad()
        out["grad_seconds"] = time.perf_counter() - t0
        out["grad_cpu_seconds"] = time.process_time() - c0
        # Twice on the same objective: the first measurement includes hvp="auto"'s one-off planning
        # and symmetry check, the second is what every later measurement of a monitor costs.
        for run in ("first", "second"):
            hvp_before, t0, c0 = obj.n_hvp + obj.n_hvp_check, time.perf_counter(), time.process_time()
            out["value"] = measure(args, obj)
            out[f"seconds_{run}"] = time.perf_counter() - t0
            out[f"cpu_seconds_{run}"] = time.process_time() - c0
            out[f"n_hvp_{run}"] = obj.n_hvp + obj.n_hvp_check - hvp_before
        out["n_hvp_check"] = obj.n_hvp_check
        out["active_engine"] = obj.active_engine
        plan = obj.engine_plan
        if plan is not None:
            out["plan"] = {k: getattr(plan, k) for k in plan.__dataclass_fields__}
    if cuda:
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        out["peak_bytes"] = _rss_peak_bytes() - base
    out["seconds"] = time.perf_counter() - start
    return out


# ------------------------------------------------------------------ driver
def run_config(args: argparse.Namespace, model: str, job: str, engine: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        model,
        "--job",
        job,
        "--engine",
        engine,
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--batches",
        str(args.batches_for[model]),
        "--batch-size",
        str(args.batch_size_for[model]),
        "--hvps",
        str(args.hvps),
        "--grid",
        str(args.grid),
        *(["--memory-budget", str(args.memory_budget)] if args.memory_budget else []),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"model": model, "job": job, "engine": engine, "error": tail[0][:160]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _mb(x: float) -> str:
    return f"{x / 2**20:8.1f}"


def report(results: list[dict[str, Any]]) -> None:
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        train = next((r for r in rows if r["job"] == "train" and "error" not in r), None)
        ref = float(train["peak_bytes"]) if train else float("nan")
        params = next((r.get("num_params") for r in rows if "num_params" in r), "?")
        print(f"\n## {model} ({params} parameters); training step peak {_mb(ref).strip()} MB")
        print("peak: both measurements; s: wall seconds of the first and second measurement (the first adds")
        print(
            "auto's planning and check); cpu: process seconds of the second; HVP/grad: its cpu per HVP / a gradient's"
        )
        head = f"| {'job':<10} | {'engine':<24} | {'peak MB':>8} | {'x train':>7} | {'s 1st':>7} | {'s':>7} |"
        print(head + "   cpu | HVPs | cpu/HVP | HVP/grad | plan")
        rule = f"|{'-' * 12}|{'-' * 26}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 9}|"
        print(rule + "-------|------|---------|----------|------")
        for r in rows:
            if "error" in r:
                print(f"| {r['job']:<10} | {r['engine']:<24} | error: {r['error']}")
                continue
            n = int(r.get("n_hvp_second", 0))
            s1, s2 = r.get("seconds_first", r["seconds"]), r.get("seconds_second", r["seconds"])
            cpu = r.get("cpu_seconds_second", float("nan"))
            per = f"{cpu / n:7.2f}" if n else "      -"
            grad = r.get("grad_cpu_seconds")
            ratio = f"{cpu / n / grad:8.2f}" if n and grad else "       -"
            plan = ""
            if r["engine"] == "auto" and "plan" in r:
                p = r["plan"]
                plan = f"{p['chunks']} chunks, {p['held_chunks']} held, micro-batch {p['micro_batch_size']}"
            engine = r["engine"] if r["engine"] != "auto" else f"auto ({r.get('active_engine', '?')})"
            print(
                f"| {r['job']:<10} | {engine:<24} | {_mb(r['peak_bytes'])} | {r['peak_bytes'] / ref:7.2f} "
                f"| {s1:7.2f} | {s2:7.2f} | {cpu:5.1f} | {n:4d} | {per} | {ratio} | {plan}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet", "transformer"])
    parser.add_argument("--jobs", nargs="+", default=["train", *HVP_JOBS, "landscape"])
    parser.add_argument("--engines", nargs="+", default=ENGINES)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 (resnet), 64 (transformer)")
    parser.add_argument("--hvps", type=int, default=4, help="HVP budget of each eigenvalue/trace measurement")
    parser.add_argument("--grid", type=int, default=3, help="landscape resolution (grid x grid points)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-budget", type=float, default=None, help="Objective(memory_budget=) in bytes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="-", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.batch_size = args.batch_size or 128
        print(json.dumps(worker(args)))
        return
    default_sizes = {"resnet": 128, "transformer": 64}
    args.batches_for = {m: args.batches for m in args.models}
    args.batch_size_for = {m: args.batch_size or default_sizes.get(m, 64) for m in args.models}
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {args.device}, "
        f"threads {args.threads}, loadavg at start {os.getloadavg()}"
    )
    print(
        f"probe: {args.batches} batches ({args.batch_size_for}); {args.hvps} HVPs per measurement; grid {args.grid}^2"
    )
    results = []
    for model in args.models:
        for job in args.jobs:
            engines = args.engines if job in HVP_JOBS else ["-"]
            for engine in engines:
                r = run_config(args, model, job, engine)
                results.append(r)
                shown = {k: v for k, v in r.items() if k != "plan"}
                print(json.dumps(shown), flush=True)
    report(results)
    print(f"\nloadavg at end {os.getloadavg()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "device": args.device, "threads": args.threads, "hvps": args.hvps}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
