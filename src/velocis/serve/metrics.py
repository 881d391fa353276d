"""/metrics: Prometheus text (prometheus-client). Engine numbers are read from the engine loop's
stats snapshot at scrape time (the engine itself belongs to its thread); request latencies are
observed by the API as calls finish. Each server has its own registry, so several can live in one
process (tests)."""
from __future__ import annotations

import time
from collections import deque

# CPU-scale latencies reach tens of seconds; GPU ones are milliseconds: buckets cover both.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
RATE_WINDOW = 10.0  # seconds over which the tokens/s gauges are averaged


class _EngineCollector:
    def __init__(self, engine_loop, model_name: str):
        self.engine_loop, self.model_name = engine_loop, model_name
        self._history: deque = deque()  # (time, prompt tokens, generated tokens)

    def _rates(self, s: dict) -> tuple[float, float]:
        now = time.time()
        self._history.append((now, s["prompt_tokens"], s["generated_tokens"]))
        while len(self._history) > 2 and now - self._history[1][0] > RATE_WINDOW:
            self._history.popleft()
        t0, p0, g0 = self._history[0]
        span = max(now - t0, 1e-9)
        return (s["prompt_tokens"] - p0) / span, (s["generated_tokens"] - g0) / span

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.engine_loop.stats
        label = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        prompt_rate, gen_rate = self._rates(s)
        total = max(s["kv_blocks_total"], 1)
        yield gauge("velocis_num_requests_running", "Sequences in the running batch (n>1 counts each sample).",
                    s["running"])
        yield gauge("velocis_num_requests_waiting", "Sequences waiting for a batch slot or KV blocks.", s["waiting"])
        yield gauge("velocis_kv_cache_blocks_used", "KV-cache blocks held by sequences.", s["kv_blocks_used"])
        yield gauge("velocis_kv_cache_blocks_free", "KV-cache blocks free (including evictable prefix-cache "
                                                    "blocks).", s["kv_blocks_free"])
        yield gauge("velocis_kv_cache_blocks_total", "KV-cache blocks in all.", s["kv_blocks_total"])
        yield gauge("velocis_kv_cache_usage_perc", "Fraction of KV-cache blocks in use.", s["kv_blocks_used"] / total)
        yield gauge("velocis_prefix_cache_hit_rate", "Prefix-cache block lookups that hit, since start.",
                    s["prefix_cache_hit_rate"])
        yield counter("velocis_prompt_tokens", "Prompt tokens received.", s["prompt_tokens"])
        yield counter("velocis_generation_tokens", "Tokens generated.", s["generated_tokens"])
        yield counter("velocis_requests_preempted", "Sequences preempted (recomputed later).", s["preempted"])
        yield counter("velocis_requests_aborted", "Requests aborted (clients that went away).", s["aborted"])
        yield gauge("velocis_prompt_throughput_tokens_per_second",
                    f"Prompt tokens/s over the last {RATE_WINDOW:.0f} s (between scrapes).", prompt_rate)
        yield gauge("velocis_generation_throughput_tokens_per_second",
                    f"Generated tokens/s over the last {RATE_WINDOW:.0f} s (between scrapes).", gen_rate)
        yield gauge("velocis_engine_alive", "1 while the engine thread runs.", float(self.engine_loop.alive))


class Metrics:
    def __init__(self, engine_loop, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: clutter for a scrape (vLLM turns them off too)

        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_loop, model_name))
        labels = ["model_name"]
        self.ttft = Histogram("velocis_time_to_first_token_seconds", "Time from the request to its first token.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("velocis_e2e_request_latency_seconds", "Time from the request to its last token.",
                             labels, buckets=E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("velocis_request_success", "Finished output sequences, by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self.errors = Counter("velocis_http_errors", "Requests answered with an error, by HTTP status.",
                              labels + ["status"], registry=self.registry)
        self.in_flight = Gauge("velocis_http_requests_in_flight", "API calls being answered.", labels,
                               registry=self.registry)

    def observe_call(self, ttft: float | None, e2e: float, finish_reasons: list[str]) -> None:
        if ttft is not None:
            self.ttft.labels(self.model_name).observe(ttft)
        self.e2e.labels(self.model_name).observe(e2e)
        for r in finish_reasons:
            self.finished.labels(self.model_name, r).inc()

    def error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
