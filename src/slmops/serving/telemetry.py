"""Prometheus metrics of the server, per model id where it matters; `/metrics` serves them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # one per server, so tests can run several in one process
        r = self.registry
        self.requests = Counter("slmops_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("slmops_prompt_tokens", "prompt tokens read", ["model"], registry=r)
        self.completion_tokens = Counter("slmops_completion_tokens", "tokens generated", ["model"], registry=r)
        self.queue_depth = Gauge("slmops_queue_depth", "requests waiting for a batch", registry=r)
        self.batch_size = Histogram("slmops_batch_size", "requests decoded together", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.joined = Counter("slmops_batch_joins", "requests that joined a batch already decoding", registry=r)
        self.first_token = Histogram("slmops_time_to_first_token_seconds", "queueing and prefill", ["model"],
                                     registry=r, buckets=LATENCY)
        self.per_token = Histogram("slmops_time_per_output_token_seconds", "decode time per token after the "
                                   "first", ["model"], registry=r, buckets=LATENCY)
