"""What every decoding back end shares: the request as a job, the queue in front of the decoder, and the
rules that end a request (EOS, a stop string, max_tokens, a disconnect, its deadline) applied token by token
in one place, so the PyTorch and ONNX Runtime back ends answer alike."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from slmops.serving.telemetry import Telemetry

log = logging.getLogger(__name__)

BASE = "__base__"  # the adapter name of a request for the base model (peft's name for it in a mixed batch)


class QueueFull(Exception):
    """More requests are waiting than --max_queue allows (HTTP 429)."""


@dataclass
class Job:
    """One request as a back end sees it. `emit` hands it ("text", piece) events and then ("end", reason)
    (or ("error", message)); by default into `events`, a server sets it to wake its event loop instead."""
    model_id: str
    adapter: str  # the adapter's name, or BASE
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    deadline: float = float("inf")
    events: queue.Queue = field(default_factory=queue.Queue)
    emit: Any = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended: bool = False
    state: Any = None  # the back end's own handle on the request (a torch.Generator, an ONNX request)

    def __post_init__(self) -> None:
        if self.emit is None:
            self.emit = self.events.put

    def end(self, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self.emit(("end", reason))

    def fail(self, message: str) -> None:
        if not self.ended:
            self.ended = True
            self.emit(("error", message))


class Worker:
    """A thread that takes queued jobs and decodes them; subclasses say how (`_serve_once`, `_fail`)."""

    def __init__(self, pool: Any, telemetry: Telemetry, max_batch: int, max_queue: int):
        self.pool, self.telemetry = pool, telemetry
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.running = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="slmops-decoder", daemon=True)

    def start(self) -> None:
        self.running.set()
        self.thread.start()

    def stop(self) -> None:
        self.running.clear()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"{self.waiting.qsize()} requests are waiting (--max_queue {self.max_queue})")
        self.waiting.put(job)
        self.telemetry.queue_depth.set(self.waiting.qsize())

    def _loop(self) -> None:
        while self.running.is_set():
            try:
                self._serve_once()
            except Exception as err:  # a bug must fail these requests, not the server
                log.exception("decoding failed")
                self._fail(f"the batch failed: {type(err).__name__}: {err}")

    def _serve_once(self) -> None:
        raise NotImplementedError

    def _fail(self, message: str) -> None:
        raise NotImplementedError

    def _next(self, room: int, wait: bool) -> list[Job]:
        """Up to `room` waiting requests still wanted; with `wait`, the first waited for (a tenth of a second)."""
        jobs: list[Job] = []
        if wait and room:
            try:
                jobs.append(self.waiting.get(timeout=0.1))
            except queue.Empty:
                return []
        while len(jobs) < room:
            try:
                jobs.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        self.telemetry.queue_depth.set(self.waiting.qsize())
        return [j for j in jobs if not self._gone(j)]

    def _gone(self, job: Job) -> bool:
        """Ends a request whose client left or whose deadline passed; True when it did."""
        if job.cancelled.is_set() or time.perf_counter() > job.deadline:
            job.end("cancelled" if job.cancelled.is_set() else "timeout")
            return True
        return False

    def _emit(self, job: Job, token: int) -> bool:
        """Hand the request its next token; True when the request is finished (and told so)."""
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self.telemetry.first_token.labels(job.model_id).observe(now - job.submitted)
        if self._gone(job):
            return True
        if token in self.pool.eos and not job.ignore_eos:
            job.end("stop")
            return True
        job.generated.append(token)
        text = self.pool.tokenizer.decode(job.generated, skip_special_tokens=True)
        hit = [text.find(s, max(0, len(job.text) - len(s))) for s in job.stop]
        cut = min((h for h in hit if h >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        if len(text) > len(job.text) and (cut >= 0 or not text.endswith("\ufffd")):
            job.emit(("text", text[len(job.text):]))
            job.text = text
        if cut >= 0:
            job.end("stop")
            return True
        if len(job.generated) >= job.max_tokens:
            job.end("length")
            return True
        return False
