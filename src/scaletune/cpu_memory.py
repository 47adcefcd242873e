"""Give memory a CPU training step frees back to the OS (Linux with glibc), for `train.release_cpu_memory`.

glibc serves an allocation from its heap unless it is at least the "mmap threshold", and it raises that
threshold to the size of every mmapped block it frees (up to 32 MiB). After the first large tensor of
a run is freed, activations therefore come from the heap, and a forward/backward pass that frees
tensors in a different order than it allocated them leaves holes the heap never returns: in the
30M benchmark's first step RSS grew ~1.9x the peak of live tensor bytes. A fixed threshold serves every
tensor of at least that size with its own mapping, unmapped when the tensor is freed, so RSS follows
the live tensors; the price is a page fault per 4 KiB each time such memory is touched anew.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
THRESHOLD_BYTES = 2 * 1024 * 1024  # measured: 1 MiB saved 3% more RSS than 2 MiB but cost twice the time


def release_freed_memory(threshold: int = THRESHOLD_BYTES) -> str | None:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (and DataLoader workers it forks).

    Returns why it was not done (not Linux/glibc, or the user set MALLOC_MMAP_THRESHOLD_ themselves,
    which wins), or None when it was.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return "MALLOC_MMAP_THRESHOLD_ is set in the environment; it is left as it is"
    if not sys.platform.startswith("linux"):
        return f"only glibc's allocator has this setting (platform {sys.platform})"
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt, version = libc.mallopt, libc.gnu_get_libc_version  # musl has neither
    except (OSError, AttributeError, TypeError):
        return "the C library is not glibc"
    version.restype = ctypes.c_char_p
    if mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)) != 1:
        return f"mallopt(M_MMAP_THRESHOLD, {threshold}) was refused by glibc {version().decode()}"
    return None
