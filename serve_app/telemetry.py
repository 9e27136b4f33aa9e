"""Prometheus metrics of the routing path, through Ray Serve's metrics API.

The ingress records, in every replica (`ray.serve.metrics`, exported by Ray's metrics agent;
`tryage serve --metrics-port N` serves them on 127.0.0.1:N/metrics, `ray start
--metrics-export-port N` on a cluster):

    tryage_requests_total{endpoint, expert}        answered requests, by the expert that answered
    tryage_fallbacks_total{expert, reason}         an expert skipped for the next: busy, timeout,
                                                   error, failed
    tryage_rejections_total{endpoint, reason}      refused requests, by the error's code (the
                                                   API-key and body-size guard's 401 and 413
                                                   answer before the app and are not counted)
    tryage_predicted_loss{expert}                  the router's predicted loss of the answering
                                                   expert (the profile's units)
    tryage_stage_seconds{endpoint, stage}          time in the router, the objective, the expert
    tryage_tokens_total{expert, direction}         prompt (in) and generated (out) tokens

Serve's own metrics (ray_serve_*: requests, latency, replicas, queues) come beside them; the
Grafana dashboard in deploy/ shows both.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

#: Seconds: from a millisecond (the objective) to a minute (a cold expert).
STAGE_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
#: Predicted losses in bits per byte (Ray wants positive boundaries: the negated scores of an
#: imported profile all land in the first bucket; their sum and count still give the mean).
LOSS_BOUNDARIES = [0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8]


class Telemetry:
    """The ingress's counters and histograms (created inside a Ray worker)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "tryage_requests_total",
            description="Requests answered, by endpoint and the expert that answered.",
            tag_keys=("endpoint", "expert"),
        )
        self._fallbacks = metrics.Counter(
            "tryage_fallbacks_total",
            description="Experts skipped for the next one, by reason.",
            tag_keys=("expert", "reason"),
        )
        self._rejections = metrics.Counter(
            "tryage_rejections_total",
            description="Requests refused, by endpoint and reason (the error's code).",
            tag_keys=("endpoint", "reason"),
        )
        self._predicted = metrics.Histogram(
            "tryage_predicted_loss",
            description="The router's predicted loss of the expert that answered.",
            boundaries=LOSS_BOUNDARIES,
            tag_keys=("expert",),
        )
        self._seconds = metrics.Histogram(
            "tryage_stage_seconds",
            description="Seconds spent in the router, the objective and the expert.",
            boundaries=STAGE_BOUNDARIES,
            tag_keys=("endpoint", "stage"),
        )
        self._tokens = metrics.Counter(
            "tryage_tokens_total",
            description="Tokens in (prompt) and out (generated), by expert.",
            tag_keys=("expert", "direction"),
        )

    def answered(self, endpoint: str, expert: str, predicted_loss: float) -> None:
        self._requests.inc(tags={"endpoint": endpoint, "expert": expert})
        self._predicted.observe(predicted_loss, tags={"expert": expert})

    def fallback(self, expert: str, reason: str) -> None:
        self._fallbacks.inc(tags={"expert": expert, "reason": reason})

    def rejected(self, endpoint: str, reason: str) -> None:
        self._rejections.inc(tags={"endpoint": endpoint, "reason": reason})

    def tokens(self, expert: str, prompt: int, completion: int) -> None:
        if prompt:
            self._tokens.inc(prompt, tags={"expert": expert, "direction": "in"})
        if completion:
            self._tokens.inc(completion, tags={"expert": expert, "direction": "out"})

    def observe(self, endpoint: str, stage: str, seconds: float) -> None:
        """One request's time in one stage."""
        self._seconds.observe(seconds, tags={"endpoint": endpoint, "stage": stage})

    @contextlib.contextmanager
    def stage(self, endpoint: str, stage: str) -> Iterator[None]:
        """Time a block as one stage of a request."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(endpoint, stage, time.perf_counter() - start)
