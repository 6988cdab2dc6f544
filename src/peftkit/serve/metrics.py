"""GET /metrics in Prometheus' text format (prometheus-client): what an operator watches on a server.

- `peftkit_http_requests_total{path, status}`: every HTTP answer;
- `peftkit_sequences_total{model}`, `peftkit_prompt_tokens_total{model}`, `peftkit_generation_tokens_total{model}`:
  per served model (the base or an adapter), counted when a sequence ends;
- `peftkit_running_sequences`, `peftkit_waiting_sequences`, `peftkit_resident_adapters`: read at scrape time;
- `peftkit_time_to_first_token_seconds{model}` and `peftkit_request_latency_seconds{model}`: histograms.

Each app has its own registry, so several servers (tests) in one process do not share counters.

Example:
    >>> metrics = ServerMetrics(engine)
    >>> metrics.finished("outcome", seqs)
    >>> metrics.render()   # b"# HELP peftkit_sequences_total ..."
"""

from __future__ import annotations

import time
from typing import Any, Sequence as Seq

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .decode import Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """The counters, gauges and histograms of one server."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.http = Counter("peftkit_http_requests", "HTTP answers by path and status", ["path", "status"], registry=self.registry)
        self.sequences = Counter("peftkit_sequences", "Sequences that ended, by served model", ["model"], registry=self.registry)
        self.prompt_tokens = Counter("peftkit_prompt_tokens", "Prompt tokens of ended sequences", ["model"], registry=self.registry)
        self.generation_tokens = Counter("peftkit_generation_tokens", "Generated tokens of ended sequences", ["model"],
                                         registry=self.registry)
        self.ttft = Histogram("peftkit_time_to_first_token_seconds", "From arrival to the first generated token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("peftkit_request_latency_seconds", "From arrival to the last token", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        Gauge("peftkit_running_sequences", "Sequences in the running batch", registry=self.registry).set_function(
            lambda: len(engine.batch))
        Gauge("peftkit_waiting_sequences", "Sequences waiting to join", registry=self.registry).set_function(
            lambda: len(engine.queue))
        Gauge("peftkit_resident_adapters", "Adapters loaded", registry=self.registry).set_function(lambda: len(engine.adapters))

    def finished(self, model: str, seqs: Seq[Sequence]) -> None:
        """Count a request's sequences once they ended (done, failed or abandoned)."""
        now = time.monotonic()
        for seq in seqs:
            self.sequences.labels(model).inc()
            self.prompt_tokens.labels(model).inc(len(seq.prompt_ids))
            self.generation_tokens.labels(model).inc(len(seq.tokens))
            if seq.first_token_at is not None:
                self.ttft.labels(model).observe(seq.first_token_at - seq.created)
            if seq.finish_reason in ("stop", "length"):
                self.latency.labels(model).observe(now - seq.created)

    def render(self) -> bytes:
        return generate_latest(self.registry)
