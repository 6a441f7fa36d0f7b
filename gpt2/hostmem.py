"""Host memory on CPU training: keep the pages glibc frees, up to a bound, while a run trains.

A CPU training step allocates and frees gigabytes of activations. By default glibc hands large blocks straight
back to the kernel (mmap'd allocations, and trimming the heap top), so the next micro-step faults the pages in
again and the kernel zeroes every one of them: up to 40% of a 124M step on a 2-core machine. Keeping freed
memory makes the step faster, but unbounded it lets a run with varying allocation sizes grow its resident set
without limit (21 GB within minutes was seen). So, while ``keep_freed_memory`` is entered: large blocks come from
the heap and stay there when freed, automatic trimming is off, and after each optimizer step the process returns
its free memory to the kernel only if more than ``limit_bytes`` of it is resident.

On exit glibc's defaults come back (128 KiB thresholds) and the kept memory is returned. glibc cannot report the
values it had, and setting them turns off its dynamic mmap threshold, so the defaults come back as fixed values:
what a process that never called ``mallopt`` has at its start.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MAX_MMAP_THRESHOLD = 2**31 - 1  # mallopt takes an int: larger blocks are still mmap'd, and returned when freed
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both thresholds' initial values (DEFAULT_MMAP_THRESHOLD_MIN, _TRIM_)
DEFAULT_LIMIT_BYTES = 4 << 30


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


class HostMemory:
    """The policy above, applied by ``keep_freed_memory``. ``after_step`` is cheap (one ``mallinfo2`` call)."""

    def __init__(self, libc: ctypes.CDLL, limit_bytes: int) -> None:
        self.libc, self.limit_bytes = libc, limit_bytes
        self.trims = 0  # how often the bound was reached (for benchmarks)
        libc.mallinfo2.restype = _MallInfo2
        self.baseline = self.kept_bytes()  # anonymous memory that is not malloc's (Python's arenas, stacks, ...)

    def kept_bytes(self) -> int:
        """Freed memory still resident: the process's anonymous resident memory beyond what malloc has handed out.
        (The allocator's own count of free bytes cannot tell: it still counts pages ``malloc_trim`` returned.)"""
        info = self.libc.mallinfo2()
        return _resident_anonymous_bytes() - int(info.uordblks) - int(info.hblkhd)

    def after_step(self) -> None:
        if self.kept_bytes() > self.baseline + self.limit_bytes:
            self.libc.malloc_trim(0)
            self.trims += 1

    def _set(self, mmap_threshold: int, trim_threshold: int) -> bool:
        """Both thresholds; False if glibc refused either (``mallopt`` returns 0 on error)."""
        ok = self.libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        return self.libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and ok


def _resident_anonymous_bytes() -> int:
    """``RssAnon`` of this process: resident memory not backed by files (so not the memory-mapped shards)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc >= 2.33 (``mallinfo2``); None elsewhere (macOS, musl), where nothing applies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt parameters to set)
        libc.mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def keep_freed_memory(device_type: str, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> Iterator[HostMemory | None]:
    """The policy while training on the CPU under glibc (yields the ``HostMemory`` to call ``after_step`` on);
    None elsewhere, or if glibc refuses the settings, and then nothing changes."""
    libc = _glibc() if device_type == "cpu" else None
    memory = HostMemory(libc, limit_bytes) if libc is not None else None
    # -1: never trim on free; after_step decides
    if memory is not None and not memory._set(MAX_MMAP_THRESHOLD, -1):
        memory._set(GLIBC_DEFAULT_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        memory = None
    try:
        yield memory
    finally:
        if memory is not None:
            memory._set(GLIBC_DEFAULT_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
            memory.libc.malloc_trim(0)
