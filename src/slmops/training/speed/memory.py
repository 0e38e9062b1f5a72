"""The C library's heap kept between steps: fewer page faults for activations freed and made again."""

from __future__ import annotations

import ctypes
import sys


def keep_freed_memory() -> bool:
    """Have glibc keep freed activations in the heap for the next step instead of handing each block
    over 128 KB back to the OS and faulting it in again (~10,000 page faults a step on SmolLM2; a step
    measured 2% faster without them). Blocks over 32 MB are still mapped and returned; the peak is
    unchanged, the heap just stops shrinking between steps. False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
