"""HessianMonitor under 2-process DDP on CPU (ddp_spawn, gloo) against single-process runs and a dense Hessian.

ddp_spawn runs the Trainer in subprocesses, so the callback object in this process is never
updated: results are read back from what rank zero wrote (the CSVLogger's metrics.csv and the
callback's ``hessian/hessian.jsonl``), and from a logger that records every rank's calls. The
DDP run happens once per module (about 20 s on 2 cores); every test below reads its outputs.

Under DDP the training trajectory differs from a single-process one (each rank sees half of the
data), so the operators are compared (a) at step 0, on the initial weights, which both runs share,
and (b) at the final step, on the final DDP weights (ddp_spawn hands them back to this process).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor

from ddp_helpers import DestroyProcessGroupAtTeardown, RankRecordingLogger, ddp_train_loader, rank_one_fails_loss
from lightning_hessian import HessianMonitor
from lightning_hessian.instruments import Eigenvalues, Trace
from lightning_models import TanhModule, dense_spectrum_at, probe_loader, probe_loss, train_loader, trainer_kwargs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ddp_spawn on CPU is only tested on Linux"),
]

MAX_STEPS = 4
EVERY = 2
EXPECTED_STEPS = [0, 2, 4]  # at_fit_start (0), every 2 steps (2, 4); at_fit_end at 4 must not repeat it
MONITOR_KWARGS: dict[str, Any] = dict(loss_fn=probe_loss, seed=3, budget=None)


def _instruments(lambda_min: bool = True, trace: bool = True) -> list[Any]:
    chosen: list[Any] = [Eigenvalues(lambda_min=lambda_min, lambda_min_every=1, tol=1e-5, tol_min=1e-4, max_hvp=150)]
    return [*chosen, Trace(n_hvp=30)] if trace else chosen


def _monitor(**overrides: Any) -> HessianMonitor:
    kwargs: dict[str, Any] = dict(
        probe_dataloader=probe_loader(),
        every_n_steps=EVERY,
        every_n_epochs=None,
        at_fit_start=True,
        at_fit_end=True,
        instruments=_instruments(),
        **MONITOR_KWARGS,
    )
    kwargs.update(overrides)
    return HessianMonitor(**kwargs)


def _single_process_measurement(state: dict[str, Tensor], tmp: Path) -> dict[str, float]:
    """One single-process measurement on ``state``'s weights: at_fit_start, before any optimizer step."""
    model = TanhModule()
    model.load_state_dict(state)
    monitor = _monitor(every_n_steps=None, log_spaced=False, at_fit_end=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp, max_steps=1, callbacks=[monitor]))
    trainer.fit(model, train_loader())
    assert [int(h["step"]) for h in monitor.history] == [0], monitor.history
    return monitor.history[0]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train 2-process ddp_spawn for MAX_STEPS steps once; return what rank zero wrote and the weights."""
    saved_env = dict(os.environ)
    tmp = tmp_path_factory.mktemp("ddp")
    pl.seed_everything(1234)
    model = TanhModule()
    initial = copy.deepcopy(model.state_dict())
    csv_logger = CSVLogger(str(tmp), name="csv", version=0)  # fixed: this process never resolves it itself
    kwargs = trainer_kwargs(
        tmp,
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=MAX_STEPS,
        max_epochs=-1,
        logger=[csv_logger, RankRecordingLogger(str(tmp / "ranks"))],
        callbacks=[_monitor(), DestroyProcessGroupAtTeardown()],
    )
    trainer = pl.Trainer(**kwargs)
    try:
        trainer.fit(model, ddp_train_loader())
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    log_dir = Path(csv_logger.log_dir)
    with open(log_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    jsonl = [json.loads(line) for line in (log_dir / "hessian" / "hessian.jsonl").read_text().splitlines()]
    return dict(
        tmp=tmp,
        initial=initial,
        final=copy.deepcopy(model.state_dict()),  # ddp_spawn loads rank zero's final weights back into `model`
        rows=rows,
        jsonl=jsonl,
        ranks_dir=tmp / "ranks",
    )


def _csv_by_step(rows: list[dict[str, str]], key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in rows:
        if row.get(key, ""):
            out.setdefault(int(row["step"]), []).append(float(row[key]))
    return out


def test_rank_zero_logs_once_per_scheduled_step(ddp_run: dict[str, Any]) -> None:
    # metrics.csv: exactly one row carrying hessian/lambda_max per expected step, nothing else.
    by_step = _csv_by_step(ddp_run["rows"], "hessian/lambda_max")
    assert sorted(by_step) == EXPECTED_STEPS
    assert all(len(v) == 1 for v in by_step.values()), by_step
    # The run-directory JSONL record: one line per measurement, same steps, same values as the CSV.
    assert [int(e["step"]) for e in ddp_run["jsonl"]] == EXPECTED_STEPS
    for entry in ddp_run["jsonl"]:
        assert entry["lambda_max"] == pytest.approx(by_step[int(entry["step"])][0], rel=1e-6)
        assert entry["eigenvalues"][0] == pytest.approx(entry["lambda_max"], rel=1e-12)
    # A logger that records every rank: rank 0 logged each step's Hessian metrics once, rank 1 never.
    records = {
        rank: [json.loads(line) for line in (ddp_run["ranks_dir"] / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }
    assert records[1], "rank 1 logged nothing at all: the recording logger does not see rank 1"
    hessian_calls = {
        rank: [r["step"] for r in recs if any(k.startswith("hessian/") for k in r["metrics"])]
        for rank, recs in records.items()
    }
    assert hessian_calls[0] == EXPECTED_STEPS
    assert hessian_calls[1] == []


def test_ddp_lambda_max_at_start_matches_single_process_and_dense(ddp_run: dict[str, Any]) -> None:
    ddp = {int(e["step"]): e for e in ddp_run["jsonl"]}[0]
    single = _single_process_measurement(ddp_run["initial"], ddp_run["tmp"] / "single_start")
    # Same operator (the full probe set, split 2 + 2 batches across ranks and all-reduced): same numbers.
    assert _rel(ddp["lambda_max"], single["lambda_max"]) < 1e-5, (ddp["lambda_max"], single["lambda_max"])
    assert _rel(ddp["trace"], single["trace"]) < 1e-5, (ddp["trace"], single["trace"])
    assert ddp["lambda_min_converged"] == 1.0 and single["lambda_min_converged"] == 1.0
    assert _rel(ddp["lambda_min"], single["lambda_min"]) < 1e-5, (ddp["lambda_min"], single["lambda_min"])
    # Independent ground truth: the dense float64 Hessian of the whole probe set on the initial weights.
    model = TanhModule()
    model.load_state_dict(ddp_run["initial"])
    dense_max, dense_min = dense_spectrum_at(model, probe_loader())
    assert _rel(ddp["lambda_max"], dense_max) < 1e-4, (ddp["lambda_max"], dense_max)
    assert abs(ddp["lambda_min"] - dense_min) < 1e-4 * (dense_max - dense_min), (ddp["lambda_min"], dense_min)
    # The comparison can tell: one rank's share alone (probe batches 0 and 2) has a clearly different spectrum.
    share_max, _ = dense_spectrum_at(model, list(probe_loader())[0::2])
    assert _rel(share_max, dense_max) > 1e-3, (share_max, dense_max)


def test_ddp_final_measurement_matches_single_process_on_final_weights(ddp_run: dict[str, Any]) -> None:
    final, initial = ddp_run["final"], ddp_run["initial"]
    assert any(not torch.equal(final[k], initial[k]) for k in final), "the DDP weights did not come back"
    ddp = {int(e["step"]): e for e in ddp_run["jsonl"]}[MAX_STEPS]
    single = _single_process_measurement(final, ddp_run["tmp"] / "single_final")
    assert _rel(ddp["lambda_max"], single["lambda_max"]) < 1e-5, (ddp["lambda_max"], single["lambda_max"])
    model = TanhModule()
    model.load_state_dict(final)
    dense_max, _ = dense_spectrum_at(model, probe_loader())
    assert _rel(ddp["lambda_max"], dense_max) < 1e-4, (ddp["lambda_max"], dense_max)
    assert math.isfinite(ddp["trace"])


# ----------------------------------------------------------------------------- failures on one rank, resume


def _ddp_trainer(tmp: Path, callbacks: list[Any], max_steps: int, **overrides: Any) -> pl.Trainer:
    """2-process ddp_spawn with a short collective timeout: a stranded rank fails the test in seconds, not 30 min."""
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy

    kwargs = trainer_kwargs(
        tmp,
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        accelerator="cpu",
        devices=2,
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=[*callbacks, DestroyProcessGroupAtTeardown()],
        **overrides,
    )
    return pl.Trainer(**kwargs)


def _spawned(fn: Any) -> Any:
    saved_env = dict(os.environ)
    try:
        return fn()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


def test_a_failure_on_one_rank_is_a_skip_on_every_rank(tmp_path: Path) -> None:
    pl.seed_everything(1234)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    monitor = _monitor(loss_fn=rank_one_fails_loss, instruments=_instruments(False, False), at_fit_end=False)
    trainer = _ddp_trainer(tmp_path, [monitor], max_steps=4, logger=[csv_logger])
    _spawned(lambda: trainer.fit(TanhModule(), ddp_train_loader()))  # returns: no rank was left waiting
    log_dir = Path(csv_logger.log_dir)
    with open(log_dir / "metrics.csv") as fh:
        by_step = _csv_by_step(list(csv.DictReader(fh)), "hessian/lambda_max")
    # Step 0 (rank 1 out of memory) and step 2 (a NaN on rank 1) were skipped on both ranks; step 4 measured.
    assert sorted(by_step) == [4]
    jsonl = [json.loads(line) for line in (log_dir / "hessian" / "hessian.jsonl").read_text().splitlines()]
    assert [int(e["step"]) for e in jsonl] == [4]
    assert math.isfinite(jsonl[0]["lambda_max"]) and jsonl[0]["lambda_max_converged"] == 1.0


def _resume_run(root: Path, max_steps: int, ckpt_path: str | None = None) -> dict[str, Any]:
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(1234)
    model = TanhModule(lr=0.05)
    monitor = HessianMonitor(
        instruments=[Eigenvalues(lambda_min=False, tol=1e-6)],
        every_n_steps=2,
        every_n_epochs=None,
        probe_batches=2,
        loss_fn=probe_loss,
        budget=None,
    )
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
    csv_logger = CSVLogger(str(root), name="csv", version=0)
    trainer = _ddp_trainer(
        root, [monitor, checkpoint], max_steps=max_steps, logger=[csv_logger], enable_checkpointing=True
    )
    _spawned(lambda: trainer.fit(model, ddp_train_loader(), ckpt_path=ckpt_path))
    jsonl = Path(csv_logger.log_dir) / "hessian" / "hessian.jsonl"
    records = {int(e["step"]): e for e in map(json.loads, jsonl.read_text().splitlines())}
    return dict(model=model, records=records)


def test_ddp_resume_measures_every_ranks_own_probe_shard(tmp_path: Path) -> None:
    from lightning_hessian._batch_codec import decode

    first = _resume_run(tmp_path, max_steps=4)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)  # loads the way Lightning loads it
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("HessianMonitor"))
    shards = [[decode(b) for b in shard] for shard in state["probe_shards"]]
    assert len(shards) == 2 and all(len(s) == 2 for s in shards)
    assert not torch.equal(shards[0][0][0], shards[1][0][0])  # each rank captured its own batches
    union = [b for shard in shards for b in shard]
    # Before the resume: the step-4 measurement is the dense lambda_max of both shards at the step-4 weights.
    at_ckpt = TanhModule()
    at_ckpt.load_state_dict({k[len("") :]: v for k, v in checkpoint["state_dict"].items()})
    dense_before, _ = dense_spectrum_at(at_ckpt, union)
    assert _rel(first["records"][4]["lambda_max"], dense_before) < 1e-4
    # After the resume: the step-6 measurement again uses both ranks' shards, not rank 0's twice.
    second = _resume_run(tmp_path, max_steps=6, ckpt_path=str(ckpt))
    dense_after, _ = dense_spectrum_at(second["model"], union)
    rank_zero_only, _ = dense_spectrum_at(second["model"], shards[0] + shards[0])
    assert _rel(dense_after, rank_zero_only) > 1e-3  # the comparison can tell the two apart
    assert _rel(second["records"][6]["lambda_max"], dense_after) < 1e-4, (second["records"][6], dense_after)
    assert sorted(second["records"]) == [1, 2, 4, 6]  # the JSONL in the same directory: each step once


def test_a_budgeted_ddp_run_decides_identically_on_every_rank(tmp_path: Path) -> None:
    """With a budget every rank must run the same measurements (their collectives pair up): the plan is
    rank zero's, broadcast. A mismatch would strand a rank in a collective (a 60 s timeout here)."""
    pl.seed_everything(1234)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    recorder = RankRecordingLogger(str(tmp_path / "ranks"))
    monitor = HessianMonitor(
        instruments=[Eigenvalues(lambda_min=False, tol=1e-5)],
        every_n_steps=1,
        budget=0.9,
        probe_dataloader=probe_loader(n=64),  # one batch per rank: a first run estimated at ~30 steps
        loss_fn=probe_loss,
        seed=3,
        on_error="raise",
    )
    trainer = _ddp_trainer(tmp_path, [monitor], max_steps=80, logger=[csv_logger, recorder])
    _spawned(lambda: trainer.fit(TanhModule(), ddp_train_loader()))  # returns: no rank was left waiting
    jsonl = [
        json.loads(line) for line in (Path(csv_logger.log_dir) / "hessian" / "hessian.jsonl").read_text().splitlines()
    ]
    steps = [int(e["step"]) for e in jsonl]
    assert steps and steps == sorted(set(steps))
    assert all(math.isfinite(e["lambda_max"]) for e in jsonl)
