"""Requests decoded together: one forward pass a step for every request in the batch, whatever its adapter.

Each row's own LoRA adapter is applied inside the one forward (`multi_lora`), so requests for different
adapters share every batch step. Continuous batching: between two steps, requests that arrived are
prefilled (their prompts in one forward) and join the batch, their KV cache (`kv_cache`) left-padded to
the running one's length; a request that ends (its stop, EOS, max_tokens, a disconnect or its deadline)
leaves at once, its rows dropped from the cache. Padding is masked and each
row keeps its own positions, so a request's greedy output is the one it gets alone.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch

from slmops.serving.jobs import Job, Worker
from slmops.serving.kv_cache import joinable, joined, left_pad, new_cache


class Scheduler(Worker):
    """The PyTorch back end: continuous batching over one model, adapters mixed per row."""

    def __init__(self, pool: Any, telemetry: Any, max_batch: int, max_queue: int):
        super().__init__(pool, telemetry, max_batch, max_queue)
        self.admitted: list[Job] = []  # every request of the batch decoding now
        # logits for the last position only: a prompt's other positions' logits are a vocabulary-wide waste
        accepts = inspect.signature(pool.model.forward).parameters
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self.can_join = joinable(new_cache(pool.model.config))

    def _serve_once(self) -> None:
        jobs = self._next(self.max_batch, wait=True)
        if jobs:
            self._decode(jobs)

    def _fail(self, message: str) -> None:
        for job in self.admitted:
            job.fail(message)

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
                open_to_arrivals = room and (batch is None or self.can_join) and not self.pool.pending
                jobs = self._next(room, wait=False) if open_to_arrivals else []

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, jobs: list[Job], cache: Any) -> tuple[Any, Any]:
        """One forward of the rows (their adapters applied per row): the cache, and each row's next token."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        self.pool.routing.route([j.adapter for j in jobs], ids.device)
        out = self.pool.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=True, **self.last_only)
        logits = out.logits[:, -1].float()
        return out.past_key_values, [_pick(logits[r], j) for r, j in enumerate(jobs)]

    def _prefill(self, jobs: list[Job]) -> Batch | None:
        """The new requests' prompts, a forward for each group of like length (padding costs as much as a
        prompt's own tokens: one forward over SST-2 chat prompts spent a quarter of its work on it), joined
        into one batch; their first tokens handed out."""
        batch = None
        for group in _like_lengths(jobs) if self.can_join else [jobs]:
            part = self._prefill_group(group)
            batch = part if batch is None else batch.join(part)
        return batch

    def _prefill_group(self, jobs: list[Job]) -> Batch | None:
        """The prompts in one forward, left-padded."""
        width, device = max(len(j.prompt) for j in jobs), self.pool.device
        pad = self.pool.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=device)
        for job in jobs:
            job.state = _generator(job.seed) if job.temperature > 0 else None
        cache, tokens = self._forward(ids, mask, jobs, new_cache(self.pool.model.config))
        return Batch(jobs, cache, mask, tokens).keep([not self._emit(j, t) for j, t in zip(jobs, tokens)])

    def _step(self, batch: Batch) -> Batch | None:
        ids = torch.tensor([[t] for t in batch.tokens], device=self.pool.device)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.jobs), 1)], dim=1)
        cache, tokens = self._forward(ids, mask, batch.jobs, batch.cache)
        stepped = Batch(batch.jobs, cache, mask, tokens)
        return stepped.keep([not self._emit(j, t) for j, t in zip(batch.jobs, tokens)])


def _like_lengths(jobs: list[Job], slack: float = 0.1) -> list[list[Job]]:
    """The jobs by prompt length, in groups whose padding stays within `slack` of their tokens."""
    groups: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: len(j.prompt)):
        group = groups[-1] if groups else []
        tokens = sum(len(j.prompt) for j in group) + len(job.prompt)
        if group and (len(group) + 1) * len(job.prompt) <= (1 + slack) * tokens:
            group.append(job)
        else:
            groups.append([job])
    return groups


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))


def _pick(logits: torch.Tensor, job: Job) -> int:
    """Greedy at temperature 0; otherwise a draw at the temperature within the top_p mass, from the
    request's own generator (a seed gives the same answer again)."""
    if job.temperature <= 0 or job.state is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / job.temperature, dim=-1)
    if job.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > job.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=job.state))


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
        mask = torch.cat([left_pad(self.mask, length, dim=1), left_pad(other.mask, length, dim=1)])
        return Batch(self.jobs + other.jobs, joined(self.cache, other.cache, length), mask, self.tokens + other.tokens)

