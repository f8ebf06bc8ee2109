"""pin_malloc_thresholds: glibc's thresholds fixed in a running process (checked in a fresh subprocess)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from lightning_hessian import pin_malloc_thresholds

# A 64 MiB block is above glibc's largest dynamic mmap threshold (32 MiB): by default it is mmapped,
# and freed straight back to the system. With the threshold pinned at 256 MiB it comes from the heap,
# and with a 1 GiB trim threshold the freed heap memory stays with the process.
_PROBE = """
import ctypes, json, sys
from lightning_hessian import pin_malloc_thresholds
from lightning_hessian.allocator import dynamic_glibc_thresholds
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
pinned = pin_malloc_thresholds() if sys.argv[1] == "pin" else None
before = libc.mallinfo2()
block = libc.malloc(64 * 2**20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"pinned": pinned, "dynamic": dynamic_glibc_thresholds(), "mmapped": during.hblks - before.hblks,
                  "kept_free": after.fordblks - before.fordblks}))
"""


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_pinned_thresholds_keep_large_blocks_in_the_heap() -> None:
    default, pinned = _probe("default"), _probe("pin")
    assert default["mmapped"] == 1 and default["kept_free"] < 2**20  # mmapped, and gone once freed
    assert default["dynamic"] is True and pinned["dynamic"] is False  # what the monitor's CPU notice asks
    assert pinned["pinned"] is True
    assert pinned["mmapped"] == 0 and pinned["kept_free"] >= 60 * 2**20  # from the heap, and kept


@pytest.mark.parametrize("bad", [0, -5, 2**31, 1.5, True])
def test_bad_thresholds_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="must be an integer number of bytes"):
        pin_malloc_thresholds(mmap_threshold=bad)
