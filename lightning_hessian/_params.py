"""Parameter selection and flat-vector views: which parameters an analysis sees, and in what order."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

ParamSpec = str | Sequence[str] | None


def select_parameters(model: nn.Module, params: ParamSpec = None) -> list[tuple[str, nn.Parameter]]:
    """Return ``(name, parameter)`` pairs in ``model.named_parameters()`` order.

    ``None`` selects every parameter with ``requires_grad``; a glob string or a list of
    globs on parameter names (``"fc1.*"``, ``["0.weight", "2.*"]``) selects a subset.
    Raises ``ValueError`` when nothing is selected, naming what was available.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        selected = named
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"params must be None, a glob string or a list of glob strings; got {params!r}")
        selected = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not selected:
        available = [n for n, _ in named]
        if not available:
            raise ValueError(
                "the model has no trainable parameters (none with requires_grad=True); "
                "the Hessian is taken with respect to trainable parameters only"
            )
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise ValueError(f"params={params!r} matches no trainable parameter; available names: {shown}")
    return selected


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one 1-D vector (a copy), in the given order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like`` (the inverse of :func:`flatten`)."""
    out = []
    offset = 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"flat vector has {vector.numel()} entries, the selected parameters have {offset}")
    return out
