"""Returning memory to the system (glibc on Linux; elsewhere these are no-ops)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import mmap
import os

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


# Compiled oneDNN products kept, in each of its two caches (see bound_onednn_kernel_caches).
ONEDNN_KERNEL_CACHE_ENTRIES = 16


def bound_onednn_kernel_caches(entries: int = ONEDNN_KERNEL_CACHE_ENTRIES) -> None:
    """Keep at most ``entries`` compiled oneDNN products in each of the two caches that hold them (oneDNN's primitive
    cache, and PyTorch's ideep cache in front of it), where both keep 1024 by default.

    Each new shape of a product compiles a kernel of about 0.4 MB that the caches keep for the process's life, and the
    decoder's prompt-token products change shape with every number of points (a request may carry 500): through
    REST (``benchmarks/bench_app.py``'s long session: 60 clicks on an image, a point more each time), the server grew
    by 96-98 MB with the defaults, 37-39 MB at 32, 15 MB at 16 and 7 MB at 8 (ideep's cache is per thread); its
    first and warm clicks were no slower at 16. Both libraries read the bound when they first run a product, so this
    must come before that; a value set in the environment is kept.
    """
    for variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(variable, str(entries))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# Allocations from this size up get their own mapping, returned to the system when freed (see fix_mmap_threshold).
MMAP_THRESHOLD_BYTES = 2 * 2**20


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> None:
    """Serve allocations of ``nbytes`` and more from their own mappings, at a fixed threshold.

    glibc raises its mmap threshold each time a mapped block is freed, up to 32 MB. A server that has loaded weights
    has it raised, so an encode's activations of several MB come from the heaps and their freed blocks stay resident
    and fragment. Fixed when the server starts (``on_init_complete``), at 4 MB the peak above the floor during
    start-up scoring measured through REST was 0.156-0.157 GB against 0.186-0.195 GB. At 2 MB the encoder's 3 MB
    activations (the MLP's hidden layer, the global attention's bias, the adapters' columns) are mapped too: peaks
    0.136-0.137 GB during scoring, 0.133-0.138 GB during the clicks and 0.128-0.133 GB during a swap, against
    0.150 / 0.150 / 0.135 GB at 4 MB in the same hour, for an encode 1.5-3% slower (``docs/benchmarks.md``). At
    1 MB the clicks were slower: a 512x512 mask in floats is 1 MB.
    """
    with contextlib.suppress(OSError, AttributeError):
        _libc().mallopt(M_MMAP_THRESHOLD, nbytes)


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Drop the pages of a file-mapped, never written ``tensor`` from this process's memory (``madvise``); they
    would be read from the file again if touched. Where that is unavailable the mapping is released as a whole."""
    drop_mapped_range(tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size())


def drop_mapped_range(start: int, end: int) -> None:
    """:func:`drop_mapped_pages` for the addresses ``[start, end)`` of a file mapping never written, widened to whole
    pages: also the pages the kernel mapped in around the ones read (64 KB around each fault)."""
    page = mmap.PAGESIZE
    start = start // page * page
    end = -(-end // page) * page
    with contextlib.suppress(OSError, AttributeError):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
