"""Host memory on CPU training: keep the pages glibc frees, up to a bound.

A CPU training step allocates and frees gigabytes of activations. By default glibc hands large blocks straight
back to the kernel (mmap'd allocations, and trimming the heap top), so the next micro-step faults the pages in
again and the kernel zeroes every one of them: up to 40% of a 124M step on a 2-core machine. Keeping freed
memory makes the step faster, but unbounded it lets a run with varying allocation sizes grow its resident set
without limit (21 GB within minutes was seen). So: large blocks come from the heap and stay there when freed,
automatic trimming is off, and after each optimizer step the process returns its free memory to the kernel
only if more than ``limit_bytes`` of it is held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MAX_MMAP_THRESHOLD = 2**31 - 1  # mallopt takes an int: larger blocks are still mmap'd, and returned when freed
DEFAULT_LIMIT_BYTES = 4 << 30


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


class HostMemory:
    """The policy above, for this process. ``after_step`` is cheap (one ``mallinfo2`` call)."""

    def __init__(self, libc: ctypes.CDLL, limit_bytes: int) -> None:
        self.libc, self.limit_bytes = libc, limit_bytes
        self.trims = 0  # how often the bound was reached (for benchmarks)
        libc.mallinfo2.restype = _MallInfo2
        libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1: never trim on free; after_step decides

    @classmethod
    def keep_freed(cls, device_type: str, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> HostMemory | None:
        """Apply the policy when training on the CPU under glibc (Linux); None elsewhere, where it does nothing."""
        if device_type != "cpu" or not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt parameters to set)
            libc.mallinfo2  # noqa: B018 - glibc >= 2.33
        except (OSError, AttributeError):
            return None
        return cls(libc, limit_bytes)

    def free_bytes(self) -> int:
        """Bytes the allocator holds free (in every arena)."""
        return int(self.libc.mallinfo2().fordblks)

    def after_step(self) -> None:
        if self.free_bytes() > self.limit_bytes:
            self.libc.malloc_trim(0)
            self.trims += 1
