"""Prometheus counters per tenant, in the server's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("yun_tenant_requests", "API requests that ended, by tenant "
                                "and status (completed, cancelled, failed).",
                                ["tenant", "status"], registry=registry)
        self.prompt_tokens = Counter("yun_tenant_prompt_tokens", "Prompt tokens, by tenant.",
                                     ["tenant"], registry=registry)
        self.cached_tokens = Counter("yun_tenant_cached_tokens",
                                     "Prompt tokens found in the prefix cache, by tenant.",
                                     ["tenant"], registry=registry)
        self.completion_tokens = Counter("yun_tenant_completion_tokens",
                                         "Generated tokens, by tenant.", ["tenant"],
                                         registry=registry)
        self.rejected = Counter("yun_tenant_rejected", "Requests refused with 429, by tenant "
                                "and the limit reached.", ["tenant", "limit"],
                                registry=registry)

    def ended(self, tenant: str, status: str, prompt: int, cached: int,
              completion: int) -> None:
        self.requests.labels(tenant=tenant, status=status).inc()
        self.prompt_tokens.labels(tenant=tenant).inc(prompt)
        self.cached_tokens.labels(tenant=tenant).inc(cached)
        self.completion_tokens.labels(tenant=tenant).inc(completion)
