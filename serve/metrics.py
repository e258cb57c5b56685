"""Prometheus metrics, named like TGI's (``tgi_*``) where TGI has one, ``instructloop_serve_*`` otherwise.

Each app gets its own ``CollectorRegistry`` so several servers can live in one process (tests).
prometheus-client adds ``_total`` to counter names on the wire (``tgi_request_count_total``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_count = Counter("tgi_request_count", "Generation requests received", registry=r)
        self.request_success = Counter(
            "tgi_request_success", "Generation requests that completed", registry=r
        )
        self.request_failure = Counter(
            "tgi_request_failure", "Failed generation requests by error type", ["err"], registry=r
        )
        self.request_cancelled = Counter(
            "instructloop_serve_request_cancelled",
            "Requests whose client went away before the end (left the batch)",
            registry=r,
        )
        self.request_duration = Histogram(
            "tgi_request_duration", "End-to-end request duration (s)", buckets=_DURATION_BUCKETS, registry=r
        )
        self.request_queue_duration = Histogram(
            "tgi_request_queue_duration",
            "Time waiting before prefill (s)",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.request_inference_duration = Histogram(
            "tgi_request_inference_duration",
            "Time from prefill to the last token (s)",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.request_mean_time_per_token = Histogram(
            "tgi_request_mean_time_per_token_duration",
            "Mean time per generated token (s)",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.request_input_length = Histogram(
            "tgi_request_input_length", "Prompt tokens per request", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.request_generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens per request", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_current_size = Gauge(
            "tgi_batch_current_size", "Sequences in the running batches", registry=r
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting to join the batch", registry=r)
        self.batch_forward_duration = Histogram(
            "tgi_batch_forward_duration",
            "One model step (s)",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tgi_batch_next_size", "Sequences per decode step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.policy_version = Gauge(
            "instructloop_serve_policy_version",
            "1 for the policy version new requests are admitted to",
            ["version"],
            registry=r,
        )
        self.policy_swaps = Counter(
            "instructloop_serve_policy_swaps", "Successful policy hot-swaps", registry=r
        )
        self.policy_swap_failures = Counter(
            "instructloop_serve_policy_swap_failures",
            "Policy versions that failed to load or validate (never served)",
            registry=r,
        )
        self.policy_watcher_errors = Counter(
            "instructloop_serve_policy_watcher_errors",
            "Unexpected errors in the policy watcher's checks (it logs and goes on)",
            registry=r,
        )
        self.policy_prefetches = Counter(
            "instructloop_serve_policy_prefetches",
            "Candidate versions loaded and validated ahead of promotion",
            registry=r,
        )
        self.policy_swap_duration = Histogram(
            "instructloop_serve_policy_swap_duration",
            "Load + validation time of a new policy version (s)",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )

    def set_version(self, version: str) -> None:
        self.policy_version.clear()
        self.policy_version.labels(version=version).set(1)
