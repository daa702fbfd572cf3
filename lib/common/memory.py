"""Returning memory to the system (glibc on Linux; elsewhere these are no-ops)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import mmap

import torch


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def release_freed_memory(collect: bool = True) -> None:
    """Give freed memory (a checkpoint's tensors, a replaced model, encoder activations) back to the system.

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in its heaps; ``malloc_trim`` returns
    them from every heap, which keeps the server's resident memory near the model's own size.
    """
    if collect:
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(count: int) -> None:
    """Let threads started from now on share ``count`` malloc arenas (glibc; elsewhere a no-op).

    glibc gives each new thread that allocates an arena of its own (up to 8 per core), and each keeps the memory
    its thread freed for that thread alone: a server with request, encoder, scoring and OpenMP threads held tens of
    MB that way. Few cores leave little contention for a shared one.
    """
    with contextlib.suppress(OSError, AttributeError):
        _libc().mallopt(_M_ARENA_MAX, count)


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Drop the pages of a file-mapped, never written ``tensor`` from this process's memory (``madvise``); they
    would be read from the file again if touched. Where that is unavailable the mapping is released as a whole."""
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
    with contextlib.suppress(OSError, AttributeError):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
