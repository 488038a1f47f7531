"""The verification server behind `fastprerl.rewards.pool.RewardPool`: worker processes with hard timeouts.

`RewardPool` starts this module as its own process (`python -m fastprerl.rewards.worker FD WORKERS MEM
[MODULE...]`) and talks to it over one socket. This process imports what the workers compute
(`fastprerl.rewards.tasks`: sympy, math-verify) once, warms it up, and then forks its worker processes
from that warm state: a fresh worker, including one that replaces a killed worker, is ready in
milliseconds. Forking is safe here because this process is single-threaded and holds nothing of the caller
(no torch, no CUDA, no threads); the caller itself never forks and never imports this module.

Requests (pickled):   ("run", fn, args_list, timeout)  ->  ("done", [(ok, value), ...], counts, last_error)
                      ("preload", modules)              ->  ("done", None, {}, None)
                      None                              ->  exit
`fn` is a "module:function" string or a picklable top-level function. For every args tuple one worker calls
fn(*args); a call that runs past `timeout` seconds has its worker killed (SIGKILL) and replaced and comes back
as (False, "timeout"); a worker that dies comes back as (False, "crash"); a call that raises, as
(False, exception type name). The rest of the batch goes on on the other workers meanwhile.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing import connection
from typing import Any

from . import tasks

# --------------------------------------------------------------------------------------------------------
# Worker processes with a hard per-call timeout.
# --------------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies, even in the middle of a runaway call."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _worker_main(conn, inherited_fds: Sequence[int], max_memory_mb: int | None) -> None:
    """Loop of one worker: receive (fn, args), send ("ok", result) or ("error", why); exit on None or EOF."""
    _die_with_parent()
    # Close what fork handed down from the server (its upstream socket, the other workers' pipes), so that
    # a dead peer reads as EOF everywhere.
    for fd in inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if max_memory_mb:
        try:
            import resource

            limit = max_memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    resolved: dict[str, Callable] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if message is None:
            return
        fn, args = message
        try:
            if isinstance(fn, str):
                if fn not in resolved:
                    module, _, name = fn.partition(":")
                    resolved[fn] = getattr(importlib.import_module(module), name)
                fn = resolved[fn]
            reply = ("ok", fn(*args))
        except Exception as exc:  # noqa: BLE001 -- a bad answer must not take the worker down
            # Only the type: str() of a runaway sympy object can itself take forever.
            reply = ("error", type(exc).__name__)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as exc:  # an unpicklable result
            conn.send(("error", f"unpicklable result ({type(exc).__name__})"))


class _Worker:
    def __init__(self, ctx, inherited_fds: list[int], max_memory_mb: int | None):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, inherited_fds + [self.conn.fileno()],
                                                              max_memory_mb), daemon=True)
        self.process.start()
        child_conn.close()  # so that recv() sees EOF when the worker dies
        self.item: int | None = None  # index of the call in flight
        self.deadline = float("inf")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class WorkerGroup:
    """`size` forked worker processes; `run` spreads calls over them with a hard per-call timeout."""

    def __init__(self, size: int, max_memory_mb: int | None = None, keep_fds: Sequence[int] = ()):
        methods = multiprocessing.get_all_start_methods()
        self._ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self._slots: list[_Worker | None] = [None] * size
        self._max_memory_mb = max_memory_mb
        self._close_in_child = list(keep_fds)  # fds of this process that a worker must not hold

    def _start(self) -> _Worker:
        siblings = [w.conn.fileno() for w in self._slots if w is not None]
        return _Worker(self._ctx, self._close_in_child + siblings, self._max_memory_mb)

    def run(self, fn: Callable | str, args_list: Sequence[tuple], timeout: float) -> tuple[list, dict[str, int]]:
        """[(ok, value)] per args tuple, and counts of timeouts, crashes and errors."""
        replies: list[tuple[bool, Any]] = [(False, "not run")] * len(args_list)
        counts = {"timeouts": 0, "crashes": 0, "errors": 0}
        todo = deque(range(len(args_list)))
        while True:
            for k, w in enumerate(self._slots):
                if w is None:
                    w = self._slots[k] = self._start()
                if w.item is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send((fn, args_list[i]))
                    except (BrokenPipeError, ConnectionResetError, EOFError):  # died while idle
                        todo.appendleft(i)
                        w.kill()
                        self._slots[k] = None
                        continue
                    w.item, w.deadline = i, time.monotonic() + timeout
            busy = [w for w in self._slots if w is not None and w.item is not None]
            if not busy:
                if todo:
                    continue  # every idle worker turned out dead; new ones start at the top of the loop
                return replies, counts
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = set(connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_s))
            now = time.monotonic()
            for w in busy:
                k = self._slots.index(w)
                if w.conn in ready or w.process.sentinel in ready:
                    try:
                        status, value = w.conn.recv()
                    except (EOFError, OSError):  # died mid-call
                        replies[w.item] = (False, "crash")
                        counts["crashes"] += 1
                        w.kill()
                        self._slots[k] = None
                        continue
                    replies[w.item] = (status == "ok", value)
                    counts["errors"] += status != "ok"
                    w.item = None
                elif now >= w.deadline:
                    replies[w.item] = (False, "timeout")
                    counts["timeouts"] += 1
                    w.kill()
                    self._slots[k] = None

    def restart(self) -> None:
        """Replace every worker (they will be forked again from this process's current state)."""
        for k, w in enumerate(self._slots):
            if w is not None:
                w.kill()
                self._slots[k] = None

    def close(self) -> None:
        for w in self._slots:
            if w is not None:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        for w in self._slots:
            if w is not None:
                w.process.join(timeout=1)
                w.kill()
        self._slots = [None] * len(self._slots)


# --------------------------------------------------------------------------------------------------------
# The server loop.
# --------------------------------------------------------------------------------------------------------


def serve(upstream: connection.Connection, workers: int, max_memory_mb: int | None, preload: Sequence[str]) -> None:
    for module in preload:
        importlib.import_module(module)
    tasks.warm_up()
    group = WorkerGroup(workers, max_memory_mb, keep_fds=[upstream.fileno()])
    upstream.send(("ready", os.getpid()))
    try:
        while True:
            try:
                raw = upstream.recv_bytes()
            except (EOFError, OSError):  # the caller went away
                return
            try:
                request = pickle.loads(raw)  # here, so that a function that cannot be imported is reported
                if request is None:
                    return
                if request[0] == "run":
                    _, fn, args_list, timeout = request
                    replies, counts = group.run(fn, args_list, timeout)
                    upstream.send(("done", replies, counts, None))
                elif request[0] == "preload":
                    for module in request[1]:
                        importlib.import_module(module)
                    group.restart()
                    upstream.send(("done", None, {}, None))
                else:
                    raise ValueError(f"unknown request {request[0]!r}")
            except Exception as exc:  # noqa: BLE001 -- report, keep serving
                upstream.send(("failed", None, {}, f"{type(exc).__name__}: {exc}"))
    finally:
        group.close()


def main(argv: Sequence[str]) -> None:
    fd, workers, max_memory_mb, *preload = argv[1:]
    serve(connection.Connection(int(fd)), int(workers), int(max_memory_mb) or None, preload)


if __name__ == "__main__":
    main(sys.argv)
