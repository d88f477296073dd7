"""The server's Prometheus metrics (GET /metrics), on a registry of its own (several servers in one process,
as in tests, do not mix their counts)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("diffstage_requests", "Requests answered, by model, endpoint and outcome "
                                "(ok, bad_request, not_found, rejected, timeout, cancelled, error)",
                                ["model", "endpoint", "outcome"], registry=r)
        self.latency = Histogram("diffstage_request_seconds", "Time from a request's arrival to its answer",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("diffstage_queue_depth", "Requests waiting for their model", ["model"], registry=r)
        self.running = Gauge("diffstage_running_images", "Images of the pipeline call in progress", ["model"],
                             registry=r)
        self.batch_size = Histogram("diffstage_batch_size", "Images per pipeline call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.stage_seconds = Histogram("diffstage_stage_seconds", "Time of each stage per pipeline call",
                                       ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("diffstage_images_generated", "Images (and videos) generated", ["model"], registry=r)
        self.loaded = Gauge("diffstage_models_loaded", "Models whose weights are loaded", registry=r)
        self.cancelled_calls = Counter("diffstage_calls_cancelled", "Pipeline calls ended between denoising steps "
                                       "because every request in them was cancelled or timed out", ["model"],
                                       registry=r)

    def observe_call(self, model: str, outcome: str, images: int, output) -> None:
        """After a pipeline call: its batch size, stage times and images made."""
        if outcome == "cancelled":
            self.cancelled_calls.labels(model).inc()
        if outcome != "ok":
            return
        self.batch_size.labels(model).observe(images)
        self.images.labels(model).inc(images)
        for label, seconds in output.timings.items():
            self.stage_seconds.labels(model, label.split(":", 1)[-1]).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
