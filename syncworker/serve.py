"""`syncworker run` as a process: signals, the stall watch, the heap freeze
after start, and the exit code (0 only for a requested stop)."""

from __future__ import annotations

import asyncio
import signal

import psycopg

from syncworker.config import ConfigError
from syncworker.daemon.worker import Worker
from syncworker.exits import EX_SOFTWARE, guard_os_exit, real_exit
from syncworker.heap import freeze_startup_heap
from syncworker.stall import StallWatch


async def serve(worker: Worker) -> int:
    """Run `worker` as this process's daemon; returns the exit code. SIGTERM
    and SIGINT drain, SIGHUP reloads; a stop that finds the loop blocked, or
    an abandoned task that would hold the exit, exits 70 (stall.py, exits.py)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    loop.add_signal_handler(signal.SIGHUP, worker.reload)
    stall = StallWatch(worker.log, lambda: worker.settings.drain_timeout)
    stall.start((signal.SIGTERM, signal.SIGINT))
    freezer = asyncio.create_task(_freeze_when_started(worker), name="heap-freezer")
    try:
        with guard_os_exit(worker.log):
            await worker.run()
    except (ConfigError, psycopg.errors.InsufficientPrivilege):
        raise  # exit codes 78 and 77, from run()
    except Exception:
        # Not a requested stop: non-zero, so that a supervisor restarts it.
        worker.log.error("worker_crashed", exit_code=EX_SOFTWARE, exc_info=True)
        return EX_SOFTWARE
    finally:
        freezer.cancel()
        stall.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    stuck = worker.stuck_tasks()
    if stuck:
        # asyncio.run() would wait for these forever as it closes the loop.
        worker.log.error(
            "worker_exit_abandoned",
            exit_code=worker.exit_code,
            steps=[left.describe() for left in stuck],
        )
        real_exit(worker.exit_code or EX_SOFTWARE)
    return worker.exit_code


async def _freeze_when_started(worker: Worker) -> None:
    # Once the worker listens, its modules, steps and sessions are in place:
    # the heap from then on is what the process keeps (see syncworker.heap).
    await worker.ready.wait()
    frozen, took = freeze_startup_heap()
    worker.log.debug("heap_frozen", objects=frozen, ms=round(took, 1))
