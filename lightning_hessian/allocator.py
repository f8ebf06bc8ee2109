"""Fixed glibc malloc thresholds for CPU training: an explicit, process-wide opt-in.

glibc's ``malloc`` adapts its mmap threshold to the largest block freed so far (up to 32 MiB) and
its trim threshold to twice that. A Hessian measurement's temporaries (double backward) raise
them, after which every CPU training step returns memory to the system and faults it back in:
on the CIFAR-shaped ResNet of ``benchmarks/bench_allocator.py`` page faults per step tripled and
stayed so, and steps got slower, long after the measurement ended. Fixed thresholds remove the
effect and usually make CPU training itself faster (no faults at all). They are what
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set at start-up; this function sets them in a
running process (a notebook, a script that cannot change its environment).

The monitor never calls it: allocator settings belong to the user's process. Tensors on a GPU go
through PyTorch's caching allocator and are not concerned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: ``mallopt`` parameters (``<malloc.h>``)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 256 * 2**20
DEFAULT_TRIM_THRESHOLD = 2**30
_INT_MAX = 2**31 - 1
_ENV_THRESHOLDS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_pinned = False


def pin_malloc_thresholds(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (both in bytes); return whether it took effect.

    Blocks below ``mmap_threshold`` come from the heap, and freed heap memory is returned to the
    system only beyond ``trim_threshold``: the process keeps up to that much freed memory
    resident, in exchange for no page faults on reuse. Setting a threshold also switches off
    glibc's dynamic adjustment of both. Returns False (and changes nothing) where the C library
    is not glibc, e.g. on macOS, Windows or musl.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _INT_MAX:
            raise ValueError(f"{name} must be an integer number of bytes in [1, {_INT_MAX}], got {value!r}")
    libc = _glibc()
    if libc is None:
        return False
    global _pinned
    ok_mmap = int(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) == 1
    ok_trim = int(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)) == 1
    _pinned = _pinned or (ok_mmap and ok_trim)
    return ok_mmap and ok_trim


def dynamic_glibc_thresholds() -> bool:
    """Whether this process runs glibc's malloc with its dynamic thresholds (the case the module is about).

    False when the C library is not glibc, when :func:`pin_malloc_thresholds` took effect, when the
    thresholds (or glibc tunables) come from the environment, or when another allocator is preloaded.
    """
    if _pinned or any(os.environ.get(name) for name in _ENV_THRESHOLDS):
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
