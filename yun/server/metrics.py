"""Prometheus metrics, in a registry of their own per app (several apps can share a process).

Counters and histograms are fed by the server as requests finish; the engine's gauges
(running and waiting requests, KV-cache usage, prefix-cache hit rate) are read from
`EngineClient.stats` at scrape time; per-replica series from `replica_states()` (none
for a single engine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from yun.engine.client import EngineClient, EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                      0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, engine: "EngineClient", model_name: str):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("yun_requests", "HTTP API requests by route and status code.",
                                ["route", "status"], registry=r)
        self.finished = Counter("yun_request_finished",
                                "Finished generations (one per prompt) by finish reason.",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("yun_prompt_tokens", "Prompt tokens processed.",
                                     registry=r)
        self.generation_tokens = Counter("yun_generation_tokens", "Tokens generated.",
                                         registry=r)
        self.ttft = Histogram("yun_time_to_first_token_seconds",
                              "Time from receiving a request to its first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("yun_time_per_output_token_seconds",
                              "Mean time between output tokens, per request.",
                              buckets=TOKEN_TIME_BUCKETS, registry=r)
        self.e2e = Histogram("yun_e2e_request_latency_seconds",
                             "Time from receiving a request to its last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        stats = engine.stats
        gauges = {
            "yun_num_requests_running": ("Sequences running in the engine.",
                                         lambda: stats.num_running),
            "yun_num_requests_waiting": ("Sequences waiting for a slot.",
                                         lambda: stats.num_waiting),
            "yun_kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use (0 to 1).",
                                         lambda: stats.kv_usage),
            "yun_prefix_cache_hit_rate": (
                "Prompt tokens found in the prefix cache / prompt tokens looked up.",
                lambda: (stats.prefix_cache_hits / stats.prefix_cache_queries
                         if stats.prefix_cache_queries else 0.0)),
            "yun_prefix_cache_queries_tokens": ("Prompt tokens looked up in the prefix cache.",
                                                lambda: stats.prefix_cache_queries),
            "yun_prefix_cache_hits_tokens": ("Prompt tokens found in the prefix cache.",
                                             lambda: stats.prefix_cache_hits),
            "yun_num_preemptions": ("Sequences preempted (KV cache full) so far.",
                                    lambda: stats.num_preemptions),
            "yun_engine_alive": ("1 while the engine loop runs.",
                                 lambda: float(engine.is_alive)),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(read)
        info = Gauge("yun_model_info", "The served model.", ["model"], registry=r)
        info.labels(model=model_name).set(1)
        r.register(_SpecCollector(stats))
        r.register(_ReplicaCollector(engine))  # serving replicas: one series per replica

    def observe_finished(self, *, prompt_tokens: int, output_tokens: int,
                         finish_reasons: list[str], ttft: float | None, e2e: float) -> None:
        """Record one prompt's generation (all its `n` completions)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        for reason in finish_reasons:
            self.finished.labels(finish_reason=reason).inc()
        if ttft is not None:
            self.ttft.observe(ttft)
            per_seq = output_tokens / max(1, len(finish_reasons))
            if per_seq > 1:
                self.tpot.observe((e2e - ttft) / (per_seq - 1))
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SpecCollector:
    """Speculative decoding: proposed and accepted tokens, in all and per proposal
    position, and the acceptance rates (nothing while speculation is off)."""

    def __init__(self, stats: "EngineStats"):
        self.stats = stats

    def collect(self):
        proposed, accepted = list(self.stats.spec_proposed), list(self.stats.spec_accepted)
        if not proposed:
            return
        total_p, total_a = sum(proposed), sum(accepted)
        yield CounterMetricFamily("yun_spec_decode_num_draft_tokens",
                                  "Speculative tokens proposed and verified.", value=total_p)
        yield CounterMetricFamily("yun_spec_decode_num_accepted_tokens",
                                  "Speculative tokens accepted by verification.", value=total_a)
        yield CounterMetricFamily(
            "yun_spec_decode_proposer_seconds",
            "Time spent proposing speculative tokens (a draft model's or MTP layer's "
            "forwards; the n-gram lookup).",
            value=float(getattr(self.stats, "spec_proposer_seconds", 0.0) or 0.0))
        yield CounterMetricFamily(
            "yun_spec_decode_proposer_steps",
            "Engine steps in which the proposer was asked for tokens.",
            value=int(getattr(self.stats, "spec_proposer_steps", 0) or 0))
        yield GaugeMetricFamily("yun_spec_decode_acceptance_rate",
                                "Accepted / proposed speculative tokens.",
                                value=total_a / total_p if total_p else 0.0)
        by_p = CounterMetricFamily("yun_spec_decode_num_draft_tokens_per_pos",
                                   "Speculative tokens proposed, by position in the proposal "
                                   "(0 = first).", labels=["position"])
        by_a = CounterMetricFamily("yun_spec_decode_num_accepted_tokens_per_pos",
                                   "Speculative tokens accepted, by position.",
                                   labels=["position"])
        rate = GaugeMetricFamily("yun_spec_decode_acceptance_rate_per_pos",
                                 "Accepted / proposed speculative tokens, by position.",
                                 labels=["position"])
        for j, (p, a) in enumerate(zip(proposed, accepted)):
            by_p.add_metric([str(j)], p)
            by_a.add_metric([str(j)], a)
            rate.add_metric([str(j)], a / p if p else 0.0)
        yield by_p
        yield by_a
        yield rate


class _ReplicaCollector:
    """Per-replica series, read from `engine.replica_states()` at scrape time (nothing for
    a single engine)."""

    GAUGES = {
        "healthy": "1 while the replica serves.",
        "in_flight": "Requests routed to the replica and not finished.",
        "num_running": "Sequences running in the replica's engine.",
        "num_waiting": "Sequences waiting in the replica's engine.",
        "kv_usage": "Fraction of the replica's KV-cache blocks in use.",
        "prefix_cache_hit_rate": "The replica's prompt tokens found in its prefix cache / "
                                 "looked up.",
    }
    COUNTERS = {"routed": "Requests routed to the replica.",
                "restarts": "Times Ray restarted the replica."}

    def __init__(self, engine: "EngineClient"):
        self.engine = engine

    def collect(self):
        states = self.engine.replica_states()
        if not states:
            return
        for key, doc in self.GAUGES.items():
            family = GaugeMetricFamily(f"yun_replica_{key}", doc, labels=["replica"])
            for s in states:
                family.add_metric([str(s["replica"])], float(s[key]))
            yield family
        for key, doc in self.COUNTERS.items():
            family = CounterMetricFamily(f"yun_replica_{key}", doc, labels=["replica"])
            for s in states:
                family.add_metric([str(s["replica"])], float(s[key]))
            yield family
