"""Requests decoded together: one forward pass a step for every request in the batch, whatever its adapter.

peft applies each row's own LoRA adapter inside the one forward (`adapter_names`, its mixed-batch
inference), so requests for different adapters share every batch step. Continuous batching: between
two steps, requests that arrived are prefilled (their prompts in one forward) and join the batch, their
KV cache left-padded to the running one's length; a request that ends (its stop, EOS, max_tokens, a
disconnect or its deadline) leaves at once, its rows dropped from the cache. Padding is masked and each
row keeps its own positions, so a request's greedy output is the one it gets alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from slmops.serving.pool import BASE, ModelPool
from slmops.serving.telemetry import Telemetry

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than --max_queue allows (HTTP 429)."""


@dataclass
class Job:
    """One request as the scheduler sees it. `emit` hands it ("text", piece) events and then ("end", reason)
    (or ("error", message)); by default into `events`, a server sets it to wake its event loop instead."""
    model_id: str
    adapter: str  # peft adapter name, or BASE
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
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.emit is None:
            self.emit = self.events.put


class Scheduler:
    def __init__(self, pool: ModelPool, telemetry: Telemetry, max_batch: int, max_queue: int):
        self.pool, self.telemetry = pool, telemetry
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.running = threading.Event()
        self.admitted: list[Job] = []  # every request of the batch decoding now
        self.thread = threading.Thread(target=self._loop, name="slmops-scheduler", daemon=True)
        tok = pool.tokenizer
        eos = pool.model.generation_config.eos_token_id
        self.eos = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tok.eos_token_id} - {None}

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
                first = self.waiting.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first, *self._take(self.max_batch - 1)]
            try:
                self._decode([j for j in jobs if not self._gone(j)])
            except Exception as err:  # a bug must fail these requests, not the server
                log.exception("batch failed")
                for job in {id(j): j for j in [*jobs, *self.admitted]}.values():
                    job.emit(("error", f"the batch failed: {type(err).__name__}: {err}"))

    def _take(self, room: int) -> list[Job]:
        """Up to `room` waiting requests, without waiting for more."""
        jobs: list[Job] = []
        while len(jobs) < room:
            try:
                jobs.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        self.telemetry.queue_depth.set(self.waiting.qsize())
        return jobs

    def _gone(self, job: Job) -> bool:
        if job.cancelled.is_set():
            job.emit(("end", "cancelled"))
            return True
        if time.perf_counter() > job.deadline:
            job.emit(("end", "timeout"))
            return True
        return False

    @torch.no_grad()
    def _decode(self, jobs: list[Job]) -> None:
        """Steps until every request has ended; arrivals join between steps where the cache allows it."""
        with self.pool.lock:
            batch: Batch | None = None
            self.admitted = []
            while jobs or batch is not None:
                if jobs:
                    self.admitted += jobs
                    self.telemetry.batch_size.observe(len(jobs) + (len(batch.jobs) if batch else 0))
                    joining = self._prefill(jobs)
                    if batch is not None:
                        self.telemetry.joined.inc(len(jobs))
                    batch = joining if batch is None else batch.join(joining)
                if batch is not None:
                    batch = self._step(batch)
                room = self.max_batch - (len(batch.jobs) if batch else 0)
                open_to_arrivals = room and _joinable(batch) and not self.pool.pending
                jobs = [j for j in self._take(room) if not self._gone(j)] if open_to_arrivals else []

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, jobs: list[Job], cache: Any) -> tuple[Any, Any]:
        """One forward of the rows (their adapters applied per row): the cache, and each row's next token."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        extra = {"adapter_names": [j.adapter for j in jobs]} if self.pool.adapters else {}
        out = self.pool.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=True, **extra)
        logits = out.logits[:, -1].float()
        return out.past_key_values, [_pick(logits[r], j) for r, j in enumerate(jobs)]

    def _prefill(self, jobs: list[Job]) -> Batch | None:
        """The new requests' prompts in one forward, left-padded; their first tokens handed out."""
        width, device = max(len(j.prompt) for j in jobs), self.pool.device
        pad = self.pool.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=device)
        for job in jobs:
            job.generator = _generator(job.seed) if job.temperature > 0 else None
        cache, tokens = self._forward(ids, mask, jobs, None)
        return Batch(jobs, cache, mask, tokens).keep([not self._emit(j, t) for j, t in zip(jobs, tokens)])

    def _step(self, batch: Batch) -> Batch | None:
        ids = torch.tensor([[t] for t in batch.tokens], device=self.pool.device)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.jobs), 1)], dim=1)
        cache, tokens = self._forward(ids, mask, batch.jobs, batch.cache)
        stepped = Batch(batch.jobs, cache, mask, tokens)
        return stepped.keep([not self._emit(j, t) for j, t in zip(batch.jobs, tokens)])

    def _emit(self, job: Job, token: int) -> bool:
        """Hand the request its next token; True when the request is finished (and told so)."""
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self.telemetry.first_token.labels(job.model_id).observe(now - job.submitted)
        if job.cancelled.is_set() or now > job.deadline:
            job.emit(("end", "cancelled" if job.cancelled.is_set() else "timeout"))
            return True
        if token in self.eos and not job.ignore_eos:
            job.emit(("end", "stop"))
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
            job.emit(("end", "stop"))
            return True
        if len(job.generated) >= job.max_tokens:
            job.emit(("end", "length"))
            return True
        return False


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))


def _pick(logits: torch.Tensor, job: Job) -> int:
    """Greedy at temperature 0; otherwise a draw at the temperature within the top_p mass, from the
    request's own generator (a seed gives the same answer again)."""
    if job.temperature <= 0 or job.generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / job.temperature, dim=-1)
    if job.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > job.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=job.generator))


@dataclass
class Batch:
    """The requests being decoded: their KV cache and attention mask (rows left-padded to one length), and
    the token each feeds in next."""
    jobs: list[Job]
    cache: Any
    mask: torch.Tensor
    tokens: list[int]

    def keep(self, alive: list[bool]) -> Batch | None:
        """The batch without the rows that ended (None when none is left)."""
        if all(alive):
            return self
        rows = [r for r, ok in enumerate(alive) if ok]
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        return Batch([self.jobs[r] for r in rows], self.cache, self.mask[index], [self.tokens[r] for r in rows])

    def join(self, other: Batch | None) -> Batch:
        """Both batches as one: the shorter one's cache and mask left-padded to the longer's length."""
        if other is None:
            return self
        length = max(self.mask.shape[1], other.mask.shape[1])
        cache = type(self.cache)()
        for i, (mine, theirs) in enumerate(zip(self.cache.layers, other.cache.layers)):
            cache.update(torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)]),
                         torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)]), i)
        mask = torch.cat([_left_pad(self.mask, length, dim=1), _left_pad(other.mask, length, dim=1)])
        return Batch(self.jobs + other.jobs, cache, mask, self.tokens + other.tokens)


def _left_pad(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    short = length - t.shape[dim]
    if not short:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _joinable(batch: Batch | None) -> bool:
    """Whether arrivals can join: a cache of plain per-layer keys and values (sliding-window or other
    layers keep state that padding would break; their arrivals wait for the next batch)."""
    if batch is None:
        return True
    from transformers import DynamicCache
    return type(batch.cache) is DynamicCache and all(type(layer).__name__ == "DynamicLayer"
                                                     for layer in batch.cache.layers)
