"""Process-wide settings of a train.py / eval.py process, measured with `scripts/bench.py
--process` (docs/performance.md).

glibc's allocator, set for training: keep freed memory in the process instead of handing it
back to the kernel after every step.

With glibc's defaults, a tensor above the (dynamic) mmap threshold is mapped fresh and unmapped
when freed, and the heap's top is trimmed whenever more than twice the last such size is free:
each training step then maps, faults in page by page and returns the same tens of megabytes of
activations. How often depends on which thread freed what, so the kernel time of a run is
erratic (2 to 9 s of system time for the same job, docs/performance.md). A fixed mmap threshold
(glibc's largest, 32 MiB) and a high trim threshold make that memory stay with the process.

A user who sets ``GLIBC_TUNABLES`` or ``MALLOC_*_`` keeps their own settings; other C libraries
(macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for a training process; True when they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def skip_collection_at_exit() -> None:
    """Call when the run's work is done, just before the interpreter exits: what is left is moved
    to the collector's permanent generation, so Python's final collection does not walk it.

    After importing Lightning (torch, sympy, scipy, matplotlib) that walk alone takes 1.1 s of
    a 2-core machine at every exit. Files, loggers and atexit handlers are closed as before;
    only garbage in reference cycles is left to the operating system. Not called between the
    jobs of a sweep, whose garbage must still be collected.
    """
    gc.freeze()
