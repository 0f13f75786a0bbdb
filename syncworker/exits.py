"""While the daemon runs, an `os._exit()` from a step ends it non-zero.

A step that calls `os._exit(0)` would take the worker down with exit code 0,
which `Restart=on-failure` and PM2's restart rules read as a requested stop:
the worker would stay down and its run `running` until another worker judged
it gone. The guard logs `worker_exit_unrequested` and turns code 0 into 70,
so a supervisor restarts it; the next worker start recovers the run. It does
not try to requeue: the caller wanted the process gone at once, and the
database may be what it gave up on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

from structlog.typing import FilteringBoundLogger

from syncworker import runtime

EX_SOFTWARE = 70

_real_exit = os._exit


def real_exit(code: int) -> NoReturn:
    """End the process now with `code`, past the guard."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    _real_exit(code)


@contextlib.contextmanager
def guard_os_exit(log: FilteringBoundLogger) -> Iterator[None]:
    def guarded(status: int) -> NoReturn:
        given = int(status)
        work = runtime.current()  # set when a run's own task calls it
        where = {} if work is None else {"run_id": work.run_id, "job": work.job}
        with contextlib.suppress(Exception):
            log.error(
                "worker_exit_unrequested",
                **where,
                code=given,
                exit_code=given or EX_SOFTWARE,
                thread=threading.current_thread().name,
                reason="os._exit() called while the worker runs",
            )
        real_exit(given or EX_SOFTWARE)

    os._exit = guarded
    try:
        yield
    finally:
        os._exit = _real_exit
