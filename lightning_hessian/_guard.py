"""Side-effect guard: module modes, grad mode, compile stance and global RNG streams restored after an analysis."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

_BATCH_NORM = (nn.modules.batchnorm._BatchNorm,)


@contextlib.contextmanager
def analysis_mode(model: nn.Module, mode: str = "eval") -> Iterator[None]:
    """Put ``model`` into the analysis mode and restore everything a probe could touch.

    ``mode="eval"``: every submodule in eval mode (dropout off, BatchNorm on running statistics).
    ``mode="batch_stats"``: BatchNorm layers in train mode (batch statistics; callers pass
    buffer copies so running statistics never move), everything else in eval mode.

    On exit each submodule's own ``training`` flag, the torch/NumPy/Python RNG states and the
    grad mode are exactly as before. A ``torch.compile``d forward is run eagerly, since compiled
    graphs do not support double backward.
    """
    if mode not in ("eval", "batch_stats"):
        raise ValueError(f"mode must be 'eval' or 'batch_stats', got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(_eager_stance())
            for m, _ in flags:
                m.training = mode == "batch_stats" and isinstance(m, _BATCH_NORM)
            yield
    finally:
        for m, training in flags:
            m.training = training
        np.random.set_state(np_state)
        random.setstate(py_state)


def _eager_stance() -> contextlib.AbstractContextManager[None]:
    """``torch.compiler.set_stance("force_eager")`` when anything may be compiled, else a no-op.

    Nothing can be compiled before ``torch._dynamo`` is imported, and importing it costs about a
    second, so eager-only programs skip it.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or "torch._dynamo" not in sys.modules:  # pragma: no cover - torch < 2.6
        return contextlib.nullcontext()
    return set_stance("force_eager")  # type: ignore[no-any-return]
