"""Prometheus metrics of the learner (one registry per ``LearnerMetrics``, served on ``metrics_port``).

The metrics port also answers ``GET /healthz``, the learner's **liveness** signal: 200 while the main
loop's heartbeat (``beat()``, called at every step boundary and every ingest poll) is younger than
``liveness_max_age_s``, else 503. ``/metrics`` alone would stay up while the main loop hangs (it is
served by its own thread), so probes must use ``/healthz``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

STEP_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class LearnerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_ingested = Counter(
            "learner_events_ingested_total", "Events written to the dataset.", ["stream"], registry=r
        )
        self.events_duplicate = Counter(
            "learner_events_duplicate_total",
            "Re-delivered events dropped by event_id.",
            ["stream"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "learner_events_dead_lettered_total",
            "Malformed entries sent to the dead-letter stream.",
            ["stream"],
            registry=r,
        )
        self.entries_reclaimed = Counter(
            "learner_entries_reclaimed_total",
            "Pending entries of another consumer reclaimed (XAUTOCLAIM).",
            ["stream"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "learner_consumer_lag",
            "Entries in the stream not yet delivered to the group (XINFO GROUPS lag).",
            ["stream"],
            registry=r,
        )
        self.consumer_pending = Gauge(
            "learner_consumer_pending",
            "Entries delivered to the group but not acknowledged.",
            ["stream"],
            registry=r,
        )
        self.stream_trimmed = Counter(
            "learner_stream_trimmed_total",
            "Entries trimmed (XTRIM MINID) once every group acknowledged them.",
            ["stream"],
            registry=r,
        )
        self.stream_length = Gauge(
            "learner_stream_length", "Entries in the stream after the last trim.", ["stream"], registry=r
        )
        self.dataset_rows = Gauge(
            "learner_dataset_rows", "Rows in the learner's dataset.", ["table"], registry=r
        )
        self.rm_heldout_accuracy = Gauge(
            "learner_rm_heldout_accuracy",
            "Reward model pairwise accuracy on held-out comparisons.",
            registry=r,
        )
        self.rm_updates = Counter("learner_rm_updates_total", "Reward model updates.", registry=r)
        self.rm_updates_refused = Counter(
            "learner_rm_updates_refused_total",
            "Reward model updates not used: their held-out loss was worse than the previous RM's.",
            registry=r,
        )
        self.rm_ready = Gauge(
            "learner_rm_ready",
            "1 when the RM's held-out accuracy is confidently above chance (PPO may start), else 0.",
            registry=r,
        )
        self.reward_normalisation = Gauge(
            "learner_reward_normalisation",
            "The RM's normalisation (score = gain * head + bias; the reference's samples score mean 0, "
            "std 1), by `term` (gain, bias).",
            ["term"],
            registry=r,
        )
        self.value_clip_fraction = Gauge(
            "learner_value_clip_fraction",
            "Share of response tokens whose value loss was clipped in the last PPO-ptx round.",
            registry=r,
        )
        self.reward = Gauge(
            "learner_reward_mean", "Mean RM score on held-out prompts.", ["policy"], registry=r
        )
        self.kl = Gauge(
            "learner_kl",
            "KL to the reference policy on held-out prompts (nats per response).",
            ["policy"],
            registry=r,
        )
        self.ptx_loss = Gauge(
            "learner_ptx_loss", "Pretraining (ptx) loss of the last PPO-ptx round.", registry=r
        )
        self.ptx_heldout_nll = Gauge(
            "learner_ptx_heldout_nll",
            "Per-token NLL on held-out pretraining text (never trained on) after the last "
            "PPO-ptx round, of the working policy and of the reference: the alignment tax.",
            ["policy"],
            registry=r,
        )
        self.alignment_tax_nll = Gauge(
            "learner_alignment_tax_nll",
            "Per-token NLL on text from another source than the ptx corpus (Python's stdlib docstrings) "
            "after the last PPO-ptx round, of the working policy and of the reference: the alignment tax.",
            ["policy"],
            registry=r,
        )
        self.ppo_rounds = Counter("learner_ppo_rounds_total", "PPO-ptx rounds.", registry=r)
        self.step_seconds = Histogram(
            "learner_step_duration_seconds",
            "Duration of a learner step.",
            ["step"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.promotions = Counter("learner_promotions_total", "Candidates promoted to current.", registry=r)
        self.rejections = Counter("learner_rejections_total", "Candidates rejected by the gate.", registry=r)
        self.heartbeat = Gauge(
            "learner_heartbeat_timestamp_seconds",
            "Unix time the main loop last made progress (see /healthz).",
            registry=r,
        )
        self.liveness_max_age_s = 900.0
        self._last_beat = time.monotonic()
        self.heartbeat.set(time.time())
        self.server: ThreadingHTTPServer | None = None
        self.held_back = Counter(
            "learner_held_back_total",
            "Candidates that passed the gate but were held back: the current version is pinned.",
            registry=r,
        )
        self.waiting = Gauge(
            "learner_waiting",
            "Items a step still needs before it runs (0: not waiting); the `knob` label is the "
            "setting that changes the need (learner status and the log say more).",
            ["step", "knob"],
            registry=r,
        )

    def observe_ppo(self, stats: dict[str, float]) -> None:
        """The gauges a PPO-ptx round sets: ptx loss, value clip
        fraction, and the held-out NLL (the alignment tax)."""
        if "ptx_loss" in stats:
            self.ptx_loss.set(stats["ptx_loss"])
        if "value_clip_fraction" in stats:
            self.value_clip_fraction.set(stats["value_clip_fraction"])
        if "tax_nll" in stats:
            self.alignment_tax_nll.labels("policy").set(stats["tax_nll"])
            self.alignment_tax_nll.labels("reference").set(stats["tax_nll_reference"])
        if "ptx_heldout_nll" in stats:
            self.ptx_heldout_nll.labels("policy").set(stats["ptx_heldout_nll"])
            self.ptx_heldout_nll.labels("reference").set(stats["ptx_heldout_nll_reference"])

    def beat(self) -> None:
        """The main loop is alive (call at every step boundary and every poll)."""
        self._last_beat = time.monotonic()
        self.heartbeat.set(time.time())

    def heartbeat_age_s(self) -> float:
        return time.monotonic() - self._last_beat

    def alive(self) -> bool:
        return self.heartbeat_age_s() <= self.liveness_max_age_s

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Expose ``/metrics`` and ``/healthz`` on ``port`` (a daemon thread). Returns the bound port."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
                elif path == "/healthz":
                    age, alive = metrics.heartbeat_age_s(), metrics.alive()
                    body = {
                        "status": "ok" if alive else "stale",
                        "heartbeat_age_s": round(age, 3),
                        "max_age_s": metrics.liveness_max_age_s,
                    }
                    self._send(200 if alive else 503, "application/json", json.dumps(body).encode())
                else:
                    self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # probes every few seconds: no access log
                pass

        self.server = ThreadingHTTPServer((addr, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="learner-metrics", daemon=True).start()
        return self.server.server_address[1]
