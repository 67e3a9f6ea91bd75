"""Prometheus metrics under vLLM's names (`vllm:*`), so that dashboards and Kubernetes'
Gateway API Inference Extension (which routes on `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` and `vllm:lora_requests_info`) work unchanged. Metrics vLLM does
not have (adapter residency and load times) are `drlora:*`, so that they can never collide
with a later vLLM metric of the same name and another meaning.

Time to first token and inter-token latency come from the engine's per-step token timings
(`EngineClient.token_timing`, observed a batch at a time); end-to-end latency and finish
reasons are observed by the server per request; gauges and token counters are read from
`engine.stats()` at scrape time, so they never drift from the engine's own accounting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from drlora_serve.types import EngineClient

disable_created_metrics()  # no *_created series (vLLM exports none either)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0)


class EngineCollector(Collector):
    """Gauges and counters read from the engine's stats at scrape time."""

    def __init__(self, engine: Callable[[], EngineClient | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        engine = self.engine()
        if engine is None:
            return
        s = engine.stats()
        name = [engine.model_name]

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric(name, value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric(name, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 means 100 percent).",
                    s.kv_cache_usage)
        yield counter("vllm:prompt_tokens", "Prefill tokens processed.", s.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Generated tokens.", s.generation_tokens_total)
        yield counter("vllm:num_preemptions", "Preemptions by the scheduler.",
                      s.num_preemptions_total)
        yield gauge("drlora:cuda_graphs_enabled", "1 while decode steps can replay CUDA graphs (0 on CPU, "
                    "with --enforce-eager, or after a capture failure).", float(s.cuda_graphs_enabled))
        steps = CounterMetricFamily("drlora:decode_steps", "Decode-only steps by how they ran: graph "
                                    "(CUDA graph replay) or eager.", labels=["model_name", "mode"])
        steps.add_metric([engine.model_name, "graph"], s.cuda_graph_replays_total)
        steps.add_metric([engine.model_name, "eager"], s.eager_decode_steps_total)
        yield steps
        yield counter("drlora:cuda_graph_capture_failures", "CUDA graph captures that failed (the error "
                      "is logged; graphs are then off).", s.cuda_graph_capture_failures_total)
        # vLLM's convention: one sample whose labels carry the adapter lists and whose value
        # is the time of the reading (the gateway takes the newest sample).
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running stats on LoRA requests.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(sorted(set(s.running_adapters))),
                         ",".join(sorted(set(s.waiting_adapters))), str(s.max_loras)], time.time())
        yield info
        # drlora's own: one sample (value 1) per loaded adapter, where it is and how big
        loaded = GaugeMetricFamily(
            "drlora:loaded_lora_adapters", "Loaded LoRA adapters (value 1 each): tier gpu = in the "
            "device pool, cpu = in host memory, disk = read again when needed; total_rank = sum of "
            "its ranks, max_rank = its largest per-projection rank.",
            labels=["model_name", "lora_name", "tier", "total_rank", "max_rank"])
        for a in engine.list_adapters():
            loaded.add_metric([engine.model_name, a.name, a.tier, str(a.total_rank), str(a.max_rank)], 1)
        yield loaded
        load = HistogramMetricFamily(
            "drlora:lora_load_seconds", "Adapter load times by stage: disk_to_cpu (read and "
            "validate), cpu_to_gpu (place into the device pool).", labels=["model_name", "stage"])
        for stage, h in sorted(s.adapter_load_seconds.items()):
            cumulative, total = [], 0
            for bound, c in zip(h.buckets, h.counts):
                total += c
                cumulative.append((repr(float(bound)), total))
            cumulative.append(("+Inf", h.count))
            load.add_metric([engine.model_name, stage], cumulative, sum_value=h.sum)
        yield load


class BatchHistogram:
    """A Prometheus histogram fed a batch of observations at a time (numpy bucket counts), for
    the per-token latencies the engine reports once per step for every request in it."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc = name, doc
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above every bound
        self.sum = 0.0

    def observe(self, values, weights=None) -> None:
        v = np.asarray(values, dtype=np.float64)
        if not v.size:
            return
        w = np.ones(v.shape, dtype=np.int64) if weights is None else np.asarray(weights, dtype=np.int64)
        self.counts += np.bincount(np.searchsorted(self.bounds, v, side="left"), weights=w,
                                   minlength=len(self.counts)).astype(np.int64)
        self.sum += float((v * w).sum())

    def family(self, model_name: str) -> HistogramMetricFamily:
        cum = np.cumsum(self.counts).tolist()
        buckets = [(repr(float(b)), c) for b, c in zip(self.bounds.tolist(), cum)] + [("+Inf", cum[-1])]
        h = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        h.add_metric([model_name], buckets, sum_value=self.sum)
        return h


class TokenLatencyCollector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        for h in (m.ttft, m.itl, m.tpot):
            yield h.family(m.model_name)


class ServerMetrics:
    def __init__(self, engine: Callable[[], EngineClient | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = ""
        self.inflight = 0
        labels = ["model_name"]
        r = self.registry
        self.ttft = BatchHistogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = BatchHistogram("vllm:inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.tpot = BatchHistogram("vllm:time_per_output_token_seconds",
                                   "Time per output token (same as inter_token_latency; older name).", ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             labels, buckets=E2E_BUCKETS, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        r.register(TokenLatencyCollector(self))
        r.register(EngineCollector(engine))

    def request_started(self, adapter: str | None) -> None:
        self.inflight += 1

    def request_done(self, adapter: str | None) -> None:
        self.inflight -= 1

    def observe_tokens(self, ttfts: list[float], itls: list[tuple[float, int]]) -> None:
        """The engine's per-step token timings: each request's time to its first token, and
        (seconds per token, tokens) for the others that got tokens (EngineClient.token_timing)."""
        self.ttft.observe(ttfts)
        if itls:
            secs, counts = zip(*itls)
            self.itl.observe(secs, counts)
            self.tpot.observe(secs, counts)

    def request_finished(self, seconds: float, reason: str) -> None:
        self.e2e.labels(self.model_name).observe(seconds)
        self.success.labels(self.model_name, reason).inc()

    def request_aborted(self) -> None:
        """A request that ended unfinished (the client went away, or it failed): counted under
        finished_reason="abort", which vLLM declares but leaves at 0 (vllm#31503); no latency."""
        self.success.labels(self.model_name, "abort").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
