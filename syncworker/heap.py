"""Keep the garbage collector's full passes short in the daemon's process.

A full (generation 2) collection walks every container object the process
holds. After start-up that is some 60,000 objects (pydantic, psycopg,
structlog, asyncio and the job's own modules), and a walk took 28-36 ms on the
bench machine: a pause that, landing on a cron fire, started it 40-60 ms late.
Almost all of those objects live as long as the process, so looking at them
again finds nothing. `gc.freeze()` moves them out of the collector's sight;
later full passes walk only what was made since: 0.1-0.3 ms.

Start-up also frees a good deal (config parsing, schema building, the
migrations' SQL) that the C allocator keeps for reuse; glibc's malloc_trim
hands those pages back, some 0.5 MB of an idle worker's resident memory.

Only `syncworker run` does this: the heap of a program that embeds `Worker`
is that program's to manage.
"""

from __future__ import annotations

import ctypes
import gc
import time


def freeze_startup_heap() -> tuple[int, float]:
    """Collect what start-up left behind, then exempt the rest from later passes.

    Returns the number of objects now frozen and the milliseconds it took.
    Objects frozen here that later become unreachable are still freed by
    reference counting; only one caught in a reference cycle stays.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    _trim_c_heap()
    return gc.get_freeze_count(), (time.perf_counter() - started) * 1000


def _trim_c_heap() -> None:
    try:
        # The process's own symbols: libc is linked in, no library search.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hand back
        return
    trim(0)
