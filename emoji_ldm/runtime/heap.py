"""Freeing a long-lived worker's heaps: Arrow's memory pool and glibc's, handed back to the OS."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def release_free_heap() -> None:
    """Hand the pages of memory this process has freed back to the OS: Arrow's memory pool (mimalloc in the
    wheels) and glibc's heaps (malloc_trim; a no-op on other C libraries).

    A model actor that runs batch after batch on Ray's threads frees its activations into heaps that glibc
    keeps, so without this it grows with the batches (bench/bulk_actor_memory.py --ray --trim). Called once
    a batch, it costs milliseconds against a batch's seconds."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
