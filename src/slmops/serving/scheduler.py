"""Requests decoded together: one forward pass a step for every request in the batch, whatever its adapter.

peft applies each row's own LoRA adapter inside the one forward (`adapter_names`, its mixed-batch
inference), so requests for different adapters share every batch step. Prompts are left-padded and
each row keeps its own positions, so a request's greedy output is the one it gets alone. A request
that ends (its stop, EOS, max_tokens, a disconnect or its deadline) leaves the batch at once: its rows
are dropped from the KV cache. Requests that arrive while a batch runs wait for the next one.
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
    deadline: float = float("inf")
    events: queue.Queue = field(default_factory=queue.Queue)
    emit: Any = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        if self.emit is None:
            self.emit = self.events.put


class Scheduler:
    def __init__(self, pool: ModelPool, telemetry: Telemetry, max_batch: int, max_queue: int):
        self.pool, self.telemetry = pool, telemetry
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.running = threading.Event()
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
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            self.telemetry.queue_depth.set(self.waiting.qsize())
            jobs = [j for j in jobs if not self._gone(j)]
            if jobs:
                try:
                    self._decode(jobs)
                except Exception as err:  # a bug must fail these requests, not the server
                    log.exception("batch failed")
                    for job in jobs:
                        job.emit(("error", f"the batch failed: {type(err).__name__}: {err}"))

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
        self.telemetry.batch_size.observe(len(jobs))
        with self.pool.lock:
            model, device = self.pool.model, self.pool.device
            width = max(len(j.prompt) for j in jobs)
            pad = self.pool.tokenizer.pad_token_id or 0
            ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs], device=device)
            mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=device)
            generators = [_generator(j.seed) if j.temperature > 0 else None for j in jobs]
            cache, live = None, list(range(len(jobs)))
            while live:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                extra = {"adapter_names": [jobs[i].adapter for i in live]} if self.pool.adapters else {}
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions[:, -ids.shape[1]:],
                            past_key_values=cache, use_cache=True, **extra)
                cache, logits = out.past_key_values, out.logits[:, -1].float()
                tokens = [_pick(logits[r], jobs[i], generators[i]) for r, i in enumerate(live)]
                keep = [r for r, i in enumerate(live) if not self._emit(jobs[i], tokens[r])]
                if len(keep) < len(live):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, tokens = mask[index], [tokens[r] for r in keep]
                    live = [live[r] for r in keep]
                if not live:
                    break
                ids = torch.tensor([[t] for t in tokens], device=device)
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)

    def _emit(self, job: Job, token: int) -> bool:
        """Hand the request its next token; True when the request is finished (and told so)."""
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self.telemetry.first_token.labels(job.model_id).observe(now - job.submitted)
        if job.cancelled.is_set() or now > job.deadline:
            job.emit(("end", "cancelled" if job.cancelled.is_set() else "timeout"))
            return True
        if token in self.eos:
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


def _pick(logits: torch.Tensor, job: Job, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise a draw at the temperature within the top_p mass, from the
    request's own generator (a seed gives the same answer again)."""
    if job.temperature <= 0 or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / job.temperature, dim=-1)
    if job.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > job.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
