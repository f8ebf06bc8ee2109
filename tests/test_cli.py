"""HessianMonitor configured from YAML through LightningCLI (both Lightning flavours); the saved config round trip.

``tests/cli_config.yaml`` (``cli_config_unified.yaml`` for ``lightning.pytorch``) puts the callback in
``trainer.callbacks`` with ``loss_fn: lightning_models.plain_probe_loss``, a string import path that
jsonargparse must resolve to the function through the ``loss_fn`` type hint. The CLI runs in
process (``args=[...]``); ``tests/`` is on ``sys.path`` (conftest), so test modules import by name.
"""

from __future__ import annotations

import csv
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_hessian
from lightning_hessian.instruments import Eigenvalues, Trace
from lightning_models import dense_spectrum_at, plain_probe_loss

HERE = Path(__file__).parent
INIT_ARGS = (
    "every_n_steps",
    "every_n_epochs",
    "log_spaced",
    "budget",
    "at_fit_start",
    "at_fit_end",
    "loss_fn",
    "probe_dataloader",
    "probe_batches",
    "params",
    "hvp",
    "mode",
    "seed",
    "prefix",
    "on_error",
    "allow_untested",
)
EXPECTED_STEPS = [1, 2, 4]  # at_fit_start once the 2 captured probe batches are in (step 1), then steps 2 and 4


@dataclass
class Flavour:
    cli: Any  # the LightningCLI class
    model: type
    data: type
    monitor: type
    callback_base: type
    logger: str
    config: Path


def _flavour(name: str) -> Flavour:
    if name == "pytorch_lightning":
        import pytorch_lightning as pl
        from pytorch_lightning.cli import LightningCLI

        from cli_models import CliDataModule
        from lightning_models import TanhModule

        return Flavour(
            LightningCLI,
            TanhModule,
            CliDataModule,
            lightning_hessian.HessianMonitor,
            pl.Callback,
            "pytorch_lightning.loggers.CSVLogger",
            HERE / "cli_config.yaml",
        )
    lightning_pytorch = pytest.importorskip("lightning.pytorch")
    cli_unified_models = importlib.import_module("cli_unified_models")
    from lightning.pytorch.cli import LightningCLI as UnifiedCLI

    from lightning_hessian.unified import HessianMonitor as UnifiedMonitor

    return Flavour(
        UnifiedCLI,
        cli_unified_models.UnifiedTanhModule,
        cli_unified_models.UnifiedDataModule,
        UnifiedMonitor,
        lightning_pytorch.Callback,
        "lightning.pytorch.loggers.CSVLogger",
        HERE / "cli_config_unified.yaml",
    )


@pytest.fixture(scope="module", params=["pytorch_lightning", "lightning"])
def flavour(request: pytest.FixtureRequest) -> Flavour:
    return _flavour(request.param)


@pytest.fixture(scope="module")
def first_run(flavour: Flavour, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """One ``fit`` from the YAML per flavour, shared by the tests below: (the LightningCLI, its save_dir)."""
    root = tmp_path_factory.mktemp("cli")
    return _fit(flavour, root, flavour.config), root


def _monitors(cli: Any, flavour: Flavour) -> list[Any]:
    found = [c for c in cli.trainer.callbacks if isinstance(c, lightning_hessian._callback_core._HessianMonitorCore)]
    assert all(type(c) is flavour.monitor and isinstance(c, flavour.callback_base) for c in found), found
    return found


def _configuration(monitor: Any) -> dict[str, Any]:
    return {name: getattr(monitor, name) for name in INIT_ARGS}


def _hessian_rows(metrics_csv: Path) -> list[dict[str, str]]:
    with open(metrics_csv) as fh:
        return [row for row in csv.DictReader(fh) if row.get("hess/lambda_max", "")]


def _fit(flavour: Flavour, save_dir: Path, config: Path) -> Any:
    argv = sys.argv
    sys.argv = ["lightning"]  # LightningCLI(args=...) warns when pytest's own arguments are in sys.argv
    try:
        return flavour.cli(
            flavour.model,
            flavour.data,
            args=[
                "fit",
                f"--config={config}",
                f"--trainer.logger={flavour.logger}",
                f"--trainer.logger.save_dir={save_dir}",
            ],
        )
    finally:
        sys.argv = argv


def test_cli_yaml_configures_and_runs_the_monitor(flavour: Flavour, first_run: tuple[Any, Path]) -> None:
    cli, _ = first_run
    (monitor,) = _monitors(cli, flavour)
    # The YAML's init_args arrived typed: loss_fn is the function itself, not its import path.
    assert monitor.loss_fn is plain_probe_loss  # an unannotated function is accepted
    assert monitor.every_n_steps == 2 and monitor.every_n_epochs is None and monitor.budget is None
    eig, trace = monitor.instruments  # nested class_path / init_args
    assert isinstance(eig, Eigenvalues) and isinstance(trace, Trace)
    assert eig.k == 2 and eig.tol == pytest.approx(1e-5) and not eig.lambda_min and trace.n_hvp == 20
    assert monitor.prefix == "hess" and monitor.probe_batches == 2
    assert cli.trainer.global_step == 4

    # It measured on schedule, and logged under its prefix to the CSV logger and the JSONL record.
    assert [int(h["step"]) for h in monitor.history] == EXPECTED_STEPS
    log_dir = Path(cli.trainer.log_dir)
    rows = _hessian_rows(log_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == EXPECTED_STEPS
    columns = set(rows[0])
    assert {"hess/lambda_max", "hess/lambda_2", "hess/trace", "hess/hvp_count"} <= columns
    assert not any(c.startswith("hessian/") or c == "hess/lambda_min" for c in columns), sorted(columns)
    for row, record in zip(rows, monitor.history):
        assert float(row["hess/lambda_max"]) == pytest.approx(record["lambda_max"], rel=1e-6)
        assert float(row["hess/lambda_2"]) <= float(row["hess/lambda_max"])
    jsonl = [json.loads(line) for line in (log_dir / "hessian" / "hess.jsonl").read_text().splitlines()]
    assert [int(e["step"]) for e in jsonl] == EXPECTED_STEPS
    assert all(len(e["eigenvalues"]) == 2 for e in jsonl)

    # The last measurement (step 4 = the final weights) agrees with a dense Hessian of the captured probe set.
    probe = monitor.state_dict()["probe"]
    assert len(probe) == 2
    dense_max, _ = dense_spectrum_at(cli.model, probe)
    assert monitor.history[-1]["lambda_max"] == pytest.approx(dense_max, rel=1e-4)


def test_saved_config_reloads_to_the_same_monitor(flavour: Flavour, first_run: tuple[Any, Path]) -> None:
    first, save_dir = first_run
    (original,) = _monitors(first, flavour)
    saved = Path(first.trainer.log_dir) / "config.yaml"
    assert saved.is_file()
    text = saved.read_text()
    assert "lightning_models.plain_probe_loss" in text and "Unable to serialize" not in text
    assert "lightning_hessian.instruments.Eigenvalues" in text

    # `fit --config <saved config.yaml>`: the callback comes back configured identically, and (seed_everything: 0)
    # reproduces the first run's measurements.
    second = _fit(flavour, save_dir, saved)
    (reloaded,) = _monitors(second, flavour)
    assert reloaded is not original
    assert _configuration(reloaded) == _configuration(original)
    assert reloaded.loss_fn is plain_probe_loss
    options = [{k: v for k, v in vars(i).items() if not k.startswith("_")} for i in original.instruments]
    assert [{k: v for k, v in vars(i).items() if not k.startswith("_")} for i in reloaded.instruments] == options
    assert reloaded.state_key == original.state_key  # a checkpoint of the first run resumes into it
    assert Path(second.trainer.log_dir) != Path(first.trainer.log_dir)
    assert [h["step"] for h in reloaded.history] == [h["step"] for h in original.history]
    for a, b in zip(reloaded.history, original.history):
        for key in ("lambda_max", "lambda_2", "trace"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (a["step"], key)
    for a, b in zip(reloaded.state_dict()["probe"], original.state_dict()["probe"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
