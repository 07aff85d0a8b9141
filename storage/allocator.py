"""``tune_malloc``: keep freed heap memory for the next batch (glibc malloc).

A training step or an eviction pass allocates and frees the same multi-megabyte numpy
temporaries over and over. By default glibc gives memory back to the kernel whenever
more than a trim threshold is free at the top of the heap, and serves blocks past a
threshold with fresh mappings, so the next batch takes a page fault (and the kernel
zeroes a page) for every 4 KiB it had a moment before: ~40% of the page faults of
``bench/store.py``'s embedded run, and the output of a lookup's gather (256 KiB a table)
took twice as long as from reused memory.

The settings: blocks up to 32 MiB come from the heap (glibc's own ceiling for its
adaptive threshold, which any explicit setting turns off), up to 128 MiB may sit free
at its top, and each time the heap grows it grows 64 MiB more. The cost is that much
resident memory kept instead of handed back, per malloc arena (the main thread's, and
one for each thread that allocates heavily). Other C libraries (musl) have no such
knobs: nothing is changed there.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MIB = 1 << 20
SETTINGS = {
    _M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", 32 * MIB),
    _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", 128 * MIB),
    _M_TOP_PAD: ("MALLOC_TOP_PAD_", 64 * MIB),
}


def malloc_env() -> dict[str, str]:
    """The same settings as environment variables, which glibc reads when a process
    starts (for child processes: decode workers, read processes, baselines)."""
    return {name: str(value) for name, value in SETTINGS.values()}


def tune_malloc(*, children: bool = True) -> bool:
    """Apply the settings to this process (and, with ``children``, to processes it
    starts later, through the environment). A setting already in the environment is the
    operator's: glibc applied it at start-up and it is left alone. Returns whether this
    process's allocator took the others."""
    preset = {name for name, _ in SETTINGS.values() if name in os.environ}
    if children:
        for name, value in malloc_env().items():
            os.environ.setdefault(name, value)
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        log.debug("no mallopt in this C library: malloc left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    taken = [
        mallopt(param, value) == 1
        for param, (name, value) in SETTINGS.items()
        if name not in preset
    ]
    return all(taken)
