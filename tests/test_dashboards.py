"""What a user sees on the dashboards: charts of one unit each, only for what runs, and the stability edge in W&B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from lightning_hessian import HessianMonitor, sinks
from lightning_hessian.instruments import Eigenvalues, Landscape, OptimizerCurvature, Trace
from lightning_models import TanhModule, probe_loader, probe_loss, train_loader, trainer_kwargs
from logreader_utils import multiline_charts, tensorboard_accumulator, tensorboard_layouts, wandb_offline_run


class AdamModule(TanhModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _charts(monitor: HessianMonitor) -> dict[str, list[Any]]:
    return sinks.tensorboard_layout([monitor._chart_set()])["Hessian"]


def test_layout_has_the_charts_of_the_instruments_that_run_and_no_others() -> None:
    plain = _charts(HessianMonitor(instruments=[Eigenvalues()], budget=None))
    assert "hessian: extremal eigenvalues" in plain
    assert not any("trace" in title or "stability" in title or "landscape" in title for title in plain)
    assert "hessian: measurements postponed by the budget" not in plain  # no budget, nothing postponed
    full = _charts(HessianMonitor(instruments=[Eigenvalues(), Trace(), OptimizerCurvature(), Landscape()]))
    assert full["hessian: preconditioned sharpness vs stability edge"][1] == [
        "^hessian/preconditioned_lambda_max$",
        "^hessian/stability_threshold$",
    ]
    assert "landscape: lowest loss on the planes" in full and "hessian: measurements postponed by the budget" in full
    # One unit per chart: counts and seconds, ratios and probabilities never share an axis.
    assert full["hessian: HVPs per measurement"][1] == ["^hessian/hvp_count$", "^hessian/lanczos_hvp_count$"]
    assert full["hessian: seconds per measurement"][1] == ["^hessian/seconds$"]
    assert full["hessian: negative ratio |lambda_min| / lambda_max"][1] == ["^hessian/negative_ratio$"]


def test_stability_edge_chart_in_tensorboard_and_wandb(tmp_path: Path, wandb_offline: Any) -> None:
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    wb = WandbLogger(offline=True, save_dir=str(tmp_path), project="edge")
    monitor = HessianMonitor(
        instruments=[OptimizerCurvature()],
        every_n_steps=2,
        budget=None,
        at_fit_start=False,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, max_epochs=-1, logger=[tb, wb], callbacks=[monitor]))
    trainer.fit(AdamModule(), train_loader())
    wandb_offline.finish()
    assert [int(h["step"]) for h in monitor.history] == [2, 4, 6]
    # TensorBoard: the two series and the chart that draws them together.
    acc = tensorboard_accumulator(tb.log_dir)
    charts = multiline_charts(tensorboard_layouts(acc)[0])
    assert "hessian: preconditioned sharpness vs stability edge" in charts
    for tag in ("hessian/preconditioned_lambda_max", "hessian/stability_threshold"):
        assert [e.step for e in acc.Scalars(tag)] == [2, 4, 6]
    # W&B: one line-series chart at the end of fit, its table holding both series at the measured steps.
    tables = list((wandb_offline_run(tmp_path) / "files" / "media" / "table").rglob("*stability_edge*.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    keys = {row[1] for row in table["data"]}
    assert keys == {"preconditioned_lambda_max", "stability_threshold"}
    assert sorted({row[0] for row in table["data"]}) == [2, 4, 6]
    thresholds = [row[2] for row in table["data"] if row[1] == "stability_threshold"]
    assert thresholds == [monitor.history[0]["stability_threshold"]] * 3  # 38 / lr for Adam (0.9, 0.999)
    assert abs(thresholds[0] - 38 / 1e-2) < 1e-6
