#!/usr/bin/env python
"""Curvature benchmark: lightning_hessian vs PyHessian 0.1, hessian-eigenthings 1.0.0a5 and ARPACK.

On two small problems (a tanh MLP with a dense float64 Hessian as reference, and a ReLU/max-pool
CNN with BatchNorm in eval mode with a float64 high-precision reference), it measures in one run:

1. ``extremal_eigenpairs`` cold (random start) and warm (``init=`` the previous result, after
   one SGD step) -- lambda_max, lambda_min, HVPs (total and until the top converged), seconds;
2. ``hutchinson_trace`` (Hutch++ and plain Hutchinson, 99 HVPs) and ``slope_fit_trace``;
3. PyHessian defaults: power-iteration lambda_max and Hutchinson trace (HVPs counted);
4. hessian-eigenthings: default ``lanczos(k=1)``, longer LA / SA runs, Hutch++ trace;
5. ARPACK (``scipy.sparse.linalg.eigsh``) LA and SA at the same tolerance, HVPs counted;
6. the cost of one HVP per engine relative to one gradient (and of one forward pass);
7. errors of every method against the reference; 8. the headline ratios.

Prints readable tables and writes the raw numbers to ``benchmarks/results/curvature.json``.
9. lambda_min's tolerance (issue 10): ``tol_min`` against HVPs against actual error on the planted
   spectrum of issue 10 (restarted vs unrestarted Lanczos vs ARPACK, shared start vectors) and on
   the two nets.

10. lambda_max's tolerance (issue 8): ``tol`` (1e-2 ... 1e-5) against HVPs against actual error
   (float64 reference) on the two nets, cold, gradient-guided (the monitor's first run: ``guide=`` the
   probe gradient, its cost included) and warm-started after one small SGD step, next to
   PyHessian's default (power iteration, tol 1e-3 on the relative eigenvalue change; its documented
   default is quoted when PyHessian cannot be imported), and the probe-size effect: lambda_max of
   each single batch against the 4-batch probe holding them (the upward bias of small probes).

11. trace reuse (issue 8): 30-HVP trace estimates alone (Hutch++, Hutchinson) against the same
   estimators deflated by the Krylov space of the step's Lanczos run (``extremal_eigenpairs(...,
   krylov_out=)``, ``hutchinson_trace(deflate=)``; top only and both ends), RMS error over 20 seeds.

Run: ``python benchmarks/bench_curvature.py`` (about 2-4 minutes on 2 CPU cores);
``--lambda-min-only`` prints only table 9 (``results/lambda_min_tolerance.json``),
``--lambda-max-only`` only table 10 (``results/lambda_max_tolerance.json``, about 1-2 minutes),
``--trace-reuse-only`` only table 11 (``results/trace_reuse.json``, about 2 minutes).
The anchors are optional: ``pip install --no-deps pyhessian hessian-eigenthings``.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hessian
from lightning_hessian import Objective, extremal_eigenpairs, hutchinson_trace, slope_fit_trace

TOL = 1e-4  # ours and ARPACK
SEED = 0
SGD_LR_WARM = (0.05, 0.005)  # the one optimizer step between the cold and the warm call (two sizes)
REF_TOL = 1e-10  # float64 Lanczos reference
REF_TRACE_HVPS = 1200  # float64 Hutch++ reference trace (models without a dense Hessian)
RESULTS = Path(__file__).resolve().parent / "results" / "curvature.json"

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle.*")
warnings.filterwarnings("ignore", message=".*Using backward\\(\\) with create_graph=True.*")

# ----------------------------------------------------------------------------- optional anchors
_ANCHOR_HVPS = {"pyhessian": 0, "eigenthings": 0}
try:
    import pyhessian  # noqa: F401
    from pyhessian import hessian as PyHessian

    # `pyhessian.hessian` (the attribute) is the class; the module holds the imported helper.
    _ph_module = sys.modules["pyhessian.hessian"]
    _ph_hvp = _ph_module.hessian_vector_product

    def _counted_ph_hvp(*args: Any, **kwargs: Any) -> Any:
        _ANCHOR_HVPS["pyhessian"] += 1
        return _ph_hvp(*args, **kwargs)

    _ph_module.hessian_vector_product = _counted_ph_hvp
    HAVE_PYHESSIAN = True
except ImportError:
    HAVE_PYHESSIAN = False
try:
    import hessian_eigenthings as eigthings

    HAVE_EIGTHINGS = True
except ImportError:
    HAVE_EIGTHINGS = False


def anchor_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


# ----------------------------------------------------------------------------- problems
def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    """A few full-batch SGD steps in train mode so that the Hessian is not the one at init."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def make_mlp() -> dict[str, Any]:
    torch.manual_seed(SEED)
    x = torch.randn(512, 20)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
    with torch.no_grad():
        y = (teacher(x) + 0.5 * torch.randn(512, 10)).argmax(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    _train(model, x, y, steps=30, lr=0.2)
    return {
        "name": "mlp_tanh",
        "desc": "MLP 20-32-32-10 tanh, 512 samples, cross-entropy",
        "model": model,
        "x": x,
        "y": y,
        "dense_reference": True,
    }


def make_cnn() -> dict[str, Any]:
    torch.manual_seed(SEED + 1)
    x = torch.randn(256, 1, 16, 16)
    y = torch.randint(0, 10, (256,))
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 96),
        nn.ReLU(),
        nn.Linear(96, 10),
    )
    _train(model, x, y, steps=30, lr=0.05)
    return {
        "name": "cnn_bn",
        "desc": "CNN conv-BN(eval)-ReLU-maxpool x2 + MLP head, 256 images 1x16x16",
        "model": model,
        "x": x,
        "y": y,
        "dense_reference": False,
    }


_CREATED: list[Objective] = []


def objective(problem: dict[str, Any], model: nn.Module | None = None, **kw: Any) -> Objective:
    obj = Objective(model if model is not None else problem["model"], loss_fn, [(problem["x"], problem["y"])], **kw)
    _CREATED.append(obj)
    return obj


def check_hvps(mark: int, reps: int = 1) -> int:
    """HVPs spent by hvp='auto''s one-off double-backward symmetry probe (``n_hvp_check``, not in ``n_hvp``)
    by the objectives created since ``_CREATED[mark]``, per repetition; forgets those objectives."""
    total = sum(int(getattr(o, "n_hvp_check", 0)) for o in _CREATED[mark:])
    del _CREATED[mark:]
    return total // reps


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_timed(fn: Callable[[], Any], reps: int = 3) -> tuple[Any, float, list[float]]:
    """Run ``fn`` ``reps`` times; return the first result and the median wall time."""
    first, times = None, []
    for i in range(reps):
        out, sec = timed(fn)
        if i == 0:
            first = out
        times.append(sec)
    return first, statistics.median(times), times


# ----------------------------------------------------------------------------- references
def dense_reference(problem: dict[str, Any]) -> dict[str, Any]:
    """Dense float64 Hessian with torch.func.hessian; eigvalsh and the exact trace."""
    model = copy.deepcopy(problem["model"]).double().eval()
    x, y = problem["x"].double(), problem["y"]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = dict(model.named_buffers())

    def f(theta: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(model, {**params, **buffers}, (x,)), y)

    t0 = time.perf_counter()
    hess = torch.func.hessian(f)(flat)
    hess = 0.5 * (hess + hess.T)
    evals = torch.linalg.eigvalsh(hess)
    sec = time.perf_counter() - t0
    return {
        "source": "dense torch.func.hessian (float64) + eigvalsh",
        "lambda_max": float(evals[-1]),
        "lambda_2": float(evals[-2]),
        "lambda_min": float(evals[0]),
        "trace": float(hess.diagonal().sum()),
        "trace_stderr": 0.0,
        "n_negative": int((evals < 0).sum()),
        "seconds": sec,
    }


def fp64_reference(problem: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """High-precision reference: our Lanczos in float64 at tol 1e-10 and a float64 Hutch++ trace."""
    model = copy.deepcopy(problem["model"]).double().eval()
    obj = Objective(model, loss_fn, [(problem["x"].double(), problem["y"])], hvp="cached")
    eig, sec_e = timed(
        lambda: extremal_eigenpairs(obj, k=2, tol=REF_TOL, tol_min=REF_TOL, max_hvp=3000, max_basis=400, seed=12345)
    )
    tr, sec_t = timed(lambda: hutchinson_trace(obj, n=REF_TRACE_HVPS, method="hutch++", seed=12345))
    ref = {
        "source": f"float64 Lanczos (tol {REF_TOL:g}) + float64 Hutch++ ({REF_TRACE_HVPS} HVPs, seed 12345)",
        "lambda_max": eig.lambda_max,
        "lambda_2": eig.eigenvalues[1],
        "lambda_min": eig.lambda_min,
        "trace": tr.value,
        "trace_stderr": tr.stderr,
        "eig_converged": [eig.converged_max, eig.converged_min],
        "eig_n_hvp": eig.n_hvp,
        "residual_max": eig.residuals[0],
        "residual_min": eig.residual_min,
        "trace_n_hvp": tr.n_hvp,
        "seconds": sec_e + sec_t,
    }
    return ref, {"eig": eig, "trace": tr}


# ----------------------------------------------------------------------------- rows
def row(
    method: str,
    *,
    lmax: float | None = None,
    lmin: float | None = None,
    trace: float | None = None,
    trace_stderr: float | None = None,
    n_hvp: int | None = None,
    n_hvp_top: int | None = None,
    n_loss: int | None = None,
    seconds: float | None = None,
    converged: str = "",
    note: str = "",
    lib: str = "ours",
    check: int = 0,
) -> dict[str, Any]:
    return {
        "lib": lib,
        "method": method,
        "n_hvp_check": check,
        "lambda_max": lmax,
        "lambda_min": lmin,
        "trace": trace,
        "trace_stderr": trace_stderr,
        "n_hvp": n_hvp,
        "n_hvp_top": n_hvp_top,
        "n_loss": n_loss,
        "seconds": seconds,
        "converged": converged,
        "note": note,
    }


def add_errors(r: dict[str, Any], ref: dict[str, Any]) -> None:
    width = ref["lambda_max"] - ref["lambda_min"]
    r["err_lambda_max"] = (
        None if r["lambda_max"] is None else abs(r["lambda_max"] - ref["lambda_max"]) / abs(ref["lambda_max"])
    )
    r["err_lambda_min_over_width"] = (
        None if r["lambda_min"] is None else abs(r["lambda_min"] - ref["lambda_min"]) / width
    )
    r["err_trace"] = None if r["trace"] is None else abs(r["trace"] - ref["trace"]) / abs(ref["trace"])


def _eig_row(
    method: str, res: Any, seconds: float, note: str = "", bottom: bool = True, check: int = 0
) -> dict[str, Any]:
    conv = f"max={'y' if res.converged_max else 'n'}" + (f" min={'y' if res.converged_min else 'n'}" if bottom else "")
    return row(
        method,
        lmax=res.lambda_max,
        lmin=res.lambda_min if bottom else None,
        n_hvp=res.n_hvp,
        n_hvp_top=res.n_hvp_top,
        seconds=seconds,
        converged=conv,
        note=note,
        check=check,
    )


class _Budget(Exception):
    pass


def eigsh_direct(obj: Objective, which: str, tol: float, max_mv: int = 3000) -> tuple[float | None, int, float]:
    """scipy eigsh(k=1) on a LinearOperator of obj.hvp; returns (value, matvecs, seconds)."""
    n = obj.num_params
    count = 0

    def mv(v: np.ndarray) -> np.ndarray:
        nonlocal count
        if count >= max_mv:
            raise _Budget
        count += 1
        t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=obj.dtype)
        return obj.hvp(t).detach().to(torch.float64).numpy()

    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(SEED).standard_normal(n)
    t0 = time.perf_counter()
    try:
        vals = scipy.sparse.linalg.eigsh(op, k=1, which=which, tol=tol, v0=v0, return_eigenvectors=False)
        value: float | None = float(vals[0])
    except (_Budget, scipy.sparse.linalg.ArpackNoConvergence):
        value = None
    return value, count, time.perf_counter() - t0


# ----------------------------------------------------------------------------- anchors
def run_pyhessian(problem: dict[str, Any]) -> list[dict[str, Any]]:
    crit = nn.CrossEntropyLoss()
    data = (problem["x"], problem["y"])
    # PyHessian mutates the model (eval mode, .grad set to None, create_graph .grad): deep copies only.
    models = [copy.deepcopy(problem["model"]) for _ in range(3)]

    def eig_once() -> tuple[float, int]:
        m = models.pop()
        torch.manual_seed(SEED)  # PyHessian draws its start vector from the global RNG
        before = _ANCHOR_HVPS["pyhessian"]
        comp = PyHessian(m, crit, data=data, cuda=False)  # one backward(create_graph=True) on the batch
        vals, _ = comp.eigenvalues(top_n=1)  # defaults: maxIter=100, tol=1e-3
        return float(vals[0]), _ANCHOR_HVPS["pyhessian"] - before

    (lmax, n_eig), sec_eig, _ = median_timed(eig_once, reps=3)

    def trace_once() -> tuple[float, int, int]:
        m = copy.deepcopy(problem["model"])
        torch.manual_seed(SEED)
        before = _ANCHOR_HVPS["pyhessian"]
        comp = PyHessian(m, crit, data=data, cuda=False)
        samples = comp.trace()  # defaults: maxIter=100, tol=1e-3 (relative change of the running mean)
        return float(np.mean(samples)), len(samples), _ANCHOR_HVPS["pyhessian"] - before

    (tr, n_samples, n_tr), sec_tr = timed(trace_once)
    return [
        row(
            "eigenvalues(top_n=1) [power iter., defaults]",
            lib="pyhessian",
            lmax=lmax,
            n_hvp=n_eig,
            seconds=sec_eig,
            note="median of 3 timings; incl. constructor (backward create_graph)",
        ),
        row(
            "trace() [Hutchinson, defaults]",
            lib="pyhessian",
            trace=tr,
            n_hvp=n_tr,
            seconds=sec_tr,
            note=f"stopped after {n_samples} samples; no error bar",
        ),
    ]


def run_eigenthings(problem: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def operator() -> Any:
        m = copy.deepcopy(problem["model"]).eval()  # eigenthings uses the model as it is: eval for BN
        op = eigthings.HessianOperator(m, [(problem["x"], problem["y"])], eigthings.supervised_loss(F.cross_entropy))
        inner = op.matvec

        def counted(v: torch.Tensor) -> torch.Tensor:
            _ANCHOR_HVPS["eigenthings"] += 1
            return inner(v)

        op.matvec = counted  # the algorithms call operator.matvec
        return op

    def lanczos_row(label: str, note: str, **kw: Any) -> dict[str, Any]:
        op = operator()
        before = _ANCHOR_HVPS["eigenthings"]
        res, sec = timed(lambda: eigthings.lanczos(op, seed=SEED, **kw))
        n = _ANCHOR_HVPS["eigenthings"] - before
        val = float(res.eigenvalues[0])
        conv = "y" if bool(res.converged[0]) else "n"
        if kw.get("which") == "SA":
            return row(label, lib="eigenthings", lmin=val, n_hvp=n, seconds=sec, converged=f"min={conv}", note=note)
        return row(label, lib="eigenthings", lmax=val, n_hvp=n, seconds=sec, converged=f"max={conv}", note=note)

    rows.append(lanczos_row("lanczos(k=1) [defaults: max_iter=2k, LM]", "library defaults", k=1))
    rows.append(lanczos_row("lanczos(k=1, max_iter=20, LA)", "", k=1, max_iter=20, which="LA"))
    rows.append(lanczos_row("lanczos(k=1, max_iter=20, SA)", "", k=1, max_iter=20, which="SA"))
    rows.append(
        lanczos_row(
            "lanczos(k=1, max_iter=60, SA, reorth)",
            "reorthogonalize=True (default off >50)",
            k=1,
            max_iter=60,
            which="SA",
            reorthogonalize=True,
        )
    )
    op = operator()
    before = _ANCHOR_HVPS["eigenthings"]
    tr, sec = timed(lambda: eigthings.trace(op, num_matvecs=99, method="hutch++", seed=SEED))
    rows.append(
        row(
            "trace(num_matvecs=99, hutch++)",
            lib="eigenthings",
            trace=tr.estimate,
            trace_stderr=tr.stderr,
            n_hvp=_ANCHOR_HVPS["eigenthings"] - before,
            seconds=sec,
        )
    )
    return rows


# ----------------------------------------------------------------------------- HVP cost per engine
def engine_costs(problem: dict[str, Any], reps: int) -> list[dict[str, Any]]:
    n = objective(problem).num_params
    gen = torch.Generator().manual_seed(SEED + 99)
    v64 = torch.randn(n, generator=gen, dtype=torch.float64)
    m64 = copy.deepcopy(problem["model"]).double().eval()
    ref_hv = Objective(m64, loss_fn, [(problem["x"].double(), problem["y"])], hvp="double_backward").hvp(v64)
    v = v64.float()

    def med(fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(reps):
            _, s = timed(fn)
            ts.append(s)
        return statistics.median(ts)

    base = objective(problem)
    grad_s = med(base.grad)
    loss_s = med(base.loss)
    out = [
        {"variant": "gradient (objective.grad)", "ms": 1e3 * grad_s, "x_grad": 1.0, "rel_err_vs_fp64": None},
        {
            "variant": "forward only (objective.loss)",
            "ms": 1e3 * loss_s,
            "x_grad": loss_s / grad_s,
            "rel_err_vs_fp64": None,
        },
    ]
    for engine in ("cached", "double_backward", "forward_over_reverse", "finite_difference"):
        obj = objective(problem, hvp=engine)
        hv, first = timed(lambda obj=obj: obj.hvp(v))
        err = float((hv.double() - ref_hv).norm() / ref_hv.norm())
        s = med(lambda obj=obj: obj.hvp(v))
        note = f"first call {1e3 * first:.2f} ms (builds the graph)" if engine == "cached" else ""
        out.append(
            {"variant": f"hvp {engine}", "ms": 1e3 * s, "x_grad": s / grad_s, "rel_err_vs_fp64": err, "note": note}
        )
    return out


# ----------------------------------------------------------------------------- one problem
def run_problem(problem: dict[str, Any]) -> dict[str, Any]:
    name = problem["name"]
    model = problem["model"]
    n_params = objective(problem).num_params
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"\n{'=' * 100}\n{name}: {problem['desc']}; {n_params:,} parameters\n{'=' * 100}")
    t_problem = time.perf_counter()
    rows: list[dict[str, Any]] = []

    # --- reference
    ref_checks: list[dict[str, Any]] = []
    if problem["dense_reference"]:
        ref = dense_reference(problem)
        hp, hp_raw = fp64_reference(problem)  # checks that the reference method used for the CNN is right
        ref_checks.append(
            row(
                "[ref-method check] fp64 Lanczos tol 1e-10",
                lib="reference",
                lmax=hp["lambda_max"],
                lmin=hp["lambda_min"],
                n_hvp=hp["eig_n_hvp"],
                seconds=hp_raw["eig"].seconds,
                converged=f"max={'y' if hp['eig_converged'][0] else 'n'} min={'y' if hp['eig_converged'][1] else 'n'}",
            )
        )
        ref_checks.append(
            row(
                f"[ref-method check] fp64 Hutch++ {REF_TRACE_HVPS}",
                lib="reference",
                trace=hp["trace"],
                trace_stderr=hp["trace_stderr"],
                n_hvp=hp["trace_n_hvp"],
                seconds=hp_raw["trace"].seconds,
            )
        )
    else:
        ref, _ = fp64_reference(problem)
    width = ref["lambda_max"] - ref["lambda_min"]
    print(f"reference: {ref['source']} ({ref['seconds']:.1f} s)")
    print(
        f"  lambda_max={ref['lambda_max']:.8g}  lambda_2={ref['lambda_2']:.8g}  lambda_min={ref['lambda_min']:.8g}"
        f"  width={width:.6g}  trace={ref['trace']:.8g}"
        + (f" +- {ref['trace_stderr']:.2g}" if ref["trace_stderr"] else " (exact)")
        + (f"  negative eigenvalues={ref['n_negative']}" if "n_negative" in ref else "")
    )
    if "eig_n_hvp" in ref:
        print(
            f"  (float64 Lanczos: {ref['eig_n_hvp']} HVPs, converged max/min {ref['eig_converged']}, residuals "
            f"{ref['residual_max']:.1e} / {ref['residual_min']:.1e})"
        )
    if ref["trace_stderr"]:
        print(
            f"  (the reference trace is itself stochastic: stderr/trace = {ref['trace_stderr'] / abs(ref['trace']):.1e}"
            "; trace errors below about twice that are not resolved)"
        )

    # --- ours: eigenvalues, cold
    mark = len(_CREATED)
    top_res, top_sec, _ = median_timed(
        lambda: extremal_eigenpairs(objective(problem), tol=TOL, which="top", seed=SEED), reps=3
    )
    rows.append(
        _eig_row(
            "extremal_eigenpairs(which='top') cold",
            top_res,
            top_sec,
            bottom=False,
            note="median of 3 timings; incl. Objective + graph build",
            check=check_hvps(mark, 3),
        )
    )
    # variants for the lambda_max comparison: no symmetry probe (hvp='cached'), PyHessian's tolerance number
    res, sec, _ = median_timed(
        lambda: extremal_eigenpairs(objective(problem, hvp="cached"), tol=TOL, which="top", seed=SEED), reps=3
    )
    rows.append(
        _eig_row(
            "extremal_eigenpairs(which='top') cold, hvp=cached",
            res,
            sec,
            bottom=False,
            note="median of 3; no symmetry probe",
            check=check_hvps(mark, 3),
        )
    )
    res, sec, _ = median_timed(
        lambda: extremal_eigenpairs(objective(problem), tol=1e-3, which="top", seed=SEED), reps=3
    )
    rows.append(
        _eig_row(
            "extremal_eigenpairs(which='top', tol=1e-3) cold",
            res,
            sec,
            bottom=False,
            note="median of 3; PyHessian's tol number",
            check=check_hvps(mark, 3),
        )
    )
    both_res, both_sec = timed(lambda: extremal_eigenpairs(objective(problem), tol=TOL, max_hvp=500, seed=SEED))
    rows.append(
        _eig_row(
            "extremal_eigenpairs(which='both') cold", both_res, both_sec, note="max_hvp=500", check=check_hvps(mark)
        )
    )

    # --- ours: traces
    for method in ("hutch++", "hutchinson"):
        tr, sec = timed(lambda method=method: hutchinson_trace(objective(problem), n=99, method=method, seed=SEED))
        rows.append(
            row(
                f"hutchinson_trace(n=99, {method})",
                trace=tr.value,
                trace_stderr=tr.stderr,
                n_hvp=tr.n_hvp,
                seconds=sec,
                check=check_hvps(mark),
            )
        )
    tr, sec = timed(lambda: slope_fit_trace(objective(problem), n_directions=100, seed=SEED))
    rows.append(
        row(
            "slope_fit_trace(n_directions=100)",
            trace=tr.value,
            trace_stderr=tr.stderr,
            n_hvp=0,
            n_loss=tr.n_loss,
            seconds=sec,
            note=f"no HVP: {tr.n_loss} forward passes; radius={tr.radius:.3g}",
        )
    )

    # --- ARPACK at the same tolerance
    ar, ar_sec = timed(
        lambda: extremal_eigenpairs(objective(problem), tol=TOL, max_hvp=3000, seed=SEED, solver="arpack")
    )
    n_la = ar.n_hvp_top if ar.n_hvp_top is not None else ar.n_hvp
    rows.append(
        row(
            "extremal_eigenpairs(solver='arpack')",
            lib="arpack",
            lmax=ar.lambda_max,
            lmin=ar.lambda_min,
            n_hvp=ar.n_hvp,
            n_hvp_top=ar.n_hvp_top,
            seconds=ar_sec,
            converged=f"max={'y' if ar.converged_max else 'n'} min={'y' if ar.converged_min else 'n'}",
            note=f"eigsh LA {n_la} + SA {ar.n_hvp - n_la} HVPs",
            check=check_hvps(mark),
        )
    )
    la_val, la_n, la_sec = eigsh_direct(objective(problem), "LA", TOL)
    rows.append(
        row(
            f"eigsh(k=1, LA, tol={TOL:g}) direct",
            lib="arpack",
            lmax=la_val,
            n_hvp=la_n,
            seconds=la_sec,
            check=check_hvps(mark),
        )
    )
    sa_val, sa_n, sa_sec = eigsh_direct(objective(problem), "SA", TOL)
    rows.append(
        row(
            f"eigsh(k=1, SA, tol={TOL:g}) direct",
            lib="arpack",
            lmin=sa_val,
            n_hvp=sa_n,
            seconds=sa_sec,
            note="ARPACK: residual <= tol*|lambda_min|",
            check=check_hvps(mark),
        )
    )
    tol_eq = TOL * width / abs(ref["lambda_min"])
    sae_val, sae_n, sae_sec = eigsh_direct(objective(problem), "SA", tol_eq)
    rows.append(
        row(
            f"eigsh(k=1, SA, tol={tol_eq:.3g}) direct",
            lib="arpack",
            lmin=sae_val,
            n_hvp=sae_n,
            seconds=sae_sec,
            note="tol scaled to ours: residual <= 1e-4*width",
            check=check_hvps(mark),
        )
    )

    # --- anchors
    if HAVE_PYHESSIAN:
        rows.extend(run_pyhessian(problem))
    if HAVE_EIGTHINGS:
        rows.extend(run_eigenthings(problem))

    # --- cold vs warm after one SGD step on the probe loss (eval mode, so BN buffers stay put)
    cw = []
    steps = []
    for lr in SGD_LR_WARM:
        stepped = copy.deepcopy(model).eval()
        opt = torch.optim.SGD(stepped.parameters(), lr=lr)
        opt.zero_grad()
        loss_fn(stepped, (problem["x"], problem["y"])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            step_norm = float(
                torch.cat([(a - b).reshape(-1) for a, b in zip(stepped.parameters(), model.parameters())]).norm()
            )
        steps.append({"optimizer": "SGD", "lr": lr, "step_norm": step_norm})
        for which, prev in (("both", both_res), ("top", top_res)):
            kw: dict[str, Any] = {"tol": TOL, "max_hvp": 500, "which": which, "seed": SEED}
            cold, cold_sec = timed(lambda kw=kw, m=stepped: extremal_eigenpairs(objective(problem, m), **kw))
            cold_check = check_hvps(mark)
            warm, warm_sec = timed(
                lambda kw=kw, prev=prev, m=stepped: extremal_eigenpairs(objective(problem, m), init=prev, **kw)
            )
            warm_check = check_hvps(mark)
            for label, res, sec, chk in (("cold", cold, cold_sec, cold_check), ("warm", warm, warm_sec, warm_check)):
                cw.append(
                    {
                        "lr": lr,
                        "which": which,
                        "start": label,
                        "lambda_max": res.lambda_max,
                        "n_hvp_check": chk,
                        "lambda_min": res.lambda_min if which == "both" else None,
                        "n_hvp": res.n_hvp,
                        "n_hvp_top": res.n_hvp_top,
                        "converged_max": res.converged_max,
                        "converged_min": res.converged_min if which == "both" else None,
                        "seconds": sec,
                    }
                )

    # --- engine costs
    engines = engine_costs(problem, reps=20 if n_params < 10_000 else 10)

    for r in rows + ref_checks:
        add_errors(r, ref)
    state_after = model.state_dict()
    unchanged = all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    out = {
        "desc": problem["desc"],
        "num_params": n_params,
        "reference": ref,
        "rows": rows,
        "ref_checks": ref_checks,
        "cold_warm": cw,
        "warm_steps": steps,
        "engines": engines,
        "model_state_unchanged": unchanged,
        "seconds": time.perf_counter() - t_problem,
    }
    del _CREATED[:]
    print_problem(out)
    return out


# ----------------------------------------------------------------------------- printing
def _fmt(x: float | None, spec: str = ".6g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _val_err(v: float | None, e: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.6g} ({e:.1e})" if e is not None else f"{v:.6g}"


def print_problem(res: dict[str, Any]) -> None:
    print(
        "\nvalue (error): lambda_max rel. error | lambda_min error / (lambda_max - lambda_min) | trace rel. error;"
        " HVPs a+b: b = the one-off symmetry probe of hvp='auto' (Objective.n_hvp_check), not in n_hvp"
    )
    header = (
        f"{'lib':<11} {'method':<50} {'lambda_max (err)':<22} {'lambda_min (err/width)':<23} "
        f"{'trace (err)':<20} {'+-stderr':>9} {'HVPs':>7} {'top':>4} {'sec':>7} {'conv':<11} note"
    )
    print(header)
    print("-" * len(header))
    for r in res["ref_checks"] + res["rows"]:
        hvps = _fmt(r["n_hvp"], "d") if r["n_hvp"] is not None else "-"
        hvps += f"+{r['n_hvp_check']}" if r["n_hvp_check"] else ""
        print(
            f"{r['lib']:<11} {r['method']:<50} {_val_err(r['lambda_max'], r['err_lambda_max']):<22} "
            f"{_val_err(r['lambda_min'], r['err_lambda_min_over_width']):<23} "
            f"{_val_err(r['trace'], r['err_trace']):<20} {_fmt(r['trace_stderr'], '.2g'):>9} {hvps:>7} "
            f"{_fmt(r['n_hvp_top'], 'd'):>4} {_fmt(r['seconds'], '.3f'):>7} {r['converged']:<11} {r['note']}"
        )
    norms = ", ".join(f"lr={w['lr']:g}: |step|={w['step_norm']:.3g}" for w in res["warm_steps"])
    print(
        f"\ncold vs warm start at the parameters after one SGD step on the probe loss ({norms}); "
        "warm = init=<result at the trained parameters>"
    )
    print(
        f"{'lr':<6} {'which':<6} {'start':<5} {'lambda_max':>12} {'lambda_min':>13} {'HVPs':>7} {'top':>4} "
        f"{'conv':<11} {'sec':>7}"
    )
    for c in res["cold_warm"]:
        hvps = str(c["n_hvp"]) + (f"+{c['n_hvp_check']}" if c["n_hvp_check"] else "")
        conv = f"max={'y' if c['converged_max'] else 'n'}" + (
            f" min={'y' if c['converged_min'] else 'n'}" if c["converged_min"] is not None else ""
        )
        print(
            f"{c['lr']:<6g} {c['which']:<6} {c['start']:<5} {_fmt(c['lambda_max'], '.8g'):>12} "
            f"{_fmt(c['lambda_min'], '.7g'):>13} {hvps:>7} {_fmt(c['n_hvp_top'], 'd'):>4} {conv:<11} "
            f"{c['seconds']:>7.3f}"
        )
    print("\ncost of one product (CPU, 1 thread, full probe batch, median)")
    print(f"{'variant':<32} {'ms':>8} {'x gradient':>11} {'rel. err vs fp64 Hv':>20}  note")
    for e in res["engines"]:
        print(
            f"{e['variant']:<32} {e['ms']:>8.2f} {e['x_grad']:>11.2f} {_fmt(e['rel_err_vs_fp64'], '.1e'):>20}  "
            f"{e.get('note', '')}"
        )
    print(
        f"\nmodel state unchanged by all our calls: {res['model_state_unchanged']}; problem took {res['seconds']:.1f} s"
    )


def _find(rows: list[dict[str, Any]], lib: str, prefix: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["lib"] == lib and r["method"].startswith(prefix)), None)


def _hv(r: dict[str, Any]) -> str:
    return f"{r['n_hvp']}" + (f"+{r['n_hvp_check']}" if r.get("n_hvp_check") else "")


def ratios(name: str, res: dict[str, Any]) -> dict[str, Any]:
    rows = res["rows"]
    out: dict[str, Any] = {}
    print(f"\n[{name}]")
    ph = _find(rows, "pyhessian", "eigenvalues")
    for label, method in (
        ("top only", "extremal_eigenpairs(which='top') cold"),
        ("top only, hvp=cached", "extremal_eigenpairs(which='top') cold, hvp=cached"),
        ("top only, tol=1e-3", "extremal_eigenpairs(which='top', tol=1e-3) cold"),
        ("both ends", "extremal_eigenpairs(which='both') cold"),
    ):
        ours = next(r for r in rows if r["lib"] == "ours" and r["method"] == method)
        if ph is None:
            print(
                f"  lambda_max ({label}): ours err {ours['err_lambda_max']:.1e} in {ours['seconds']:.3f} s "
                "(PyHessian not installed)"
            )
            continue
        x = ph["err_lambda_max"] / max(ours["err_lambda_max"], 1e-300)
        y = ours["seconds"] / ph["seconds"]
        ok = "PASS" if (x >= 10 and y <= 1) else "FAIL"
        print(
            f"  lambda_max: ours ({label}) is {x:.3g} times more accurate than PyHessian default, in {y:.3g} "
            f"times its wall time (err {ours['err_lambda_max']:.1e} vs {ph['err_lambda_max']:.1e}; "
            f"{ours['seconds']:.3f} s / {_hv(ours)} HVPs vs {ph['seconds']:.3f} s / {ph['n_hvp']} HVPs) "
            f"[X>=10 and Y<=1: {ok}]"
        )
        out[f"lambda_max_{label.replace(' ', '_').replace(',', '')}"] = {
            "accuracy_ratio": x,
            "time_ratio": y,
            "pass": ok == "PASS",
        }
    both = next(r for r in rows if r["lib"] == "ours" and r["method"] == "extremal_eigenpairs(which='both') cold")
    sa = _find(rows, "arpack", f"eigsh(k=1, SA, tol={TOL:g})")
    sae = next(r for r in rows if r["lib"] == "arpack" and r["note"].startswith("tol scaled"))
    ar = _find(rows, "arpack", "extremal_eigenpairs(solver='arpack')")
    assert both and sa and ar
    ar_sa = ar["n_hvp"] - (ar["n_hvp_top"] or 0)
    print(
        f"  lambda_min: ours {_hv(both)} HVPs (both ends, converged: {both['converged']}, "
        f"err/width {both['err_lambda_min_over_width']:.1e}) vs ARPACK SA {sa['n_hvp']} HVPs at the same "
        f"tolerance {TOL:g} (eigsh direct, err/width {_fmt(sa['err_lambda_min_over_width'], '.1e')}; "
        f"{ar_sa} inside solver='arpack' after {ar['n_hvp_top']} for LA); "
        f"ARPACK SA with tol scaled to our criterion: {sae['n_hvp']} HVPs"
    )
    out["lambda_min"] = {
        "ours_n_hvp": both["n_hvp"],
        "arpack_sa_n_hvp": sa["n_hvp"],
        "arpack_sa_in_solver": ar_sa,
        "arpack_sa_equivalent_tol_n_hvp": sae["n_hvp"],
    }
    cw = {(c["lr"], c["which"], c["start"]): c for c in res["cold_warm"]}
    out["cold_warm"] = {}
    for lr in SGD_LR_WARM:
        print(
            f"  cold vs warm (one SGD step, lr={lr:g}): both ends {cw[(lr, 'both', 'cold')]['n_hvp']} -> "
            f"{cw[(lr, 'both', 'warm')]['n_hvp']} HVPs (top converged after {cw[(lr, 'both', 'cold')]['n_hvp_top']}"
            f" -> {cw[(lr, 'both', 'warm')]['n_hvp_top']}); top only {cw[(lr, 'top', 'cold')]['n_hvp']} -> "
            f"{cw[(lr, 'top', 'warm')]['n_hvp']} HVPs"
        )
        out["cold_warm"].update({f"lr{lr:g}_{k[1]}_{k[2]}": v["n_hvp"] for k, v in cw.items() if k[0] == lr})
    eng = {e["variant"]: e["x_grad"] for e in res["engines"]}
    parts = [f"{k.replace('hvp ', '')} {v:.2f}x" for k, v in eng.items() if k.startswith("hvp ")]
    print(f"  one HVP / one gradient: {', '.join(parts)}; forward only {eng['forward only (objective.loss)']:.2f}x")
    out["hvp_over_grad"] = eng
    return out


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    return obj


# ----------------------------------------------------------------------------- lambda_min tolerance (issue 10)
LMIN_TOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)  # tol_min, relative to the spectral width
LMIN_STARTS = 5
LMIN_BOUNDED_BASIS = 30  # the smallest basis auto_max_basis picks (memory bound for very large models)


def planted_lambda_min_spectrum(seed: int = 0) -> np.ndarray:
    """Issue 10's spectrum, N = 1200: 650 eigenvalues in [0.01, 2], outliers 7 and 10, 548 in [-0.5, -0.001]."""
    gen = np.random.default_rng(seed)
    return np.concatenate([gen.uniform(0.01, 2.0, 650), [7.0, 10.0], gen.uniform(-0.5, -0.001, 548)])


def _arpack_sa(matvec: Callable[[np.ndarray], np.ndarray], n: int, v0: np.ndarray, tol: float) -> tuple[float, int]:
    count = 0

    def mv(x: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        return matvec(np.asarray(x).reshape(-1))

    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=mv, dtype=np.float64)
    vals = scipy.sparse.linalg.eigsh(op, k=1, which="SA", tol=tol, v0=v0, return_eigenvectors=False)
    return float(vals[0]), count


def lambda_min_planted_table() -> list[dict[str, Any]]:
    """tol_min against HVPs against actual error on the planted spectrum, five shared start vectors.

    Solvers at the same absolute tolerance ``tol_min * width`` on lambda_min: our Lanczos with an
    unbounded basis (never restarts), with the bounded basis (thick restarts), and ARPACK
    ``eigsh(which="SA")`` (its tolerance is relative to |lambda|, so it gets ``tol_min * width / |lambda_min|``).
    The operator is diagonal: with Gaussian starts Lanczos sees the same as on any rotation of it.
    """
    from lightning_hessian.spectrum import lanczos

    vals = planted_lambda_min_spectrum()
    n, width, true_min = len(vals), float(vals.max() - vals.min()), float(vals.min())
    diag = torch.tensor(vals)
    starts = [np.random.default_rng(1000 + s).standard_normal(n) for s in range(LMIN_STARTS)]
    rows = []
    for tol in LMIN_TOLS:
        out: dict[str, Any] = {"tol_min": tol}
        for label, basis in (("unrestarted", n), ("restarted", LMIN_BOUNDED_BASIS)):
            hvps, errs, conv = [], [], []
            for s, v0 in enumerate(starts):
                res = lanczos(
                    lambda v: diag * v,
                    torch.tensor(v0),
                    k=1,
                    tol=1e-4,
                    tol_min=tol,
                    max_matvec=2000,
                    max_basis=basis,
                    seed=s,
                )
                hvps.append(res.n_matvec)
                errs.append(abs(res.min_value - true_min) / width)
                conv.append(res.converged_min)
            out[label] = {
                "hvp": statistics.mean(hvps),
                "err": statistics.mean(errs),
                "err_max": max(errs),
                "conv": all(conv),
            }
        hvps, errs = [], []
        for v0 in starts:
            value, count = _arpack_sa(lambda x: vals * x, n, v0, tol * width / abs(true_min))
            hvps.append(count)
            errs.append(abs(value - true_min) / width)
        out["arpack"] = {"hvp": statistics.mean(hvps), "err": statistics.mean(errs), "err_max": max(errs)}
        out["restart_overhead"] = out["restarted"]["hvp"] / out["unrestarted"]["hvp"] - 1
        rows.append(out)
    print(
        f"\nlambda_min on the planted spectrum (N = {n}, width {width:.3f}, lambda_min {true_min:.5f}); "
        f"mean over {LMIN_STARTS} Gaussian starts shared by all solvers; errors relative to the width"
    )
    print(f"{'tol_min':>8} | {'unrestarted':>22} | {f'restarted, basis {LMIN_BOUNDED_BASIS}':>30} | {'ARPACK SA':>22}")
    cols = f"{'HVPs':>7} {'err':>7} {'max':>6}"
    print(f"{'':>8} | {cols} | {'HVPs':>7} {'vs unr.':>7} {'err':>7} {'max':>6} | {cols}")
    for r in rows:
        u, b, a = r["unrestarted"], r["restarted"], r["arpack"]
        print(
            f"{r['tol_min']:>8.0e} | {u['hvp']:>7.1f} {u['err']:>7.1e} {u['err_max']:>6.0e} | {b['hvp']:>7.1f} "
            f"{r['restart_overhead']:>+7.1%} {b['err']:>7.1e} {b['err_max']:>6.0e} | "
            f"{a['hvp']:>7.1f} {a['err']:>7.1e} {a['err_max']:>6.0e}"
        )
    return rows


def lambda_min_nets_table(problems: list[dict[str, Any]], seeds: int = 3) -> list[dict[str, Any]]:
    """tol_min against HVPs against actual error of ``extremal_eigenpairs`` on the benchmark nets."""
    rows = []
    print(
        f"\nlambda_min on the benchmark nets: extremal_eigenpairs(tol_min=...), {seeds} seeds; errors against "
        "the dense (MLP) or float64 Lanczos (CNN) reference, relative to the spectral width"
    )
    print(f"{'problem':>10} {'tol_min':>8} | {'HVPs':>6} {'err':>8} {'max err':>8} {'bound ok':>8} {'converged':>9}")
    for problem in problems:
        ref = dense_reference(problem) if problem["dense_reference"] else fp64_reference(problem)[0]
        width = ref["lambda_max"] - ref["lambda_min"]
        obj = objective(problem)
        for tol in LMIN_TOLS:
            hvps, errs, ok, conv = [], [], [], []
            for seed in range(seeds):
                res = extremal_eigenpairs(obj, tol_min=tol, seed=seed, max_hvp=400)
                hvps.append(res.n_hvp)
                errs.append(abs(res.lambda_min - ref["lambda_min"]) / width)
                ok.append(abs(res.lambda_min - ref["lambda_min"]) <= res.error_bound_min + 1e-6 * width)
                conv.append(res.converged_min)
            r = {
                "problem": problem["name"],
                "tol_min": tol,
                "hvp": statistics.mean(hvps),
                "err": statistics.mean(errs),
                "err_max": max(errs),
                "bound_ok": all(ok),
                "converged": all(conv),
            }
            rows.append(r)
            print(
                f"{r['problem']:>10} {tol:>8.0e} | {r['hvp']:>6.1f} {r['err']:>8.1e} {r['err_max']:>8.1e} "
                f"{'yes' if r['bound_ok'] else 'NO':>8} {'yes' if r['converged'] else 'no':>9}"
            )
    return rows


# ----------------------------------------------------------------------------- lambda_max tolerance (issue 8)
LMAX_TOLS = (1e-2, 3e-3, 1e-3, 1e-4, 1e-5)  # tol of extremal_eigenpairs(which="top"): residual / |lambda_max|
LMAX_SEEDS = 3
LMAX_WARM_LR = 0.005  # the small SGD step between the previous measurement and this one


def _sgd_step(model: nn.Module, problem: dict[str, Any], lr: float) -> nn.Module:
    """A copy of ``model`` after one plain SGD step on the probe loss (eval mode: BatchNorm buffers stay put)."""
    stepped = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(stepped.parameters(), lr=lr)
    loss_fn(stepped, (problem["x"], problem["y"])).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stepped


def _pyhessian_lambda_max(problem: dict[str, Any], model: nn.Module, reps: int = 3) -> dict[str, Any]:
    """PyHessian 0.1 ``eigenvalues(top_n=1)`` with its defaults (power iteration, maxIter=100, tol=1e-3 on the
    relative change of the eigenvalue), constructor included; the median of ``reps`` timings."""
    crit = nn.CrossEntropyLoss()
    values, hvps, times = [], [], []
    for _ in range(reps):
        m = copy.deepcopy(model)
        torch.manual_seed(SEED)  # PyHessian draws its start vector from the global RNG
        before = _ANCHOR_HVPS["pyhessian"]
        t0 = time.perf_counter()
        vals, _ = PyHessian(m, crit, data=(problem["x"], problem["y"]), cuda=False).eigenvalues(top_n=1)
        times.append(time.perf_counter() - t0)
        values.append(float(vals[0]))
        hvps.append(_ANCHOR_HVPS["pyhessian"] - before)
    return {"lambda_max": values[0], "n_hvp": hvps[0], "seconds": statistics.median(times)}


def lambda_max_tolerance_table(problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tol against HVPs against actual error of lambda_max (``which="top"``), cold and warm, next to PyHessian.

    At the parameters after one small SGD step (lr ``LMAX_WARM_LR``) from the trained ones: cold is a
    random start; warm starts from the result at the trained parameters computed with the same
    tolerance and seed (what a monitor's previous measurement hands the next one). Errors are
    relative to the dense float64 (MLP) or float64 Lanczos at tol 1e-10 (CNN) reference at the
    stepped parameters; ``bound`` says whether every actual error was within the reported
    ``error_bounds[0]``. Seconds: median of 3 timings of seed 0, with the Objective's construction
    and first graph (as PyHessian's include its constructor's backward).
    """
    rows = []
    print(
        f"\nlambda_max tolerance (issue 8): extremal_eigenpairs(which='top', tol=...) after one SGD step "
        f"(lr {LMAX_WARM_LR:g}); mean (max) over {LMAX_SEEDS} seeds; rel. error against a float64 reference"
    )
    print(
        f"{'problem':>9} {'tol':>6} | {'cold HVPs':>9} {'err':>8} {'max':>7} {'sec':>6} | {'guided':>9} {'err':>8} "
        f"{'max':>7} {'sec':>6} | {'warm HVPs':>9} {'err':>8} {'max':>7} {'sec':>6} | {'bound':>5} {'conv':>4}"
    )
    for problem in problems:
        trained = problem["model"]
        stepped = _sgd_step(trained, problem, LMAX_WARM_LR)
        at_step = {**problem, "model": stepped}
        ref = dense_reference(at_step) if problem["dense_reference"] else fp64_reference(at_step)[0]
        ref_max = ref["lambda_max"]
        ph = _pyhessian_lambda_max(problem, stepped) if HAVE_PYHESSIAN else None
        if ph is not None:
            ph["err"] = abs(ph["lambda_max"] - ref_max) / abs(ref_max)
        for tol in LMAX_TOLS:
            out: dict[str, Any] = {"problem": problem["name"], "tol": tol, "reference": ref_max}
            bound_ok, conv = [], []
            for start in ("cold", "guided", "warm"):
                hvps, errs = [], []
                for seed in range(LMAX_SEEDS):
                    kw: dict[str, Any] = {"tol": tol, "which": "top", "seed": seed, "max_hvp": 300}
                    init = extremal_eigenpairs(objective(problem), **kw) if start == "warm" else None
                    guide = objective(at_step).grad() if start == "guided" else None  # the monitor's first run
                    res = extremal_eigenpairs(objective(at_step), init=init, guide=guide, **kw)
                    err = abs(res.lambda_max - ref_max)
                    hvps.append(res.n_hvp)
                    errs.append(err / abs(ref_max))
                    bound_ok.append(err <= res.error_bounds[0] + 1e-6 * abs(ref_max))
                    conv.append(res.converged_max)
                prev = (
                    extremal_eigenpairs(objective(problem), tol=tol, which="top", seed=SEED)
                    if start == "warm"
                    else None
                )

                def run(
                    prev: Any = prev, model: Any = at_step, tol: float = tol, guided: bool = start == "guided"
                ) -> Any:
                    obj = objective(model)  # a guided run pays for its gradient
                    guide = obj.grad() if guided else None
                    return extremal_eigenpairs(obj, tol=tol, which="top", seed=SEED, init=prev, guide=guide)

                _, sec, _ = median_timed(run)
                out[start] = {
                    "hvp": statistics.mean(hvps),
                    "err": statistics.mean(errs),
                    "err_max": max(errs),
                    "seconds": sec,
                }
            out["bound_ok"], out["converged"] = all(bound_ok), all(conv)
            if ph is not None:
                out["vs_pyhessian"] = {
                    "error_ratio_cold": ph["err"] / max(out["cold"]["err_max"], 1e-300),
                    "error_ratio_guided": ph["err"] / max(out["guided"]["err_max"], 1e-300),
                    "error_ratio_warm": ph["err"] / max(out["warm"]["err_max"], 1e-300),
                    "time_ratio_cold": out["cold"]["seconds"] / ph["seconds"],
                    "time_ratio_guided": out["guided"]["seconds"] / ph["seconds"],
                    "time_ratio_warm": out["warm"]["seconds"] / ph["seconds"],
                }
            rows.append(out)
            cells = " | ".join(
                f"{out[k]['hvp']:>9.1f} {out[k]['err']:>8.1e} {out[k]['err_max']:>7.0e} {out[k]['seconds']:>6.3f}"
                for k in ("cold", "guided", "warm")
            )
            print(
                f"{problem['name']:>9} {tol:>6.0e} | {cells} | "
                f"{'yes' if out['bound_ok'] else 'NO':>5} {'yes' if out['converged'] else 'no':>4}"
            )
        if ph is not None:
            print(
                f"{problem['name']:>9} {'PyHessian default':>17} (power iteration, tol 1e-3 on the eigenvalue change): "
                f"{ph['n_hvp']} HVPs, err {ph['err']:.1e}, {ph['seconds']:.3f} s"
            )
            for r in rows:
                if r["problem"] == problem["name"]:
                    r["pyhessian"] = ph
            for r in [r for r in rows if r["problem"] == problem["name"]]:
                v = r["vs_pyhessian"]
                verdicts = {
                    k: "PASS" if v[f"error_ratio_{k}"] >= 10 and v[f"time_ratio_{k}"] <= 1 else "FAIL"
                    for k in ("cold", "guided", "warm")
                }
                print(
                    f"{'':>9} tol {r['tol']:.0e}: PyHessian's error / our worst error "
                    f"{v['error_ratio_cold']:.3g} cold, {v['error_ratio_guided']:.3g} guided, "
                    f"{v['error_ratio_warm']:.3g} warm; our time / PyHessian's {v['time_ratio_cold']:.2f} cold, "
                    f"{v['time_ratio_guided']:.2f} guided, {v['time_ratio_warm']:.2f} warm "
                    "[tenth of its error at most its time: " + ", ".join(f"{k} {x}" for k, x in verdicts.items()) + "]"
                )
        else:
            print(
                f"{problem['name']:>9} PyHessian not importable: its documented default stops when the eigenvalue "
                "changes by less than 1e-3 (relative) between power iterations"
            )
    return rows


def probe_size_table(problems: list[dict[str, Any]], n_batches: int = 4) -> list[dict[str, Any]]:
    """lambda_max of a 1-batch probe against the ``n_batches``-batch probe that contains it (CPU, tol 1e-5).

    The data of each net is split into ``n_batches`` equal batches; each single batch's Hessian is
    measured, and the mean Hessian's (all batches). lambda_max is convex in the matrix, so the mean
    of the single-batch values is at least the all-batch value: a small probe is biased upward.
    """
    rows = []
    print(f"\nprobe size: lambda_max of each single batch vs the {n_batches}-batch probe (tol 1e-5, which='top')")
    for problem in problems:
        xs, ys = problem["x"].chunk(n_batches), problem["y"].chunk(n_batches)
        batches = list(zip(xs, ys, strict=True))
        model = problem["model"]
        full = extremal_eigenpairs(Objective(model, loss_fn, batches), tol=1e-5, which="top", seed=SEED)
        singles = [
            extremal_eigenpairs(Objective(model, loss_fn, [b]), tol=1e-5, which="top", seed=SEED).lambda_max
            for b in batches
        ]
        mean = statistics.mean(singles)
        r = {
            "problem": problem["name"],
            "batch_size": len(xs[0]),
            "lambda_max_all": full.lambda_max,
            "lambda_max_single": singles,
            "single_mean": mean,
            "bias": mean / full.lambda_max - 1,
            "first_batch_bias": singles[0] / full.lambda_max - 1,
        }
        rows.append(r)
        print(
            f"{problem['name']:>9}: {n_batches} x {r['batch_size']} samples: lambda_max {full.lambda_max:.5g}; single "
            f"batches {', '.join(f'{v:.5g}' for v in singles)} (mean {mean:.5g}: {r['bias']:+.1%}; the first "
            f"batch alone, the monitor's default probe: {r['first_batch_bias']:+.1%})"
        )
    return rows


TRACE_REUSE_SEEDS = 20
TRACE_REUSE_HVPS = 30  # the Trace instrument's default budget


def trace_reuse_table(problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hutch++ alone against Hutch++ / Hutchinson deflated by the Krylov space of a Lanczos run at the same step.

    Every row spends ``TRACE_REUSE_HVPS`` products on the trace; the Lanczos run (``Eigenvalues``'
    defaults: top only, tol 3e-3, gradient-guided; or both ends) is paid by the eigenvalue
    measurement anyway, so its space is free. Over ``TRACE_REUSE_SEEDS`` seeds: the RMS relative
    error against the reference trace (dense float64 for the MLP; 1,200-HVP float64 Hutch++ for
    the CNN, whose own stderr is printed), the mean reported stderr, and the space's dimension.
    """
    rows = []
    print(
        f"\ntrace reuse (issue 8): {TRACE_REUSE_HVPS} HVPs per estimate, {TRACE_REUSE_SEEDS} seeds; RMS relative error "
        "against the reference, mean reported stderr (relative), dimension of the free Krylov space"
    )
    print(
        f"{'problem':>9} {'estimator':<40} {'dim V':>6} {'RMS err':>9} {'stderr':>9} {'vs hutch++':>10}   "
        "Trace()'s choice (share of seeds: its sketch rule picks this row)"
    )
    for problem in problems:
        if problem["dense_reference"]:
            ref = dense_reference(problem)
            ref_trace, ref_err = ref["trace"], 0.0
        else:
            ref = fp64_reference(problem)[0]
            ref_trace, ref_err = ref["trace"], ref["trace_stderr"]
        third = TRACE_REUSE_HVPS // 3
        variants: dict[str, tuple[str | None, str, int]] = {  # (space, method, sketch)
            "hutch++ (alone)": (None, "hutch++", third),
            "hutchinson (alone)": (None, "hutchinson", 0),
            "hutch++ + top-only Lanczos space": ("top", "hutch++", third),
            "hutchinson + top-only Lanczos space": ("top", "hutchinson", 0),
            "hutch++ + both-ends Lanczos space": ("both", "hutch++", third),
            "hutchinson + both-ends Lanczos space": ("both", "hutchinson", 0),
        }
        base_rms = None
        for label, (which, method, sketch) in variants.items():
            errs, stderrs, dims, defaults = [], [], [], []
            for seed in range(TRACE_REUSE_SEEDS):
                obj = objective(problem, hvp="cached")
                space = None
                if which is not None:
                    kept: list[Any] = []
                    extremal_eigenpairs(
                        obj,
                        tol=3e-3,
                        which=which,
                        seed=seed,
                        guide=obj.grad(),
                        krylov_out=kept,  # type: ignore[arg-type]
                    )
                    space = kept[0]
                    dims.append(space.dim)
                est = hutchinson_trace(
                    obj,
                    n=TRACE_REUSE_HVPS,
                    method=method,  # type: ignore[arg-type]
                    seed=seed,
                    deflate=space,
                    sketch=sketch,
                )
                # what Trace() does with this space: hutch++ with the default sketch rule
                rule = 0 if space is not None and space.dim >= third else third
                defaults.append(which is not None and sketch == rule)
                errs.append((est.value - ref_trace) / abs(ref_trace))
                stderrs.append(est.stderr / abs(ref_trace))
            rms = math.sqrt(sum(e * e for e in errs) / len(errs))
            base_rms = rms if base_rms is None else base_rms
            row = {
                "problem": problem["name"],
                "estimator": label,
                "space": which,
                "method": method,
                "dim": statistics.mean(dims) if dims else 0.0,
                "rms_rel_error": rms,
                "mean_rel_stderr": statistics.mean(stderrs),
                "reference": ref_trace,
                "reference_stderr": ref_err,
                "trace_default_share": sum(defaults) / len(defaults),
            }
            rows.append(row)
            print(
                f"{problem['name']:>9} {label:<40} {row['dim']:>6.1f} {rms:>9.2e} {row['mean_rel_stderr']:>9.2e} "
                f"{rms / base_rms:>10.2f}   {row['trace_default_share']:.0%}"
            )
        if ref_err:
            print(
                f"{'':>9} (reference stderr {ref_err / abs(ref_trace):.1e} relative: errors below it are not resolved)"
            )
    return rows


def main() -> None:
    if "--lambda-max-only" in sys.argv:
        torch.manual_seed(SEED)
        problems = [make_mlp(), make_cnn()]
        payload = {"tolerance": lambda_max_tolerance_table(problems), "probe_size": probe_size_table(problems)}
        out = RESULTS.with_name("lambda_max_tolerance.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_clean(payload), indent=1))
        print(f"raw numbers: {out}")
        return
    if "--trace-reuse-only" in sys.argv:
        torch.manual_seed(SEED)
        payload = {"trace_reuse": trace_reuse_table([make_mlp(), make_cnn()])}
        out = RESULTS.with_name("trace_reuse.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_clean(payload), indent=1))
        print(f"raw numbers: {out}")
        return
    if "--lambda-min-only" in sys.argv:
        torch.manual_seed(SEED)
        payload = {"planted": lambda_min_planted_table(), "nets": lambda_min_nets_table([make_mlp(), make_cnn()])}
        out = RESULTS.with_name("lambda_min_tolerance.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_clean(payload), indent=1))
        print(f"raw numbers: {out}")
        return
    t0 = time.perf_counter()
    print(
        f"lightning_hessian {lightning_hessian.__version__}, torch {torch.__version__}, scipy {scipy.__version__}, "
        f"python {platform.python_version()}, threads {torch.get_num_threads()}, tol {TOL:g} "
        "(lambda_min: the default tol_min, 1e-3 of the spectral width)"
    )
    if not (HAVE_PYHESSIAN and HAVE_EIGTHINGS):
        print("not installed: pip install --no-deps pyhessian hessian-eigenthings  (skipping those rows)")
    print(
        f"anchors: pyhessian {anchor_version('pyhessian') if HAVE_PYHESSIAN else 'missing'}, "
        f"hessian-eigenthings {anchor_version('hessian-eigenthings') if HAVE_EIGTHINGS else 'missing'}"
    )
    results: dict[str, Any] = {}
    for make in (make_mlp, make_cnn):
        problem = make()
        results[problem["name"]] = run_problem(problem)
    print(f"\n{'=' * 100}\nSUMMARY (tol {TOL:g}; errors against the reference of each problem)\n{'=' * 100}")
    summary = {name: ratios(name, res) for name, res in results.items()}
    total = time.perf_counter() - t0
    results["lambda_min_tolerance"] = {
        "planted": lambda_min_planted_table(),
        "nets": lambda_min_nets_table([make_mlp(), make_cnn()]),
    }
    problems = [make_mlp(), make_cnn()]
    results["lambda_max_tolerance"] = {
        "tolerance": lambda_max_tolerance_table(problems),
        "probe_size": probe_size_table(problems),
    }
    total = time.perf_counter() - t0
    print(f"\ntotal wall time {total:.1f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": {
            "lightning_hessian": lightning_hessian.__version__,
            "torch": torch.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "tol": TOL,
            "seed": SEED,
            "pyhessian": anchor_version("pyhessian") if HAVE_PYHESSIAN else None,
            "hessian_eigenthings": anchor_version("hessian-eigenthings") if HAVE_EIGTHINGS else None,
            "total_seconds": total,
        },
        "problems": results,
        "summary": summary,
    }
    RESULTS.write_text(json.dumps(_clean(payload), indent=1))
    print(f"raw numbers: {RESULTS}")


if __name__ == "__main__":
    main()
