"""Worker processes that verify answers under a hard per-item deadline.

Each worker runs math-verify in its own main thread, so math-verify's ``signal.alarm`` timeouts work
there; the parent also enforces a wall-clock deadline per item and kills and replaces a worker that
misses it (sympy can hang inside C code where no signal reaches). A worker is a fresh interpreter
(``python -c 'from rlvr.rewards.pool import _worker_main; ...'``) talking over its stdin/stdout pipes:
it inherits no locks or threads
from the trainer, re-runs none of the caller's script, and can be started from any thread.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait

from rlvr.rewards.equivalence import ERROR, TIMEOUT, VerifySettings, verify_span

Item = tuple  # (index, kind, text, fallbacks, gold): one answer span to score


def _worker_main(budget_seconds: float, settings_json: str = "{}") -> None:
    """Worker loop: jobs arrive pickled on stdin, one result per item leaves on stdout."""
    settings = VerifySettings(**json.loads(settings_json))
    inbox = Connection(os.dup(0), writable=False)
    outbox = Connection(os.dup(1), readable=False)
    sys.stdout = sys.stderr  # nothing else may write to the result pipe
    import math_verify  # noqa: F401 -- pay the import before the first deadline starts

    outbox.send("ready")
    while True:
        try:
            job = inbox.recv()
        except EOFError:
            return
        if job is None:
            return
        for index, kind, text, fallbacks, gold in job:
            score, outcome = verify_span(kind, text, fallbacks, gold, settings, budget_seconds, use_signals=True)
            outbox.send((index, score, outcome))


class _Worker:
    STARTUP_SECONDS = 60.0  # importing sympy on a loaded machine

    def __init__(self, budget_seconds: float, settings: VerifySettings):
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        arguments = f"{float(budget_seconds)!r}, {json.dumps(settings.as_dict())!r}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from rlvr.rewards.pool import _worker_main; _worker_main({arguments})"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environment,
        )
        self.outbox = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.connection = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        self.ready = False
        self.pending: list[Item] = []
        self.started = time.monotonic()  # when the current item (or the start-up) began

    def submit(self, items: list[Item]) -> None:
        self.pending = list(items)
        if items:
            self.outbox.send(items)

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)
        for connection in (self.outbox, self.connection):
            connection.close()


class WorkerPool:
    """``num_workers`` verification processes; :meth:`verify` scores a batch within per-item deadlines."""

    def __init__(
        self,
        num_workers: int = 1,
        budget_seconds: float = 2.0,
        grace_seconds: float = 1.0,
        settings: VerifySettings | None = None,
    ):
        self.num_workers, self.budget_seconds, self.grace_seconds = num_workers, budget_seconds, grace_seconds
        self.settings = settings or VerifySettings()
        self._workers: list[_Worker] = []
        self._owner = os.getpid()

    def _ensure_workers(self) -> None:
        if self._owner != os.getpid():  # forked copy of a pool: its workers belong to the parent
            self._workers, self._owner = [], os.getpid()
        self._workers = [w for w in self._workers if w.is_alive()]
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.budget_seconds, self.settings))
        for worker in self._workers:
            self._wait_ready(worker)

    def _wait_ready(self, worker: _Worker) -> None:
        if worker.ready:
            return
        if not worker.connection.poll(_Worker.STARTUP_SECONDS) or worker.connection.recv() != "ready":
            worker.kill()
            raise RuntimeError("a math-verify worker process did not start")
        worker.ready = True

    def verify(self, jobs: list[tuple]) -> list[tuple[float, str]]:
        """Score ``(kind, text, fallbacks, gold)`` jobs: one (score, outcome) each, in order."""
        results: list[tuple[float, str] | None] = [None] * len(jobs)
        if not jobs:
            return []
        self._ensure_workers()
        items = [(index, *job) for index, job in enumerate(jobs)]
        # Contiguous chunks, one per worker.
        size = math.ceil(len(items) / len(self._workers))
        for position, worker in enumerate(self._workers):
            worker.submit(items[position * size : (position + 1) * size])
            worker.started = time.monotonic()
        deadline_per_item = self.budget_seconds + self.grace_seconds
        while any(worker.pending for worker in self._workers):
            busy = [worker for worker in self._workers if worker.pending]
            now = time.monotonic()
            wait_for = max(0.0, min(worker.started + deadline_per_item - now for worker in busy))
            ready = wait([worker.connection for worker in busy], timeout=wait_for)
            for worker in busy:
                if worker.connection in ready:
                    try:
                        index, score, outcome = worker.connection.recv()
                    except (EOFError, OSError):  # the worker died: its current item counts as an error
                        self._replace(worker, results, ERROR)
                        continue
                    results[index] = (score, outcome)
                    worker.pending.pop(0)
                    worker.started = time.monotonic()
                elif time.monotonic() - worker.started > deadline_per_item:
                    self._replace(worker, results, TIMEOUT)
        return [result if result is not None else (0.0, ERROR) for result in results]

    def _replace(self, worker: _Worker, results: list, outcome: str) -> None:
        """Kill a stuck or dead worker, score its current item ``outcome``, restart its remaining items."""
        stuck, remaining = worker.pending[0], worker.pending[1:]
        results[stuck[0]] = (0.0, outcome)
        worker.kill()
        replacement = _Worker(self.budget_seconds, self.settings)
        self._workers[self._workers.index(worker)] = replacement
        self._wait_ready(replacement)
        replacement.submit(remaining)
        replacement.started = time.monotonic()

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.outbox.send(None)
                worker.process.wait(timeout=1)
            except (OSError, subprocess.TimeoutExpired):
                pass
            if worker.is_alive():
                worker.kill()
        self._workers = []

    def __del__(self):
        try:
            if self._owner == os.getpid():
                self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass
