"""The guarantees where users break them: resume with any batch container, reused monitors, short runs,
stateful metrics and loaders left alone, data files that neither lose nor repeat a step, early messages.

Each test here failed on the code before the fix it names (issue "Keep every guarantee").
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torchmetrics
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from batch_types import ContainerModule, container_loader, container_loss
from lightning_hessian import HessianMonitor
from lightning_hessian.instruments import Eigenvalues, Landscape
from lightning_models import TanhModule, probe_loader, probe_loss, train_loader, trainer_kwargs

# ----------------------------------------------------------------------------- resume with batch containers


def _container_fit(root: Path, kind: str, max_steps: int, ckpt_path: str | None = None) -> HessianMonitor:
    pl.seed_everything(0, verbose=False)
    monitor = HessianMonitor(
        every_n_steps=2,
        loss_fn=container_loss,
        probe_batches=2,
        instruments=[Eigenvalues(lambda_min=False)],
        budget=None,
    )
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
    trainer = pl.Trainer(
        **trainer_kwargs(
            root, max_steps=max_steps, max_epochs=-1, enable_checkpointing=True, callbacks=[monitor, checkpoint]
        )
    )
    trainer.fit(ContainerModule(lr=0.01), container_loader(kind), ckpt_path=ckpt_path)
    return monitor


@pytest.mark.parametrize("kind", ["namedtuple", "userdict", "opaque"])
def test_resume_works_with_any_batch_container(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    first = _container_fit(tmp_path, kind, max_steps=4)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"][first.state_key]  # Lightning's own way to load
    with caplog.at_level("INFO"):
        second = _container_fit(tmp_path, kind, max_steps=6, ckpt_path=str(ckpt))
    steps = [int(h["step"]) for h in second.history]
    if kind == "opaque":  # cannot be stored: not stored, said so, captured again after the resume
        assert steps == [1, 2, 4, 5, 6]  # the re-captured probe is complete at step 5: a fit-start measurement
        assert state["probe"] == [] and "Opaque" in state["probe_note"]
        assert "captured again" in caplog.text and "Opaque" in caplog.text
    else:  # restored as the same container type with the same tensors: the same operator as before
        assert steps == [1, 2, 4, 6]
        assert len(state["probe"]) == 2
        before, after = first.probe.batches, second.probe.batches
        assert [type(b) for b in after] == [type(b) for b in before]
        for b, a in zip(before, after):
            for key in ("x", "y"):
                assert torch.equal(_field(a, key), _field(b, key))


def _field(batch: Any, key: str) -> Tensor:
    return getattr(batch, key) if hasattr(batch, "_fields") else batch[key]


# ----------------------------------------------------------------------------- training untouched


class MetricModule(TanhModule):
    """Updates a torchmetrics metric in training_step, as users do (self.acc(logits, y))."""

    def __init__(self) -> None:
        super().__init__()
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.acc(logits, y)
        return nn.functional.cross_entropy(logits, y)


def test_training_step_fallback_leaves_stateful_metrics_untouched(tmp_path: Path) -> None:
    def run(callbacks: list[Any]) -> MetricModule:
        pl.seed_everything(3, verbose=False)
        module = MetricModule()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5, max_epochs=-1, callbacks=callbacks))
        trainer.fit(module, train_loader())
        return module

    plain = run([])
    monitor = HessianMonitor(every_n_steps=2, probe_batches=2, budget=None)  # no loss_fn: training_step fallback
    monitored = run([monitor])
    assert len(monitor.history) >= 2
    assert monitored.acc.tp.item() + monitored.acc.fn.item() == plain.acc.tp.item() + plain.acc.fn.item() == 5 * 32
    assert monitored.acc.compute().item() == plain.acc.compute().item()
    for a, b in zip(plain.state_dict().values(), monitored.state_dict().values()):
        assert torch.equal(a, b)


def test_probe_loader_may_be_the_training_loader_itself(tmp_path: Path) -> None:
    def run(with_monitor: bool) -> dict[str, Tensor]:
        pl.seed_everything(5, verbose=False)
        module = TanhModule()
        loader = train_loader(seed=11)  # shuffles with its own generator
        monitor = HessianMonitor(every_n_steps=3, probe_dataloader=loader, loss_fn=probe_loss, budget=None)
        callbacks = [monitor] if with_monitor else []
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=callbacks))
        trainer.fit(module, loader)
        return module.state_dict()

    plain, monitored = run(False), run(True)
    for key in plain:
        assert torch.equal(plain[key], monitored[key]), key


# ----------------------------------------------------------------------------- files: nothing lost, nothing twice


class FailingLogger(CSVLogger):
    """A logger whose log_metrics raises for the monitor's metrics (a network logger gone down)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if any(k.startswith("hessian/") for k in metrics):
            raise ConnectionError("logger backend unreachable")
        super().log_metrics(metrics, step)


def test_jsonl_is_written_even_when_a_logger_raises(tmp_path: Path) -> None:
    monitor = HessianMonitor(every_n_steps=2, probe_dataloader=probe_loader(), loss_fn=probe_loss, budget=None)
    logger = FailingLogger(str(tmp_path), name="csv", version=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, max_epochs=-1, logger=logger, callbacks=[monitor]))
    with pytest.warns(UserWarning, match="logger backend unreachable.*kept in `history`"):
        trainer.fit(TanhModule(), train_loader())
    jsonl = Path(logger.log_dir) / "hessian" / "hessian.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4] == [h["step"] for h in monitor.history]
    assert all(r["run"] == "0" for r in records)  # the logger's version names the run


def _crash_resume_fit(root: Path, max_steps: int, ckpt_path: str | None = None) -> HessianMonitor:
    pl.seed_everything(0, verbose=False)
    monitor = HessianMonitor(
        every_n_steps=2,
        every_n_epochs=None,
        probe_dataloader=probe_loader(),
        loss_fn=probe_loss,
        instruments=[Eigenvalues(lambda_min=False), Landscape(every_n_steps=4, resolution=3, planes=["random"])],
        budget=None,
    )
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        **trainer_kwargs(
            root, max_steps=max_steps, max_epochs=-1, enable_checkpointing=True, callbacks=[monitor, checkpoint]
        )
    )
    trainer.fit(TanhModule(), train_loader(), ckpt_path=ckpt_path)
    return monitor


def test_resume_after_a_crash_writes_every_step_exactly_once(tmp_path: Path) -> None:
    _crash_resume_fit(tmp_path, max_steps=8)  # "crashes" after step 8; the last checkpoint we use is step 4's
    ckpt = next((tmp_path / "ckpt").glob("*step=4.ckpt"))
    leftover = tmp_path / "hessian" / ".hessian1234.lh-tmp"
    leftover.write_bytes(b"half a file")
    _crash_resume_fit(tmp_path, max_steps=10, ckpt_path=str(ckpt))
    steps = [json.loads(line)["step"] for line in (tmp_path / "hessian" / "hessian.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 6, 8, 10]
    frames = sorted(p.name for p in (tmp_path / "landscape" / "hessian").glob("step_*.npz"))
    assert frames == ["step_000000000.npz", "step_000000004.npz", "step_000000008.npz", "step_000000010.npz"]
    assert not leftover.exists()


def test_data_files_get_the_loggers_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        monitor = HessianMonitor(
            every_n_steps=2,
            probe_dataloader=probe_loader(),
            loss_fn=probe_loss,
            instruments=[Eigenvalues(), Landscape(every_n_steps=2, resolution=3, planes=["random"])],
            budget=None,
        )
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, max_epochs=-1, callbacks=[monitor]))
        trainer.fit(TanhModule(), train_loader())
    finally:
        os.umask(old)
    files = list((tmp_path / "landscape").rglob("*.npz")) + list((tmp_path / "hessian").glob("*.jsonl"))
    assert files
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
    assert not list(tmp_path.rglob("*.lh-tmp"))


# ----------------------------------------------------------------------------- per-fit state, short runs


def test_a_reused_monitor_starts_each_fit_afresh(tmp_path: Path) -> None:
    monitor = HessianMonitor(every_n_steps=2, every_n_epochs=None, probe_batches=2, loss_fn=probe_loss, budget=None)
    runs = []
    for seed in (0, 1):
        pl.seed_everything(seed, verbose=False)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path / str(seed), max_steps=6, max_epochs=-1, callbacks=[monitor]))
        trainer.fit(TanhModule(), train_loader(seed=seed))
        runs.append([int(h["step"]) for h in monitor.history])
    assert runs[0] == runs[1] == [1, 2, 4, 6]


@pytest.mark.parametrize(
    ("overrides", "expected_steps"),
    [({"limit_train_batches": 1, "max_epochs": 2}, [1, 2]), ({"max_steps": 1, "max_epochs": -1}, [1])],
    ids=["limit_train_batches", "max_steps"],
)
def test_short_runs_measure_with_what_was_captured_and_say_so(
    tmp_path: Path, overrides: dict[str, Any], expected_steps: list[int]
) -> None:
    monitor = HessianMonitor(loss_fn=probe_loss, probe_batches=4, log_spaced=False, budget=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[monitor], **overrides))
    with pytest.warns(UserWarning, match="after only 1 of probe_batches=4 batches") as record:
        trainer.fit(TanhModule(), train_loader())
    assert sum("probe_batches=4" in str(w.message) for w in record) == 1  # once, not per measurement
    assert [int(h["step"]) for h in monitor.history] == expected_steps
    assert len(monitor.probe.batches) == 1


# ----------------------------------------------------------------------------- messages at setup


def _fake_trainer(*bases: str) -> Any:
    cls: type = object
    for name in bases:
        cls = type(name, (cls,), {})
    return types.SimpleNamespace(strategy=cls())


def test_strategy_subclasses_are_accepted() -> None:
    HessianMonitor(loss_fn=probe_loss).setup(_fake_trainer("DDPStrategy", "MyClusterDDP"), TanhModule(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "module", "message"),
    [
        ({"params": "encoder.*"}, TanhModule, r"params='encoder.\*' matches no trainable parameter; available names"),
        (
            {"instruments": [Eigenvalues(k=400, max_hvp=500)]},
            TanhModule,
            r"k=400 must be smaller than the number of selected\s+parameters \(327\)",
        ),
        ({}, "complex", "complex ones"),
    ],
)
def test_setup_checks_what_the_model_makes_knowable(kwargs: dict[str, Any], module: Any, message: str) -> None:
    if module == "complex":
        module = TanhModule()
        module.extra = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    else:
        module = module()
    with pytest.raises(ValueError, match=message):
        HessianMonitor(loss_fn=probe_loss, **kwargs).setup(_fake_trainer("SingleDeviceStrategy"), module, "fit")


# ----------------------------------------------------------------------------- out of memory


class _OutOfMemoryOnce:
    """A probe loss whose first call runs out of memory (CI has no GPU: the allocation failure is injected)."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error
        self.calls = 0

    def __call__(self, module: nn.Module, batch: Any) -> Tensor:
        self.calls += 1
        if self.calls == 1:
            raise self.error("injected: tried to allocate 20.00 GiB")
        return probe_loss(module, batch)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError], ids=["accelerator", "host"])
def test_out_of_memory_is_a_skipped_measurement_that_says_what_to_change(
    tmp_path: Path, error: type[BaseException]
) -> None:
    monitor = HessianMonitor(
        instruments=[Eigenvalues()],
        every_n_steps=2,
        probe_dataloader=probe_loader(),
        loss_fn=_OutOfMemoryOnce(error),
        budget=None,
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, max_epochs=-1, callbacks=[monitor]))
    with pytest.warns(UserWarning, match=r"step 0 ran out of memory and was skipped.*hvp='double_backward'.*params="):
        trainer.fit(TanhModule(), train_loader())
    assert trainer.global_step == 4  # training went on
    # The measurement at step 0 was skipped; measuring went on at steps 2 and 4 with a fresh objective.
    assert [int(h["step"]) for h in monitor.history] == [2, 4]
    assert monitor._n_failed == 1


# ----------------------------------------------------------------------------- silent zeros, buffers written in forward


def _detached_loss(module: nn.Module, batch: Any) -> Tensor:
    with torch.no_grad():
        return probe_loss(module, batch)


def test_a_detached_loss_is_a_user_error_not_zeros(tmp_path: Path) -> None:
    monitor = HessianMonitor(every_n_steps=2, probe_dataloader=probe_loader(), loss_fn=_detached_loss, budget=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, max_epochs=-1, callbacks=[monitor]))
    with pytest.warns(UserWarning, match=r"DetachedLossError: loss_fn returned a loss that does not require grad"):
        trainer.fit(TanhModule(), train_loader())
    assert monitor.history == []  # nothing reported, in particular no lambda_max = 0.0


class CountingModule(TanhModule):
    """Counts forward calls in a buffer (as call counters and QAT observers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


def test_buffers_written_in_forward_are_left_as_training_left_them(tmp_path: Path) -> None:
    def run(callbacks: list[Any]) -> dict[str, Tensor]:
        pl.seed_everything(2, verbose=False)
        module = CountingModule()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, max_epochs=-1, callbacks=callbacks))
        trainer.fit(module, train_loader())
        return {k: v.clone() for k, v in module.state_dict().items()}

    plain = run([])
    monitor = HessianMonitor(every_n_steps=2, probe_dataloader=probe_loader(), loss_fn=probe_loss, budget=None)
    watched = run([monitor])
    assert len(monitor.history) == 4 and int(plain["calls"]) == 6
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


# ----------------------------------------------------------------------------- files in the run's own directory


def test_wandb_runs_get_their_own_files(tmp_path: Path, wandb_offline: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.chdir(tmp_path)  # files must not land in the working directory
    ids = []
    for _ in range(2):
        logger = WandbLogger(offline=True, save_dir=str(tmp_path / "wb"), project="proj")
        monitor = HessianMonitor(every_n_steps=2, probe_dataloader=probe_loader(), loss_fn=probe_loss, budget=None)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, max_epochs=-1, logger=logger, callbacks=[monitor]))
        trainer.fit(TanhModule(), train_loader())
        ids.append(logger.version)
        wandb_offline.finish()
    assert ids[0] != ids[1]
    for run_id in ids:
        jsonl = tmp_path / "wb" / "proj" / str(run_id) / "hessian" / "hessian.jsonl"
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 2] and {r["run"] for r in records} == {run_id}
    assert not (tmp_path / "hessian").exists()
