"""The server's Prometheus metrics (prometheus_client, in a registry of their own so that two servers in one process,
as in the tests, never share counts)."""

from __future__ import annotations

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """Requests by route and status, tokens, time to first token, latency, queue depth and generations running."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("xpack_requests", "HTTP requests by route and status", ("route", "status"), registry=self.registry)
        self.tokens = Counter("xpack_tokens", "Tokens by kind (prompt, completion)", ("kind",), registry=self.registry)
        self.ttft = Histogram("xpack_time_to_first_token_seconds", "From the request's arrival to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("xpack_request_seconds", "From a generation request's arrival to its last byte", buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.queue_depth = Gauge("xpack_queue_depth", "Requests waiting for a generation slot", registry=self.registry)
        self.running = Gauge("xpack_generations_running", "Generations running now", registry=self.registry)
        self.finished = Counter("xpack_generations", "Generations by finish reason (stop, length, cancelled)", ("finish_reason",),
                                registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
