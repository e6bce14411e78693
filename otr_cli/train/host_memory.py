"""Keep host memory freed during start-up from staying resident (glibc's malloc only)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from typing import Iterator

M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h
MIB = 1024**2
START_UP_MMAP_THRESHOLD_BYTES = 1 * MIB
# glibc's dynamic threshold never rises above this on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): what a
# long run converges to anyway once tensors of that size have been freed.
STEADY_MMAP_THRESHOLD_BYTES = 32 * MIB


@functools.lru_cache(maxsize=1)
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release_freed_host_memory() -> bool:
    """Return the heap pages that freed allocations left behind to the OS; True when glibc did it."""
    libc = _glibc()
    return False if libc is None else bool(libc.malloc_trim(0))


@contextlib.contextmanager
def large_frees_return_to_os() -> Iterator[None]:
    """Inside, every allocation of START_UP_MMAP_THRESHOLD_BYTES (1 MiB) or more is its own mmap.

    Why: glibc raises its mmap threshold after the first large free (up to 32 MiB), so the
    module-sized tensors of a start-up (gathered ZeRO-3 modules, partitions that
    deepspeed.initialize copies into flat buffers, then frees) land on the heap, and once freed they
    stay resident: on a 481M-parameter model (1.79 GiB fp32) one ZeRO-3 rank peaked ~1.7 GiB higher
    (scripts/bench_startup_memory.py). As mmaps, they go back to the OS when freed. On exit the
    threshold is pinned at 32 MiB, where glibc's own adjustment ends up, so training allocates as
    before, and the heap is trimmed. Not glibc (musl, macOS): nothing changes.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, START_UP_MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD_BYTES)
        release_freed_host_memory()
