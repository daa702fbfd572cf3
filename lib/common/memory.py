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


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Drop the pages of a file-mapped, never written ``tensor`` from this process's memory (``madvise``); they
    would be read from the file again if touched. Where that is unavailable the mapping is released as a whole."""
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
    with contextlib.suppress(OSError, AttributeError):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
