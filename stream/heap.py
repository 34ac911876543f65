"""Hand memory the process has freed back to the operating system.

CPython gives freed objects back to the C allocator, but glibc's ``malloc`` returns pages to
the kernel only from the top of its heap. A worker catching up on a backlog allocates a lot
for each batch (decoded events, closed ticks, snapshots, outgoing messages) and frees it
again, and what stays live is scattered over the whole heap: the freed gaps between stay
counted in the process's RSS. Measured on the real worker at 1,000 models x 20 features
(``load_tests/bench_service.py memory``): 1,050 MB of heap of which ~200 MB live, RSS
1,471 MB after the data. ``malloc_trim(0)`` releases the free pages anywhere in the heap
(``madvise``), so RSS again shows what is live. It costs tens of milliseconds on a
fragmented gigabyte heap, hence a minimum interval between calls.

Other C libraries (musl, macOS) have no ``malloc_trim``: :func:`trim_heap` then does nothing.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from typing import Final

__all__ = ["HeapTrimmer", "trim_heap"]


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM: Final = _find_malloc_trim()


def trim_heap() -> bool:
    """Release free heap pages to the OS; True when some were released.

    >>> isinstance(trim_heap(), bool)
    True
    """
    return _MALLOC_TRIM is not None and bool(_MALLOC_TRIM(0))


class HeapTrimmer:
    """:func:`trim_heap` at most once per ``interval_s`` (0 turns it off).

    >>> t = HeapTrimmer(interval_s=60.0, clock=iter([0.0, 30.0, 61.0]).__next__)
    >>> t.maybe_trim() is not None, t.maybe_trim() is None, t.maybe_trim() is not None
    (True, True, True)
    >>> HeapTrimmer(interval_s=0.0).maybe_trim() is None
    True
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self.trims = 0

    def maybe_trim(self) -> bool | None:
        """Trim when the interval has passed since the last trim; None when it has not (or
        trimming is off), else whether pages were released."""
        if self.interval_s <= 0 or _MALLOC_TRIM is None:
            return None
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            return None
        self._last = now
        self.trims += 1
        return trim_heap()
