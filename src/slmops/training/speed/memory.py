"""The C library's heap: kept between steps (fewer page faults), or given back when sharding for memory."""

from __future__ import annotations

import ctypes
import sys


def _heap(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def give_back_freed_memory() -> bool:
    """For sharded training, whose point is memory: have glibc map every block of 1 MB or more on its
    own and unmap it when freed, and trim the heap past 16 MB. FSDP's gathered layers and gradient
    buffers (a few MB each, every step) otherwise stay in the heap once freed: measured on SmolLM2 over
    2 processes, 2.3-2.6 GB resident at step 2 against 1.5 GB this way, with 0.77 GB of live tensors."""
    return _heap(1 << 20, 16 << 20)


def keep_freed_memory() -> bool:
    """Have glibc keep freed activations in the heap for the next step instead of handing each block
    over 128 KB back to the OS and faulting it in again (~10,000 page faults a step on SmolLM2; a step
    measured 2% faster without them). Blocks over 32 MB are still mapped and returned; the peak is
    unchanged, the heap just stops shrinking between steps."""
    return _heap(32 << 20, 1 << 30)
