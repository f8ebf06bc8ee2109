"""Shared test set-up: tests/ on sys.path, one torch thread, W&B offline inside tmp_path."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

# CI draws the same examples every run (a red CI is then reproducible); elsewhere hypothesis explores.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

sys.path.insert(0, str(Path(__file__).parent))

# Tiny models: one intra-op thread is as fast, and two OpenMP threads per process spin-wait badly
# on a busy 2-core machine (module-scoped training fixtures took minutes instead of seconds).
# The environment variable reaches the processes that ddp_spawn starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The models are tiny: one intra-op thread is as fast, and avoids OpenMP spin-waiting on a busy
    machine (on 2 shared cores this file took 36 s with 2 threads and 8 s with 1)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """W&B offline and quiet, every file of it under tmp_path; the run is finished afterwards."""
    wandb = pytest.importorskip("wandb")
    root = tmp_path / "wandb_env"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        path = root / var.lower()
        path.mkdir(parents=True)
        monkeypatch.setenv(var, str(path))
    yield wandb
    wandb.finish()
    wandb.teardown()  # stop the wandb-core service this process started
