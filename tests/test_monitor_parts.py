"""The monitor's parts on their own: the probe objectives, the once-only messages, the fit-end publishing."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_hessian._announcer import Announcer, steps_per_epoch
from lightning_hessian._objectives import ProbeObjectives
from lightning_hessian._publisher import Publisher
from lightning_hessian.instruments.base import Artifact, Instrument, InstrumentOutput
from lightning_hessian.run_files import RunFiles
from tests.lightning_models import TanhModule, dense_hessian_at, probe_loader, probe_loss


def _objectives() -> ProbeObjectives:
    objectives = ProbeObjectives(None, "double_backward", "eval")
    objectives.loss = probe_loss
    return objectives


def test_the_probe_objective_is_kept_while_the_parameters_stay_and_rebuilt_when_one_is_frozen() -> None:
    torch.manual_seed(0)
    module = TanhModule()
    batches = list(probe_loader())
    objectives = _objectives()
    first = objectives.for_module(module, batches)
    assert objectives.for_module(module, batches) is first
    v = torch.randn(first.num_params)
    dense = dense_hessian_at(module, probe_loader())
    torch.testing.assert_close(first.hvp(v).double(), dense @ v.double(), rtol=1e-4, atol=1e-5)
    assert objectives.hvp_count() == 1

    module.net[0].weight.requires_grad_(False)  # 10 x 12 weights leave the Hessian
    second = objectives.for_module(module, batches)
    assert second is not first and second.num_params == first.num_params - 120
    assert objectives.hvp_count() == 0  # the rebuilt objective has made no product yet

    objectives.release()
    assert objectives.training is None and objectives.hvp_count() == 0


def test_a_validation_objective_exists_only_for_an_instrument_with_a_validation_probe() -> None:
    module = TanhModule()
    objectives = _objectives()
    objectives.val_probes["landscape"] = list(probe_loader(n=64))
    assert objectives.validation("landscape") is None  # nothing before the training probe's objective
    objectives.for_module(module, list(probe_loader()))
    val = objectives.validation("landscape")
    assert val is not None and objectives.validation("landscape") is val
    assert objectives.validation("eigenvalues") is None
    val.hvp(torch.ones(val.num_params))
    assert objectives.hvp_count() == 1  # the validation objective's products count too


def test_an_objective_needs_the_probe_loss() -> None:
    with pytest.raises(RuntimeError, match="probe loss is resolved at setup"):
        ProbeObjectives(None, "auto", "eval").for_module(TanhModule(), list(probe_loader()))


def _trainer(batches: Any = 12, accumulate: int = 1) -> SimpleNamespace:
    return SimpleNamespace(num_training_batches=batches, accumulate_grad_batches=accumulate)


def test_each_message_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    announcer = Announcer("hessian", 0.05)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="probe incomplete") as warned:
        announcer.skips(0)  # nothing postponed: nothing said
        announcer.skips(3)
        announcer.skips(5)
        announcer.warn_once("probe incomplete")
        announcer.warn_once("probe incomplete")
        announcer.warn_once(None)
        seconds = {"eigenvalues": 2.0}
        announcer.spacing(_trainer(12, 2), 10, seconds, step_seconds=1.0, next_allowed={"eigenvalues": 50})
        announcer.spacing(_trainer(12, 2), 50, seconds, step_seconds=1.0, next_allowed={"eigenvalues": 90})
    text = caplog.text
    assert text.count("postponed 3 measurement(s)") == 1 and "postponed 5" not in text
    assert [str(w.message) for w in warned] == ["probe incomplete"]
    # 2 s against 1 s steps; the next run 40 steps on; 12 batches accumulated in twos are 6 optimizer steps.
    assert text.count("eigenvalues took 2 s at step 10, about 2 training steps") == 1
    assert "planned from step 50 (40 steps on; an epoch is 6 steps)" in text
    assert "step 90" not in text


def test_no_budget_means_no_spacing_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        Announcer("hessian", None).spacing(_trainer(), 10, {"eigenvalues": 2.0}, 1.0, {"eigenvalues": 50})
    assert "next run" not in caplog.text


def test_steps_per_epoch_is_none_when_the_trainer_cannot_say() -> None:
    assert steps_per_epoch(_trainer(float("inf"))) == float("inf")
    assert steps_per_epoch(SimpleNamespace()) is None
    assert steps_per_epoch(_trainer(10, 0)) == 10.0  # an unset accumulation counts as 1


class _Summarising(Instrument):
    def __init__(self, name: str, fails: bool) -> None:
        super().__init__()
        self.name, self.fails = name, fails

    def run(self, ctx: Any) -> InstrumentOutput:
        return InstrumentOutput({})

    def summary(self) -> InstrumentOutput | None:
        if self.fails:
            raise OSError("disk full")
        return InstrumentOutput({}, (Artifact("save", "summary", lambda d: d.mkdir(parents=True)),))


def test_a_failing_summary_does_not_stop_the_next_one(tmp_path: Path) -> None:
    instruments = {"first": _Summarising("first", fails=True), "second": _Summarising("second", fails=False)}
    publisher = Publisher("hessian", RunFiles("hessian", "landscape"), instruments)
    tried: list[str] = []
    failed: list[str] = []

    def guard(what: str, fn: Any) -> None:
        tried.append(what)
        try:
            fn()
        except OSError as err:
            failed.append(f"{what}: {err}")

    publisher.finish(lambda: tmp_path, [], 7, guard)
    assert tried == ["the first summary", "the second summary"]  # no landscape frames: no animation
    assert failed == ["the first summary: disk full"]
    assert (tmp_path / "summary" / "hessian").is_dir()
