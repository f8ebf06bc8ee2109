"""A transient progress bar for long measurements, under Lightning's own bar."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def progress_bar(what: str, total: int) -> Iterator[Callable[[int], Any]]:
    """A bar that disappears when done (rank zero, when the trainer shows one): a landscape snapshot is
    hundreds of forward passes, and training otherwise seems to hang while it runs."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"HessianMonitor: {what}", leave=False, dynamic_ncols=True, position=1) as bar:
        yield bar.update
