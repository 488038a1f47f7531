"""The verification worker pool: a client of the verification server (`fastprerl/rewards/worker.py`).

How one math answer is scored (`RewardPool.verify`):

1. The strict extraction modes of `extract` (`fastprerl.rewards.answers`) run here, in order. An answer one
   of them finds is checked by the guards: one that is too long or holds a construct known to make sympy
   run away scores 1.0 only if it is the gold string itself, else 0.0, without reaching a worker
   (`RewardPool(guards=False)` turns the construct check off, here and in the workers). Otherwise the
   answer goes to a worker.
2. When none finds one and the last mode is "math_verify" (the default), the whole response goes to a worker
   (its last MAX_RESPONSE_CHARS characters: the final answer is at the end), where math-verify finds the
   answer. With no mode left: 0.0 and `has_answer=False`, minus the format penalty.
3. In the worker: math-verify's `parse` and `verify` (`fastprerl/rewards/tasks.py`), behind the same guards,
   from the same fresh state for every call, so that the verdict does not depend on what that worker did
   before. Identical (answer, gold) pairs of a batch are verified once.
4. A call that overruns the timeout has its worker killed and replaced; its answer scores 0.0 with
   `timed_out=True` (counted in `stats["timeouts"]`; `has_answer=True`, no format penalty), a verdict that
   no verifier gave. A worker that dies is replaced likewise (`stats["crashes"]`).

This module imports neither torch nor sympy.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import connection
from typing import Any

from .answers import (
    DEFAULT_MODES,
    MATH_VERIFY,
    MAX_ANSWER_CHARS,
    RewardResult,
    check_modes,
    extract_answer,
    guard_reason,
)

__all__ = ["RewardPool", "MAX_RESPONSE_CHARS"]

MAX_RESPONSE_CHARS = 100_000  # math-verify reads a response's last 100k characters (~25k tokens)
VERIFY_MATH = "fastprerl.rewards.tasks:verify_math"


class RewardPool:
    """Verification worker processes with a hard per-item timeout.

    The workers belong to a small server process (`python -m fastprerl.rewards.worker`) that this pool
    starts on first need: a fresh interpreter that imports sympy and math-verify once and forks warm workers
    from there, so that replacing a killed worker costs milliseconds and the caller's process (torch,
    threads, CUDA) is never forked and its `__main__` never re-imported.

    `run(fn, args_list)` calls `fn(*args)` in a worker for every args tuple. A call that takes longer than
    `timeout` seconds has its worker killed and replaced and yields `default`; so does a call whose worker
    dies, and one that raises (`run_detailed` tells which). The rest of the batch goes on on the other
    workers. `verify(...)` and `score_batch(...)` score math answers (see the module doc). Use as a context
    manager or call `close()`. Safe to share between threads (calls are serialised).
    """

    def __init__(self, workers: int = 2, timeout: float = 5.0, *, guards: bool = True,
                 preload: Sequence[str] = (), max_memory_mb: int | None = 8192, start_timeout: float = 120.0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.workers = workers
        self.timeout = float(timeout)
        self.guards = guards
        self.max_memory_mb = max_memory_mb
        self.start_timeout = start_timeout
        self._preload = tuple(preload)
        self._server: subprocess.Popen | None = None
        self._conn: connection.Connection | None = None
        self._lock = threading.RLock()
        self._closed = False
        self.last_error: str | None = None
        self._stats = dict.fromkeys(
            ("items", "no_answer", "guarded", "pooled", "timeouts", "crashes", "errors"), 0)

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the pool was made: math items scored, of which without an answer, refused by the
        guards here, sent to workers (distinct pairs); and calls in workers that timed out, crashed or
        raised. A trainer should log timeouts: a run whose rewards all time out is a broken run."""
        return dict(self._stats)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and its workers."""
        with self._lock:
            self._closed = True
            self._stop_server()

    def preload(self, *modules: str) -> None:
        """Make the workers import `modules` before they take work (e.g. "reasoning_gym", which takes
        seconds to import), so that the import does not count against the first item's timeout."""
        with self._lock:
            new = tuple(m for m in modules if m not in self._preload)
            if not new:
                return
            self._preload += new
            if self._conn is not None:  # a running server imports them now; a new one is started with them
                try:
                    self._request(pickle.dumps(("preload", new)), time.monotonic() + self.start_timeout)
                except _ServerDied:
                    self._stop_server()

    def _start_server(self) -> None:
        here, there = socket.socketpair()
        # The server sees the caller's import path, runs single-threaded numeric libraries, and hashes
        # strings the same way in every run (sympy's inference order starts from a set of strings).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONHASHSEED="0",
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        command = [sys.executable, "-m", "fastprerl.rewards.worker", str(there.fileno()), str(self.workers),
                   str(self.max_memory_mb or 0), *self._preload]
        self._server = subprocess.Popen(command, pass_fds=(there.fileno(),), stdin=subprocess.DEVNULL, env=env)
        there.close()
        self._conn = connection.Connection(here.detach())
        try:
            self._receive(time.monotonic() + self.start_timeout)
        except _ServerDied as exc:
            if self._server.poll() is None:
                self._server.kill()
            code = self._server.wait()
            self._stop_server()
            raise RuntimeError(f"{exc} while starting (exit code {code}); see its error output above") from None

    def _stop_server(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        if self._server is not None:
            try:
                self._server.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server = None

    def _receive(self, deadline: float):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ServerDied("the reward verification server did not answer in time", timed_out=True)
            try:
                if self._conn.poll(min(remaining, 1.0)):
                    return self._conn.recv()
            except (EOFError, OSError) as exc:
                raise _ServerDied(f"the reward verification server died ({type(exc).__name__})") from None

    def _request(self, payload: bytes, deadline: float):
        """Send one pickled request to the server (starting it if need be) and wait for its reply."""
        if self._conn is None:
            self._start_server()
        self._conn.send_bytes(payload)
        status, replies, counts, error = self._receive(deadline)
        if status != "done":
            raise RuntimeError(f"the reward verification server could not run the request: {error}")
        return replies, counts

    # -- generic execution -------------------------------------------------------------------------------
    def run_detailed(self, fn: Callable | str, args_list: Sequence[Sequence[Any]], *,
                     timeout: float | None = None) -> list[tuple[bool, Any]]:
        """[(True, fn(*args)) or (False, why)] for every args tuple, computed in the workers; `why` is
        "timeout", "crash" (the worker died) or the type name of what the call raised. `fn` is a picklable
        top-level function or a "module:function" string (resolved in the worker, so that this process
        need not import it)."""
        args_list = [tuple(a) for a in args_list]
        if not args_list:
            return []
        timeout = self.timeout if timeout is None else float(timeout)
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool is closed")
            payload = pickle.dumps(("run", fn, args_list, timeout))  # raises here if `fn` cannot be sent
            # The server bounds every call by `timeout`; this outer bound only catches a wedged server.
            rounds = -(-len(args_list) // self.workers)
            deadline = time.monotonic() + rounds * (timeout + 1.0) + 60.0
            try:
                replies, counts = self._request(payload, deadline)
            except _ServerDied as exc:
                self.last_error = str(exc)
                self._stats["timeouts" if exc.timed_out else "crashes"] += 1
                self._stop_server()
                return [(False, "timeout" if exc.timed_out else "crash")] * len(args_list)
            except BaseException:
                # Interrupted mid-request: the server's late reply would answer the next request.
                self._stop_server()
                raise
        for key, n in counts.items():
            self._stats[key] += n
        for ok, value in replies:
            if not ok and value not in ("timeout", "crash"):
                self.last_error = value
        return replies

    def run(self, fn: Callable | str, args_list: Sequence[Sequence[Any]], *, timeout: float | None = None,
            default: Any = None) -> list:
        """[fn(*args) for args in args_list], computed in the workers; `default` where a call timed out,
        crashed its worker or raised (see `run_detailed`)."""
        return [value if ok else default for ok, value in self.run_detailed(fn, args_list, timeout=timeout)]

    # -- math answers --------------------------------------------------------------------------------------
    def verify(self, responses: Sequence[str], golds: Sequence[Any], *, timeout: float | None = None,
               extract: Sequence[str] = DEFAULT_MODES, format_penalty: float = 0.0) -> list[RewardResult]:
        """Score each response's final answer against its gold answer (bare, or a full solution with
        `\\boxed{}` / `####`); see the module doc. `format_penalty` (>= 0) is subtracted from `score` when
        no answer could be found."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        if format_penalty < 0:
            raise ValueError(f"format_penalty is subtracted and must be >= 0, got {format_penalty}")
        extract = tuple(extract)
        check_modes(extract)
        no_answer = RewardResult(0.0 - format_penalty, 0.0, False)
        results: list[RewardResult | None] = [None] * len(responses)
        tasks: dict[tuple[str, str, str], list[int]] = {}  # identical (kind, text, gold) go once
        with self._lock:
            stats = self._stats
            stats["items"] += len(responses)
            for i, (response, gold) in enumerate(zip(responses, golds)):
                response = response if isinstance(response, str) else ""
                gold = gold if isinstance(gold, str) else str(gold)
                answer = extract_answer(response, extract)
                if answer is not None:
                    if len(answer) > MAX_ANSWER_CHARS or (self.guards and guard_reason(answer)):
                        stats["guarded"] += 1
                        verdict = 1.0 if answer == gold.strip() else 0.0
                        results[i] = RewardResult(verdict, verdict, True)
                        continue
                    key = ("answer", answer, gold)
                elif extract[-1] == MATH_VERIFY:
                    key = ("response", response[-MAX_RESPONSE_CHARS:], gold)
                else:
                    stats["no_answer"] += 1
                    results[i] = no_answer
                    continue
                tasks.setdefault(key, []).append(i)
            keys = list(tasks)
            stats["pooled"] += len(keys)
            outcomes = self.run_detailed(VERIFY_MATH, [(*key, self.guards) for key in keys], timeout=timeout)
            for key, (ok, value) in zip(keys, outcomes):
                if ok:
                    verdict, has_answer = value
                    result = RewardResult(verdict, verdict, True) if has_answer else no_answer
                    stats["no_answer"] += 0 if has_answer else len(tasks[key])
                else:  # "timeout", or a crash / an error: no verifier's verdict either way
                    result = RewardResult(0.0, 0.0, True, timed_out=value == "timeout",
                                          error="" if value == "timeout" else
                                          "its worker died" if value == "crash" else f"verification raised {value}")
                for i in tasks[key]:
                    results[i] = result
        return results  # type: ignore[return-value]

    def score_batch(self, responses: Sequence[str], golds: Sequence[Any], *, timeout: float | None = None,
                    extract: Sequence[str] = DEFAULT_MODES) -> list[float]:
        """1.0 / 0.0 per (response, gold) pair; see `verify`."""
        return [r.correct for r in self.verify(responses, golds, timeout=timeout, extract=extract)]


class _ServerDied(Exception):
    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out

