"""The engine thread: the one owner of the model. HTTP handlers hand it jobs and aborts, it hands back events.

    worker = EngineWorker(engine, metrics, max_queue=64)
    worker.start()
    worker.submit(job)          # from the event loop; raises QueueFull or Draining
    tag, index, event = await job.queue.get()   # (the job's tag, its choice, a StepEvent or an error)
    worker.abort(job)           # a client gone: its rows are free before the next step

Commands queue up under one lock and are applied at the top of each loop turn, before the step,
so an abort frees its rows before the next forward. Events go back to each job's asyncio queue
through `loop.call_soon_threadsafe` (the engine thread never touches the loop otherwise). With
nothing to do the thread sleeps on a condition, never spinning (two cores matter).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gemma2.engine import Engine, StepEvent
from gemma2.sampling import SamplingParams
from gemma2.server.metrics import ServerMetrics

log = logging.getLogger("gemma2.server")


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass
class Job:
    """One prompt's choices (OpenAI's n) as engine requests; events land in `queue` as (index, event)."""

    job_id: str
    prompt: list[int]
    params: Sequence[SamplingParams]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tag: Any = None  # the caller's label for this job, put beside each event
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)
    open_choices: set[int] = field(default_factory=set)

    def request_ids(self) -> list[Hashable]:
        return [(self.job_id, i) for i in range(len(self.params))]


class EngineWorker:
    def __init__(self, engine: Engine, metrics: ServerMetrics, max_queue: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.jobs: dict[str, Job] = {}
        self._commands: list[tuple[str, Job, Any]] = []
        self._pending_adds = 0
        self._waiting = 0  # jobs in the engine without rows, as of the last step
        self._free_rows = engine.max_batch
        self._wake = threading.Condition()
        self._stopping = False
        self.draining = False
        self.thread = threading.Thread(target=self._run, name="gemma2-engine", daemon=True)

    # ---- called from the event loop --------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self.draining:
                raise Draining
            if self._pending_adds + self._waiting - self._free_rows >= self.max_queue:
                raise QueueFull
            self._pending_adds += 1
            self._commands.append(("add", job, None))
            self._wake.notify()

    def abort(self, job: Job, indices: Sequence[int] | None = None, reason: str = "abort") -> None:
        """End a job's choices (all by default). reason "stop" marks a stop string, not a lost client."""
        with self._wake:
            self._commands.append(("abort", job, (indices, reason)))
            self._wake.notify()

    def busy(self) -> bool:
        """Whether any job is queued, running or about to be."""
        with self._wake:
            return bool(self.jobs or self._commands)

    def drain(self, timeout: float) -> None:
        """Refuse new jobs, give those in flight `timeout` seconds, then abort the rest."""
        with self._wake:
            self.draining = True
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._wake:
            for job in list(self.jobs.values()):
                self._commands.append(("abort", job, (None, "abort")))
            self._wake.notify()
        while self.busy() and time.monotonic() < deadline + 5:
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self.engine.has_unfinished() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            for kind, job, argument in commands:
                self._add(job) if kind == "add" else self._abort(job, *argument)
            try:
                events = self.engine.step()
            except Exception as error:  # a bug: fail what runs, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {type(error).__name__}: {error}")
                events = []
            for event in events:
                self._dispatch(event)
            self._account()

    def _add(self, job: Job) -> None:
        with self._wake:
            self._pending_adds -= 1
        try:
            self.engine.add_group(job.prompt, list(job.params), job.request_ids())
        except Exception as error:  # checked before queueing; a refusal here is still the client's answer
            job.loop.call_soon_threadsafe(job.queue.put_nowait, (job.tag, -1, error))
            return
        job.open_choices = set(range(len(job.params)))
        self.jobs[job.job_id] = job

    def _abort(self, job: Job, indices: Sequence[int] | None, reason: str) -> None:
        if job.job_id not in self.jobs:
            return
        for index in range(len(job.params)) if indices is None else indices:
            if index in job.open_choices and self.engine.abort((job.job_id, index)):
                event = StepEvent((job.job_id, index), None, finished=True, finish_reason="abort")
                job.loop.call_soon_threadsafe(job.queue.put_nowait, (job.tag, index, event))
                self._close(job, index, "stop" if reason == "stop" else None)
                if reason != "stop":
                    self.metrics.aborted.inc()

    def _dispatch(self, event: StepEvent) -> None:
        job_id: str
        index: int
        job_id, index = event.request_id  # type: ignore[misc]
        job = self.jobs.get(job_id)
        if job is None or index not in job.open_choices:
            return  # an abort the job asked for: it already knows
        now = time.perf_counter()
        if event.token_id is not None:
            self.metrics.generation_tokens.inc()
            if job.first_token is None:
                job.first_token = now
                self.metrics.time_to_first_token.observe(now - job.arrival)
            if index in job.last_token:
                self.metrics.inter_token_latency.observe(now - job.last_token[index])
            job.last_token[index] = now
        job.loop.call_soon_threadsafe(job.queue.put_nowait, (job.tag, index, event))
        if event.finished:
            self._close(job, index, event.finish_reason)

    def _close(self, job: Job, index: int, reason: str | None) -> None:
        job.open_choices.discard(index)
        if reason is not None:
            self.metrics.finished(reason)
        if not job.open_choices:
            del self.jobs[job.job_id]
            self.metrics.e2e_latency.observe(time.perf_counter() - job.arrival)

    def _account(self) -> None:
        """Admissions since the last step, and the gauges."""
        waiting = 0
        for job in self.jobs.values():
            if job.admitted is None:
                if any(self.engine.row_of(rid) is not None for rid in job.request_ids()):
                    job.admitted = time.perf_counter()
                    self.metrics.queue_time.observe(job.admitted - job.arrival)
                    self.metrics.prompt_tokens.inc(len(job.prompt))
                else:
                    waiting += 1
        self.metrics.running.set(len(self.jobs) - waiting)
        self.metrics.waiting.set(waiting)
        self.metrics.rows_in_use.set(self.engine.rows_in_use)
        with self._wake:
            self._waiting = waiting
            self._free_rows = self.engine.max_batch - self.engine.rows_in_use

    def _fail_all(self, message: str) -> None:
        for job in list(self.jobs.values()):
            for index in list(job.open_choices):
                self.engine.abort((job.job_id, index))
                job.loop.call_soon_threadsafe(job.queue.put_nowait, (job.tag, index, RuntimeError(message)))
                self._close(job, index, "error")
        try:
            self.engine.step()  # report the aborts, so the engine holds nothing
        except Exception:  # the thread must live on: the next request's step tries again
            log.exception("engine step after a failure failed")
